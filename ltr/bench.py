"""`ltr bench`: training-step throughput of ltr's path against a plain reference loop.

What it measures: images per second of full training steps (forward, cross-entropy loss,
backward, SGD with momentum 0.9 and weight decay) of the same model architecture, at the same
batch size, on the same images, in the same process, after warm-up steps, along two paths:

- ltr: the step of the trainer (`ltr.train`), without its lr scheduler: the training set
  kept whole on the device as uint8 (`ltr.data.DeviceLoader`), random crop + flip +
  normalisation done there, loss statistics accumulated on the device (no host sync in the
  step loop). On CUDA also bf16 autocast, channels_last and `torch.compile`
  (CUDA graphs through mode "reduce-overhead" by default; a compile failure falls back to
  eager and is reported) and the fused SGD kernel.
- reference: the loop most long-tailed-recognition repos copy from the PyTorch tutorials:
  `torch.utils.data.DataLoader` over a Dataset of PIL images with torchvision transforms
  (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), fp32, no compile,
  `model.to(device)`, `loss.item()` bookkeeping every step.

Only full batches are timed on both paths (the last, partial batch of an epoch is skipped), so
both do the same arithmetic per step. Each timed region is bracketed by
`torch.cuda.synchronize()` on CUDA. The timed steps may alternate between the two paths in
rounds (on CPU by default one step each in turn), so that other processes loading a shared
machine slow both paths alike; the absolute images/s of a busy machine mean little, the ratio
still compares like with like. The data are CIFAR100-LT (IF 100) when the data root
holds CIFAR-100, else random uint8 images of the same shape and count made in memory (the
output says "synthetic data"; speed does not depend on pixel values).

Speed claims in ltr's documentation come from this benchmark, as the ratio ltr / reference
measured in one run (both paths, one process, one machine) -- never from timings of separate
runs or separate machines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import (
    DATASETS,
    MEAN,
    STD,
    DeviceLoader,
    LtrError,
    load_cifar_lt,
    long_tail_counts,
    resolve_device,
)
from .models import MODELS, build_model

# The recipe's step (SPEC 3): lr 0.01, momentum 0.9, weight decay 5e-3 (the WD-tuned row).
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-3
# Defaults per device: CPU steps are seconds each for resnet34, GPU steps milliseconds.
DEFAULT_STEPS = {"cpu": 10, "cuda": 200}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 30}
COMPILE_MODES = ("reduce-overhead", "max-autotune-no-cudagraphs", "default", "none")
# Dense bf16 tensor-core peaks (no sparsity) from the vendor data sheets, in FLOP/s. The first
# entry whose key occurs in torch.cuda.get_device_name() wins, so longer names come first.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12, "H100 PCIe"),
    ("H100 NVL", 835e12, "H100 NVL"),
    ("H100", 989e12, "H100 SXM"),
    ("H200", 989e12, "H200"),
    ("A100", 312e12, "A100"),
    ("L40S", 362e12, "L40S"),
    ("L4", 121e12, "L4"),
)


# ---------------------------------------------------------------- FLOPs


def estimate_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict:
    """Forward multiply-accumulates of the conv and linear layers for one input of input_shape.

    Counted with forward hooks on one forward pass in eval mode (no gradient, BN statistics
    untouched): a Conv2d adds out.numel() * in_channels / groups * kh * kw, a Linear adds
    out.numel() * in_features. Returns {"macs": ..., "flops": 2 * macs} for the whole input
    (divide by input_shape[0] for one image). A training step costs about 3x the forward
    (backward = two products of the same size), which is what `benchmark` uses for MFU.
    A model built under `torch.device("meta")` is counted without doing the arithmetic.
    """
    macs = 0

    def conv_hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal macs
        macs += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, device=dev))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {"macs": int(macs), "flops": int(2 * macs)}


def gpu_peak_bf16(name: str) -> tuple[float | None, str]:
    """Assumed dense bf16 peak FLOP/s of a GPU by its name, and which data-sheet entry it is."""
    for key, flops, label in PEAK_BF16_FLOPS:
        if key in name:
            return flops, f"{label} dense bf16, {flops / 1e12:g} TFLOP/s (data sheet)"
    return None, f"unknown peak for {name!r}; pass --peak-tflops"


# ---------------------------------------------------------------- data


def bench_data(root: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray, int, str, bool]:
    """(uint8 N x 3 x 32 x 32, labels, classes, description, synthetic?) for the benchmark.

    CIFAR100-LT IF100 when root holds cifar-100-python/, else random images with its exact
    class profile (10,847 images), made in memory.
    """
    info = DATASETS["cifar100"]
    if root is not None and (Path(root) / info.folder).is_dir():
        data = load_cifar_lt(root, "cifar100", 100)
        desc = f"CIFAR100-LT IF100 training set from {Path(root) / info.folder}"
        return data.train_x, data.train_y, data.num_classes, desc, False
    counts = long_tail_counts(500, info.num_classes, 100)
    labels = np.repeat(np.arange(info.num_classes), counts)
    rng = np.random.default_rng(0)
    labels = labels[rng.permutation(len(labels))]
    images = rng.integers(0, 256, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    where = "no data root given" if root is None else f"no {info.folder} under {root}"
    desc = (f"synthetic data: {len(labels):,} random uint8 images in the CIFAR100-LT IF100 "
            f"shape ({where})")
    return images, labels.astype(np.int64), info.num_classes, desc, True


class PILDataset(torch.utils.data.Dataset):
    """The usual LTR-repo dataset: HWC uint8 rows turned into PIL images, then transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable) -> None:
        # torchvision's CIFAR classes hold N x H x W x C; do the same.
        self.data = np.ascontiguousarray(images.transpose(0, 2, 3, 1))
        self.targets = [int(t) for t in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def reference_transform() -> Callable:
    """RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize (official values)."""
    from torchvision import transforms as T

    return T.Compose([
        T.RandomCrop(32, padding=4),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


# ---------------------------------------------------------------- the two paths


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _allocated(dev: torch.device) -> int:
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


class _Path:
    """One way of training: built and warmed up once, then timed in one or more chunks.

    Memory (CUDA): `resident` = bytes this path holds after its warm-up (model, optimizer state,
    data on the device, graph pools); `peak` = resident + the largest extra allocation seen
    during its timed chunks. Both paths live side by side when the chunks alternate, so a
    plain max_memory_allocated would mix them up.
    """

    def __init__(self, dev: torch.device) -> None:
        self.dev = dev
        self.seconds = 0.0
        self.done = 0
        self.resident = 0
        self.extra_peak = 0

    def step(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def start_chunk(self) -> None:
        """Called inside the timed region before a chunk's steps (nothing by default)."""

    def warm(self, n: int) -> None:
        """Untimed steps; records the memory this path holds afterwards."""
        before = _allocated(self.dev)
        for _ in range(n):
            self.step()
        _sync(self.dev)
        self.resident += _allocated(self.dev) - before

    def timed(self, n: int) -> None:
        """n steps, synchronised on CUDA around the timed region only."""
        if self.dev.type == "cuda":
            base = torch.cuda.memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        _sync(self.dev)
        t0 = time.perf_counter()
        self.start_chunk()
        for _ in range(n):
            self.step()
        _sync(self.dev)
        self.seconds += time.perf_counter() - t0
        self.done += n
        if self.dev.type == "cuda":
            extra = torch.cuda.max_memory_allocated(self.dev) - base
            self.extra_peak = max(self.extra_peak, extra)

    @property
    def peak_mib(self) -> float:
        return round((self.resident + self.extra_peak) / 2**20, 1)


class _Reference(_Path):
    """DataLoader over PIL images + torchvision transforms, fp32, eager, `.item()` bookkeeping."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, model_name: str,
                 dev: torch.device, batch_size: int, workers: int) -> None:
        super().__init__(dev)
        before = _allocated(dev)
        self.loader = torch.utils.data.DataLoader(
            PILDataset(images, labels, reference_transform()), batch_size=batch_size,
            shuffle=True, num_workers=workers, drop_last=True, pin_memory=dev.type == "cuda",
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
        )
        torch.manual_seed(0)
        self.model = build_model(model_name, num_classes).to(dev)
        self.model.train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM,
                                   weight_decay=WEIGHT_DECAY)
        self.criterion = nn.CrossEntropyLoss()
        self.batches = iter(self.loader)
        self.running_loss = 0.0
        self.running_correct = 0
        self.seen = 0
        self.resident = _allocated(dev) - before

    def start_chunk(self) -> None:
        # With worker processes, a fresh pass starts inside the timed region: batches the
        # workers prefetched while the other path ran are thrown away, not counted as free.
        if self.loader.num_workers > 0:
            self.batches = iter(self.loader)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> None:
        x, y = self._next()
        x, y = x.to(self.dev, non_blocking=True), y.to(self.dev, non_blocking=True)
        logits = self.model(x)
        loss = self.criterion(logits, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.running_loss += loss.item() * x.size(0)
        self.running_correct += int((logits.argmax(1) == y).sum().item())
        self.seen += x.size(0)

    def close(self) -> None:
        """Stop the worker processes."""
        self.batches = None
        self.loader = None


class _Ltr(_Path):
    """Device-resident uint8 data, on-device augmentation; on CUDA bf16, channels_last, compile."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, model_name: str,
                 dev: torch.device, batch_size: int, compile_mode: str) -> None:
        super().__init__(dev)
        before = _allocated(dev)
        self.loader = DeviceLoader(images, labels, batch_size, dev, seed=0, num_classes=num_classes)
        self.batches = self._full_batches()
        self.num_classes = num_classes
        self.model_name = model_name
        self.amp = dev.type == "cuda"
        self.compile_error: str | None = None
        self._data_bytes = _allocated(dev) - before
        self._build(compile_mode)

    def _full_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Full batches only: one static shape for compile and CUDA graphs (the reference drops
        # its last partial batch too).
        while True:
            for x, y in self.loader:
                if len(y) == self.loader.batch_size:
                    yield x, y

    def _build(self, compile_mode: str) -> None:
        dev = self.dev
        before = _allocated(dev)
        torch.manual_seed(0)
        model = build_model(self.model_name, self.num_classes).to(dev)
        if dev.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        model.train()
        params = list(model.parameters())
        self.settings: dict = {"amp_bf16": self.amp, "channels_last": dev.type == "cuda"}
        opt = None
        if dev.type == "cuda":
            try:
                opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                      fused=True)
                self.settings["optimizer"] = "SGD fused"
            except (TypeError, RuntimeError, ValueError):
                opt = None
        if opt is None:
            foreach = dev.type == "cuda"
            opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                                  foreach=foreach)
            self.settings["optimizer"] = "SGD foreach" if foreach else "SGD for-loop"
        self.model, self.opt = model, opt
        self.step_model: Callable = model
        self.mark_step: Callable | None = None
        if compile_mode != "none":
            kwargs = {} if compile_mode == "default" else {"mode": compile_mode}
            # dynamic=False: one static graph per batch shape, no symbolic-shape recompiles.
            self.step_model = torch.compile(model, dynamic=False, **kwargs)
            if compile_mode == "reduce-overhead":
                # Tells CUDA-graph trees that an iteration starts, so the previous step's graph
                # outputs (logits, gradients) are known dead and their memory can be reused.
                self.mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)
        self.settings["compile_mode"] = compile_mode
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.seen = 0
        self.resident = self._data_bytes + _allocated(dev) - before

    def step(self) -> None:
        x, y = next(self.batches)
        if "input_channels_last" not in self.settings:  # a stride check, no device sync
            self.settings["input_channels_last"] = bool(
                x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
        # Gradients are dropped before the forward: with CUDA graphs they live in the graph's
        # memory pool, which the next replay reuses.
        self.opt.zero_grad(set_to_none=True)
        if self.mark_step is not None:
            self.mark_step()
        with torch.autocast(self.dev.type, dtype=torch.bfloat16, enabled=self.amp):
            logits = self.step_model(x)
        loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        self.opt.step()
        # On the device, as the trainer does: reading a number here would stall the GPU.
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def _fall_back(self, exc: Exception, warmup: int) -> None:
        """A compiled step failed: record why, rebuild in eager mode, warm up, restart timing."""
        self.compile_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        self.model = self.step_model = self.opt = None  # type: ignore[assignment]
        with contextlib.suppress(Exception):
            torch._dynamo.reset()
        _release(self.dev)
        self.seconds, self.done, self.extra_peak = 0.0, 0, 0
        self._build("none")
        super().warm(warmup)

    def warm(self, n: int) -> None:
        try:
            super().warm(n)
        except Exception as exc:
            if self.settings["compile_mode"] == "none":
                raise
            self._fall_back(exc, n)
        self._warmup = n

    def timed(self, n: int) -> None:
        try:
            super().timed(n)
        except Exception as exc:
            if self.settings["compile_mode"] == "none":
                raise
            self._fall_back(exc, self._warmup)  # the driver loop then times the steps again


def _load_avg() -> float | None:
    """The 1-minute load average (other processes competing for the CPU), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _release(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- benchmark


def benchmark(
    model: str = "resnet34",
    device: str | torch.device = "auto",
    steps: int | None = None,
    batch_size: int = 64,
    warmup: int | None = None,
    root: str | os.PathLike | None = None,
    workers: int | None = None,
    compile_mode: str | None = None,
    rounds: int | None = None,
    peak_tflops: float | None = None,
) -> dict:
    """Time `steps` training steps of ltr's path and of the reference after `warmup` steps each.

    The timed steps of each path are split into `rounds` chunks that alternate between the two
    paths (reference, ltr, reference, ...), so a change in machine load during the run hits
    both alike (default: 1 round on CUDA; on CPU one step a round). Returns plain JSON types:
    ltr_img_s, reference_img_s, ratio (= ltr / reference), device, model, batch_size, steps,
    warmup, ltr_step_ms, reference_step_ms, data, synthetic; on CUDA also ltr_peak_mem_mib,
    reference_peak_mem_mib, peak_mem_mib (ltr's) and est_mfu (training FLOPs of ltr's timed
    steps / elapsed / assumed dense bf16 peak of the GPU, named in peak_source).
    """
    if model not in MODELS:
        raise LtrError(f"unknown model {model!r}; choose one of {sorted(MODELS)}")
    dev = resolve_device(device)
    kind = "cuda" if dev.type == "cuda" else "cpu"
    steps = DEFAULT_STEPS[kind] if steps is None else int(steps)
    warmup = DEFAULT_WARMUP[kind] if warmup is None else int(warmup)
    rounds = (1 if kind == "cuda" else steps) if rounds is None else min(int(rounds), steps)
    if workers is None:
        # On CUDA the reference gets the worker processes LTR repos use, so it is not starved.
        workers = 0 if kind == "cpu" else min(8, max(1, (os.cpu_count() or 2) // 2))
    if compile_mode is None:
        compile_mode = "reduce-overhead" if kind == "cuda" else "none"
    if compile_mode not in COMPILE_MODES:
        raise LtrError(f"unknown compile mode {compile_mode!r}; choose one of {list(COMPILE_MODES)}")
    if steps < 1 or warmup < 0 or batch_size < 1 or workers < 0 or rounds < 1:
        raise LtrError(
            "need --steps >= 1, --warmup >= 0, --batch-size >= 1, --workers >= 0 and rounds >= 1 "
            f"(got {steps}, {warmup}, {batch_size}, {workers}, {rounds})"
        )
    images, labels, num_classes, data_desc, synthetic = bench_data(root)
    if batch_size > len(labels):
        raise LtrError(f"--batch-size {batch_size} exceeds the {len(labels)} training images")
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        macs = estimate_flops(build_model(model, num_classes), (1, 3, 32, 32))["macs"]

    result: dict = {
        "model": model,
        "device": str(dev) if kind == "cpu" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "batch_size": int(batch_size),
        "steps": steps,
        "warmup": warmup,
        "rounds": rounds,
        "data": data_desc,
        "synthetic": synthetic,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "reference_workers": workers,
        "fwd_gmacs_per_image": round(macs / 1e9, 4),
        "cpu_count": os.cpu_count(),
        "load_avg_before": _load_avg(),
    }
    cudnn_before = torch.backends.cudnn.benchmark
    ref = ltr = None
    try:
        if kind == "cuda":
            # Both paths get cuDNN's autotuned kernels (most LTR repos set this flag too).
            torch.backends.cudnn.benchmark = True
        ref = _Reference(images, labels, num_classes, model, dev, batch_size, workers)
        ref.warm(warmup)
        ltr = _Ltr(images, labels, num_classes, model, dev, batch_size, compile_mode)
        ltr.warm(warmup)
        chunk = -(-steps // rounds)
        while ref.done < steps or ltr.done < steps:
            for path in (ref, ltr):
                n = min(chunk, steps - path.done)
                if n > 0:
                    path.timed(n)
    finally:
        torch.backends.cudnn.benchmark = cudnn_before
        if ref is not None:
            ref.close()
    result["load_avg_after"] = _load_avg()
    n_img = steps * batch_size
    result["ltr_settings"] = ltr.settings
    if ltr.compile_error is not None:
        result["compile_error"] = ltr.compile_error
    result["ltr_img_s"] = round(n_img / ltr.seconds, 2)
    result["reference_img_s"] = round(n_img / ref.seconds, 2)
    result["ratio"] = round(ref.seconds / ltr.seconds, 4)
    result["ltr_step_ms"] = round(1000 * ltr.seconds / steps, 3)
    result["reference_step_ms"] = round(1000 * ref.seconds / steps, 3)
    result["ltr_train_loss"] = round(float(ltr.loss_sum) / max(ltr.seen, 1), 4)
    result["reference_train_loss"] = round(ref.running_loss / max(ref.seen, 1), 4)
    if kind == "cuda":
        result["ltr_peak_mem_mib"] = ltr.peak_mib
        result["reference_peak_mem_mib"] = ref.peak_mib
        result["peak_mem_mib"] = ltr.peak_mib
        if peak_tflops is not None:
            peak, source = peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s (given by --peak-tflops)"
        else:
            peak, source = gpu_peak_bf16(torch.cuda.get_device_name(dev))
        result["peak_flops_assumed"] = peak
        result["peak_source"] = source
        train_flops = 3 * 2 * macs * n_img  # backward ~ 2x forward
        result["est_mfu"] = round(train_flops / ltr.seconds / peak, 5) if peak else None
        result["reference_est_mfu"] = round(train_flops / ref.seconds / peak, 5) if peak else None
    return result


# ---------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `ltr bench`, added to a (sub)parser."""
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--model", default="resnet34", choices=sorted(MODELS),
                        help="backbone (default: resnet34)")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per path (default: {DEFAULT_STEPS['cpu']} on CPU, "
                             f"{DEFAULT_STEPS['cuda']} on CUDA)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per step (default: 64)")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed steps first (default: {DEFAULT_WARMUP['cpu']} on CPU, "
                             f"{DEFAULT_WARMUP['cuda']} on CUDA)")
    parser.add_argument("--root", default="data",
                        help="data root; CIFAR-100 there is used, else synthetic images (default: data)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the reference (default: 0 on CPU, "
                             "min(8, cores/2) on CUDA)")
    parser.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                        help="torch.compile mode of ltr's path (default: reduce-overhead on CUDA, "
                             "none on CPU)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating timed chunks per path (default: 1 on CUDA, --steps on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU peak bf16 TFLOP/s for the MFU estimate (default: from the GPU name)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def format_result(r: dict) -> str:
    """The human-readable report of a benchmark result."""
    s = r.get("ltr_settings", {})
    ltr_how = ["data on device (uint8, on-device crop/flip/normalize)"]
    if s.get("amp_bf16"):
        ltr_how.append("bf16 autocast")
    if s.get("channels_last"):
        ltr_how.append("channels_last model")
    elif s.get("input_channels_last"):
        ltr_how.append("channels_last input (as augment lays it out)")
    if s.get("compile_mode", "none") != "none":
        ltr_how.append(f"torch.compile {s['compile_mode']}")
    else:
        ltr_how.append("eager")
    ltr_how.append(s.get("optimizer", "SGD"))
    ref_how = (f"DataLoader + PIL + torchvision transforms, {r['reference_workers']} workers, "
               "fp32, eager, SGD default")
    lines = [
        f"ltr bench: {r['model']}, batch {r['batch_size']}, {r['steps']} timed steps after "
        f"{r['warmup']} warm-up steps per path ({r['rounds']} alternating rounds), "
        f"device {r['device']}, "
        f"{r['threads']} CPU threads, torch {r['torch']}",
        f"  data: {r['data']}",
        f"  ltr       : {r['ltr_img_s']:10.1f} img/s  {r['ltr_step_ms']:9.2f} ms/step  "
        f"({', '.join(ltr_how)})",
        f"  reference : {r['reference_img_s']:10.1f} img/s  {r['reference_step_ms']:9.2f} ms/step  "
        f"({ref_how})",
    ]
    if "compile_error" in r:
        lines.append(f"  torch.compile failed, ltr path timed in eager mode: {r['compile_error']}")
    if "ltr_peak_mem_mib" in r:
        lines.append(f"  peak GPU memory: ltr {r['ltr_peak_mem_mib']:.0f} MiB, "
                     f"reference {r['reference_peak_mem_mib']:.0f} MiB")
    lines.append(f"  ratio ltr / reference: {r['ratio']:.2f}x (both measured in this one run)")
    loads = [v for v in (r.get("load_avg_before"), r.get("load_avg_after")) if v is not None]
    if loads and r.get("cpu_count") and max(loads) > 0.5 * r["cpu_count"] + 1:
        lines.append(
            f"  note: the machine was busy (load average up to {max(loads):.1f} on "
            f"{r['cpu_count']} cores): absolute numbers are noisy; the alternating rounds keep "
            "the ratio fair"
        )
        if r.get("threads", 1) > 1 and (r.get("omp_wait_policy") or "").upper() != "PASSIVE":
            lines.append(
                "  note: OpenMP threads spin while they wait, which collapses throughput when "
                "other processes share the cores; set OMP_WAIT_POLICY=PASSIVE (before Python "
                "starts) or use fewer threads"
            )
    if "est_mfu" in r:
        flops = 6 * r["fwd_gmacs_per_image"]
        if r["est_mfu"] is None:
            lines.append(f"  est. MFU: n/a ({r['peak_source']})")
        else:
            lines.append(
                f"  est. MFU: ltr {100 * r['est_mfu']:.1f}%, reference "
                f"{100 * r['reference_est_mfu']:.1f}% ({flops:.2f} GFLOP/image/step = 3 x 2 x "
                f"{r['fwd_gmacs_per_image']:.3f} GMAC forward; assumed peak {r['peak_source']})"
            )
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    """Run `ltr bench` from parsed flags; prints the report (or one JSON object); exit code."""
    try:
        result = benchmark(
            model=args.model,
            device=args.device,
            steps=args.steps,
            batch_size=args.batch_size,
            warmup=args.warmup,
            root=args.root,
            workers=getattr(args, "workers", None),
            compile_mode=getattr(args, "compile_mode", None),
            rounds=getattr(args, "rounds", None),
            peak_tflops=getattr(args, "peak_tflops", None),
        )
    except LtrError as exc:
        print(f"ltr bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(format_result(result))
    return 0
