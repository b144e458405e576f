"""`ltr bench`: training-step throughput of ltr's path against a plain reference loop.

What it measures: images per second of full training steps (forward, cross-entropy loss,
backward, SGD with momentum 0.9 and weight decay) of the same model architecture, at the same
batch size, on the same images, in the same process, after warm-up steps, along two paths:

- ltr: the step of the trainer (`ltr.train`), without its lr scheduler: the training set
  kept whole on the device as uint8 (`ltr.data.DeviceLoader`), random crop + flip +
  normalisation done there, loss statistics accumulated on the device (no host sync in the
  step loop), autocast to the precision under test (fp16 with a GradScaler, as the trainer
  does). On CUDA also channels_last and the fused SGD kernel. ltr's path is timed once per
  variant: every precision and `torch.compile` mode asked for (by default on CUDA: fp32, fp16,
  bf16 where the GPU has it, eager, plus compile modes default and reduce-overhead (CUDA graphs)
  at the precision `auto` picks; on CPU fp32 eager). A compile failure
  falls back to eager and is reported. The fastest variant is printed as the recommended
  trainer flags.
- reference: the loop most long-tailed-recognition repos copy from the PyTorch tutorials:
  `torch.utils.data.DataLoader` over a Dataset of PIL images with torchvision transforms
  (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize), fp32, no compile,
  `model.to(device)`, `loss.item()` bookkeeping every step.

Estimated MFU (model FLOPs utilisation) = training FLOPs of the timed steps (3 x the forward
FLOPs that torch.utils.flop_counter counts for one image, times the images) / elapsed time / the
GPU's dense data-sheet peak for the variant's precision (PEAK_TFLOPS; "n/a" on CPU and for GPUs
not in the table unless --peak-tflops gives one).

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
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import (
    DATASETS,
    MEAN,
    STD,
    DeviceLoader,
    LtrError,
    load_cifar_lt,
    long_tail_counts,
    resolve_device,
)
from ..engine.precision import (
    PRECISIONS,
    autocast,
    autocast_dtype,
    grad_scaler,
    native_bf16,
    resolve_precision,
    set_backend_flags,
)
from ..models import MODELS, build_model

# The recipe's step (SPEC 3): lr 0.01, momentum 0.9, weight decay 5e-3 (the WD-tuned row).
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-3
# Defaults per device: CPU steps are seconds each for resnet34, GPU steps milliseconds.
DEFAULT_STEPS = {"cpu": 10, "cuda": 200}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 30}
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
# The modes the trainer can run (--compile, --compile-mode reduce-overhead); the others are bench-only.
TRAINER_COMPILE = {"none": "", "default": " --compile", "reduce-overhead": " --compile-mode reduce-overhead"}
# Compiled variants timed by default on CUDA (at the auto precision): each compiles for a minute or so.
DEFAULT_CUDA_COMPILED = ("default", "reduce-overhead")
# Dense (no sparsity) tensor-core peaks from the vendor data sheets, in TFLOP/s, per precision:
# (name as torch.cuda.get_device_name() spells it, bf16, fp16, fp32). fp32 is the TF32 tensor-core
# peak where the GPU has TF32 (cuDNN runs fp32 convolutions in TF32 by default), else the CUDA-core
# fp32 peak (V100, T4). bf16 None: no bf16 arithmetic in hardware. GeForce cards: fp32 accumulate.
# The first entry whose name occurs in the device name as a whole word wins: longer names first.
PEAK_TFLOPS: tuple[tuple[str, float | None, float, float], ...] = (
    ("H100 PCIe", 756.0, 756.0, 378.0),
    ("H100 NVL", 835.0, 835.0, 417.5),
    ("H100", 989.4, 989.4, 494.7),
    ("H200", 989.4, 989.4, 494.7),
    ("A100", 312.0, 312.0, 156.0),
    ("L40S", 362.0, 362.0, 183.0),
    ("L40", 181.0, 181.0, 90.5),
    ("L4", 121.0, 121.0, 60.0),
    ("RTX 4090", 165.2, 165.2, 82.6),
    ("RTX 3090", 71.0, 71.0, 35.6),
    ("V100-PCIE", None, 112.0, 14.0),
    ("V100", None, 125.0, 15.7),
    ("T4", None, 65.0, 8.1),
)


# ---------------------------------------------------------------- FLOPs


def estimate_flops(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> dict:
    """Forward FLOPs of one input of input_shape, counted by torch.utils.flop_counter.FlopCounterMode.

    One forward pass in eval mode (no gradient, BN statistics untouched); the counter adds the
    FLOPs of every matrix product and convolution (2 per multiply-accumulate). Returns
    {"macs": ..., "flops": ...} for the whole input (divide by input_shape[0] for one image). A
    training step costs about 3x the forward (the backward pass is two products of the same size),
    which is what `benchmark` uses for MFU. A model built under `torch.device("meta")` is counted
    without doing the arithmetic.
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(torch.zeros(input_shape, device=dev))
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    return {"macs": flops // 2, "flops": flops}


def gpu_peak(name: str, precision: str) -> tuple[float | None, str]:
    """Assumed dense peak FLOP/s of a GPU (by its name) in a precision, and which data-sheet entry it is."""
    import re

    column = {"bf16": 1, "fp16": 2, "fp32": 3}[precision]
    for entry in PEAK_TFLOPS:
        if re.search(rf"(^|[\s-]){re.escape(entry[0])}($|[\s-])", name):
            tflops = entry[column]
            if tflops is None:
                return None, f"{entry[0]} has no {precision} arithmetic in hardware (emulated)"
            kind = "tf32/fp32" if precision == "fp32" else precision
            return tflops * 1e12, f"{entry[0]} dense {kind}, {tflops:g} TFLOP/s (data sheet)"
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

    def __init__(self, dev: torch.device, precision: str = "fp32") -> None:
        self.dev = dev
        self.flags_precision = precision  # the trainer's CUDA backend flags for this precision
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
        set_backend_flags(self.dev, self.flags_precision)
        before = _allocated(self.dev)
        for _ in range(n):
            self.step()
        _sync(self.dev)
        self.resident += _allocated(self.dev) - before

    def timed(self, n: int) -> None:
        """n steps, synchronised on CUDA around the timed region only."""
        set_backend_flags(self.dev, self.flags_precision)
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
    """Device-resident uint8 data, on-device augmentation, a precision, compile; on CUDA channels_last."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, model_name: str,
                 dev: torch.device, batch_size: int, compile_mode: str, precision: str = "fp32") -> None:
        super().__init__(dev, precision)
        before = _allocated(dev)
        self.loader = DeviceLoader(images, labels, batch_size, dev, seed=0, num_classes=num_classes)
        self.batches = self._full_batches()
        self.num_classes = num_classes
        self.model_name = model_name
        self.precision = precision
        self.dtype = autocast_dtype(precision)
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
        self.settings: dict = {"precision": self.precision, "channels_last": dev.type == "cuda"}
        self.scaler = grad_scaler(self.precision, dev)
        opt = None
        if dev.type == "cuda" or self.scaler.is_enabled():  # as the trainer: fused also skips inf steps
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
        with autocast(self.dev.type, self.dtype):
            logits = self.step_model(x)
        loss = F.cross_entropy(logits.float(), y)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        # On the device, as the trainer does: reading a number here would stall the GPU.
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def _fall_back(self, exc: Exception, warmup: int) -> None:
        """A compiled step failed: record why, rebuild in eager mode, warm up, restart timing."""
        self.compile_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
        self.model = self.step_model = self.opt = None  # type: ignore[assignment]
        # No torch._dynamo.reset(): it would drop the compiled code of the other variants too.
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


def bench_precisions(precision: str | Sequence[str] | None, dev: torch.device) -> list[str]:
    """The precisions to time: those asked for (auto resolved for dev), else the device's candidates."""
    if precision is None:
        if dev.type != "cuda":
            return ["fp32"]
        return ["fp32", "fp16"] + (["bf16"] if native_bf16(dev) else [])
    asked = [precision] if isinstance(precision, str) else list(precision)
    for p in asked:
        if p not in PRECISIONS:
            raise LtrError(f"unknown precision {p!r}; choose from {' | '.join(PRECISIONS)}")
    return list(dict.fromkeys(resolve_precision(p, dev) for p in asked))


def bench_variants(precision: str | Sequence[str] | None, compile_mode: str | Sequence[str] | None,
                   dev: torch.device) -> list[tuple[str, str]]:
    """(precision, compile mode) of each ltr variant to time.

    Asked-for precisions and modes are timed in every combination. By default every precision runs
    eager, and on CUDA DEFAULT_CUDA_COMPILED's modes are added at the precision `auto` picks, so that
    compiling (a minute or so each) happens at most twice; compile modes asked for without precisions
    likewise run at the auto precision only.
    """
    modes = None if compile_mode is None else (
        [compile_mode] if isinstance(compile_mode, str) else list(dict.fromkeys(compile_mode)))
    for mode in modes or []:
        if mode not in COMPILE_MODES:
            raise LtrError(f"unknown compile mode {mode!r}; choose one of {list(COMPILE_MODES)}")
    precisions = bench_precisions(precision, dev)
    if precision is not None and modes is not None:
        return [(p, m) for p in precisions for m in modes]
    if modes is None:
        eager = ["none"]
        compiled = list(DEFAULT_CUDA_COMPILED) if dev.type == "cuda" else []
    else:
        eager = [m for m in modes if m == "none"]
        compiled = [m for m in modes if m != "none"]
    auto = resolve_precision("auto", dev)
    at = precisions if precision is not None else ([auto] if auto in precisions else precisions[:1])
    return [(p, m) for p in precisions for m in eager] + [(p, m) for p in at for m in compiled]


def benchmark(
    model: str = "resnet34",
    device: str | torch.device = "auto",
    steps: int | None = None,
    batch_size: int = 64,
    warmup: int | None = None,
    root: str | os.PathLike | None = None,
    workers: int | None = None,
    compile_mode: str | Sequence[str] | None = None,
    rounds: int | None = None,
    peak_tflops: float | None = None,
    precision: str | Sequence[str] | None = None,
) -> dict:
    """Time `steps` training steps of each ltr variant and of the reference after `warmup` steps each.

    A variant is one precision (fp32 | fp16 | bf16; auto = the trainer's choice for the device) with
    one compile mode (COMPILE_MODES); which ones by default: bench_variants. The timed steps of every
    path are split into `rounds` chunks that alternate between the paths (reference, variant 1,
    variant 2, ...), so a change in machine load during the run hits all alike (default: 1 round on
    CUDA; on CPU one step a round).

    Returns plain JSON types: `variants` (per variant: precision, compile_mode, img_s, step_ms,
    est_mfu, peak_source, train_loss, and on CUDA peak_mem_mib), `recommended` (the fastest
    variant and the trainer flags that run it), reference_img_s, reference_step_ms, and for the
    fastest variant the keys of one ltr path: ltr_img_s, ltr_step_ms, ratio (= ltr / reference),
    ltr_settings, est_mfu (None on CPU); plus device, model, batch_size, steps, warmup, data,
    synthetic.
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
    pairs = bench_variants(precision, compile_mode, dev)
    if steps < 1 or warmup < 0 or batch_size < 1 or workers < 0 or rounds < 1:
        raise LtrError(
            "need --steps >= 1, --warmup >= 0, --batch-size >= 1, --workers >= 0 and rounds >= 1 "
            f"(got {steps}, {warmup}, {batch_size}, {workers}, {rounds})"
        )
    images, labels, num_classes, data_desc, synthetic = bench_data(root)
    if batch_size > len(labels):
        raise LtrError(f"--batch-size {batch_size} exceeds the {len(labels)} training images")
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        fwd_flops = estimate_flops(build_model(model, num_classes), (1, 3, 32, 32))["flops"]

    gpu = torch.cuda.get_device_name(dev) if kind == "cuda" else None
    result: dict = {
        "model": model,
        "device": str(dev) if kind == "cpu" else f"cuda ({gpu})",
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
        "fwd_gmacs_per_image": round(fwd_flops / 2 / 1e9, 4),
        "train_gflops_per_image": round(3 * fwd_flops / 1e9, 4),
        "cpu_count": os.cpu_count(),
        "load_avg_before": _load_avg(),
        "auto_precision": resolve_precision("auto", dev),
    }
    if kind == "cuda":
        result["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    # Every path runs under the trainer's backend flags for its precision (engine.precision.set_backend_flags:
    # cuDNN's autotuner for all, which most LTR repos set too); the caller's flags come back at the end.
    flags_before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    ref = None
    variants: list[_Ltr] = []
    try:
        ref = _Reference(images, labels, num_classes, model, dev, batch_size, workers)
        ref.warm(warmup)
        for prec, mode in pairs:
            variant = _Ltr(images, labels, num_classes, model, dev, batch_size, mode, prec)
            variant.warm(warmup)
            variants.append(variant)
        paths: list[_Path] = [ref, *variants]
        chunk = -(-steps // rounds)
        while any(path.done < steps for path in paths):
            for path in paths:
                n = min(chunk, steps - path.done)
                if n > 0:
                    path.timed(n)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = flags_before
        if ref is not None:
            ref.close()
    result["load_avg_after"] = _load_avg()
    n_img = steps * batch_size
    train_flops = 3 * fwd_flops * n_img  # backward ~ 2x forward

    def peak_of(prec: str) -> tuple[float | None, str]:
        if kind != "cuda":
            return None, "no peak table for CPUs"
        if peak_tflops is not None:
            return peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s (given by --peak-tflops)"
        return gpu_peak(gpu, prec)

    records = []
    for v in variants:
        peak, source = peak_of(v.precision)
        rec = {
            "precision": v.precision,
            "compile_mode": v.settings["compile_mode"],  # what was timed (eager after a compile failure)
            "img_s": round(n_img / v.seconds, 2),
            "step_ms": round(1000 * v.seconds / steps, 3),
            "est_mfu": round(train_flops / v.seconds / peak, 5) if peak else None,
            "peak_source": source,
            "train_loss": round(float(v.loss_sum) / max(v.seen, 1), 4),
            "settings": v.settings,
        }
        if v.compile_error is not None:
            rec["compile_error"] = v.compile_error
        if kind == "cuda":
            rec["peak_mem_mib"] = v.peak_mib
        records.append(rec)
    result["variants"] = records
    best_i = max(range(len(records)), key=lambda i: records[i]["img_s"])
    best, fastest = records[best_i], variants[best_i]
    # The recommendation is the fastest variant the trainer can run (its --compile is mode default).
    runnable = [r for r in records if r["compile_mode"] in TRAINER_COMPILE] or [best]
    pick = max(runnable, key=lambda r: r["img_s"])
    result["recommended"] = {
        "precision": pick["precision"],
        "compile_mode": pick["compile_mode"],
        "img_s": pick["img_s"],
        "trainer_flags": f"--precision {pick['precision']}" + TRAINER_COMPILE.get(pick["compile_mode"], ""),
        "trainer_can_run": pick["compile_mode"] in TRAINER_COMPILE,
        "fastest_overall": {"precision": best["precision"], "compile_mode": best["compile_mode"],
                            "img_s": best["img_s"]},
    }
    # The fastest variant under the keys of a single ltr path (what earlier versions reported).
    result["ltr_settings"] = best["settings"]
    errors = [r["compile_error"] for r in records if "compile_error" in r]
    if errors:
        result["compile_error"] = errors[0]
    result["ltr_img_s"] = best["img_s"]
    result["reference_img_s"] = round(n_img / ref.seconds, 2)
    result["ratio"] = round(ref.seconds / fastest.seconds, 4)
    result["ltr_step_ms"] = best["step_ms"]
    result["reference_step_ms"] = round(1000 * ref.seconds / steps, 3)
    result["ltr_train_loss"] = best["train_loss"]
    result["reference_train_loss"] = round(ref.running_loss / max(ref.seen, 1), 4)
    result["est_mfu"] = best["est_mfu"]
    ref_peak, _ = peak_of("fp32")  # the reference trains in fp32
    result["reference_est_mfu"] = round(train_flops / ref.seconds / ref_peak, 5) if ref_peak else None
    result["peak_source"] = best["peak_source"]
    if kind == "cuda":
        result["ltr_peak_mem_mib"] = best["peak_mem_mib"]
        result["reference_peak_mem_mib"] = ref.peak_mib
        result["peak_mem_mib"] = best["peak_mem_mib"]
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
    parser.add_argument("--precision", nargs="+", default=None, choices=PRECISIONS,
                        help="precisions of ltr's path to time (auto = the trainer's choice here; default: "
                             "fp32, fp16 and, from compute capability 8.0, bf16 on CUDA; fp32 on CPU)")
    parser.add_argument("--compile-mode", nargs="+", default=None, choices=COMPILE_MODES,
                        help="torch.compile modes of ltr's path to time (default on CUDA: none for every "
                             "precision, default and reduce-overhead at the auto precision only; none on "
                             "CPU). Modes without --precision run at the auto precision")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating timed chunks per path (default: 1 on CUDA, --steps on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="GPU peak TFLOP/s for the MFU estimate, all precisions (default: the data-sheet "
                             "value of the GPU and precision)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def _how(s: dict) -> str:
    """What differs between variants, in words: precision, compile mode, optimizer kernel."""
    mode = s.get("compile_mode", "none")
    return ", ".join([
        s.get("precision", "fp32") + (" + GradScaler" if s.get("precision") == "fp16" else ""),
        "eager" if mode == "none" else f"compile {mode}",
        s.get("optimizer", "SGD"),
    ])


def _common(s: dict) -> str:
    """What every variant shares, in words."""
    how = ["data on device as uint8, on-device crop/flip/normalize"]
    if s.get("channels_last"):
        how.append("channels_last model")
    elif s.get("input_channels_last"):
        how.append("channels_last input (as augment lays it out)")
    return ", ".join(how)


def format_result(r: dict) -> str:
    """The human-readable report of a benchmark result."""

    def mfu(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    ref_how = (f"DataLoader + PIL + torchvision transforms, {r['reference_workers']} workers, "
               "fp32, eager, SGD default")
    lines = [
        f"ltr bench: {r['model']}, batch {r['batch_size']}, {r['steps']} timed steps after "
        f"{r['warmup']} warm-up steps per path ({r['rounds']} alternating rounds), "
        f"device {r['device']}, "
        f"{r['threads']} CPU threads, torch {r['torch']}",
        f"  data: {r['data']}",
        f"  ltr ({_common(r.get('ltr_settings', {}))}):",
        f"    {'variant':48s} {'img/s':>10s} {'ms/step':>9s} {'est. MFU':>9s}",
    ]
    for v in r.get("variants", []):
        lines.append(f"    {_how(v['settings']):48s} {v['img_s']:10.1f} {v['step_ms']:9.2f} "
                     f"{mfu(v['est_mfu']):>9s}")
        if "compile_error" in v:
            lines.append(f"      torch.compile failed, timed in eager mode: {v['compile_error']}")
    lines.append(f"  reference : {r['reference_img_s']:10.1f} img/s  {r['reference_step_ms']:9.2f} ms/step  "
                 f"est. MFU {mfu(r.get('reference_est_mfu'))}  ({ref_how})")
    if "ltr_peak_mem_mib" in r:
        lines.append(f"  peak GPU memory: fastest ltr variant {r['ltr_peak_mem_mib']:.0f} MiB, "
                     f"reference {r['reference_peak_mem_mib']:.0f} MiB")
    lines.append(f"  ratio ltr / reference: {r['ratio']:.2f}x (fastest variant; both measured in this run)")
    lines.append(f"  est. MFU = {r['train_gflops_per_image']:.3f} GFLOP/image/step (3 x forward, counted by "
                 f"FlopCounterMode) x img/s / peak of its precision; fastest's: {r['peak_source']}")
    rec = r.get("recommended")
    if rec:
        line = (f"  recommended for the trainer: {rec['trainer_flags']} (the fastest variant it can run: "
                f"{rec['precision']}, "
                f"{'eager' if rec['compile_mode'] == 'none' else 'compile ' + rec['compile_mode']}; "
                f"--precision auto picks {r['auto_precision']} on this device)")
        if not rec["trainer_can_run"]:
            line += (f"; compile mode {rec['compile_mode']} is bench-only, the trainer runs modes "
                     "default and reduce-overhead")
        top = rec.get("fastest_overall", {})
        if top and (top["precision"], top["compile_mode"]) != (rec["precision"], rec["compile_mode"]):
            line += (f"; fastest overall: {top['precision']}, compile {top['compile_mode']} "
                     f"({top['img_s']:.1f} img/s; a bench-only compile mode)")
        lines.append(line)
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
            precision=getattr(args, "precision", None),
        )
    except LtrError as exc:
        print(f"ltr bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(format_result(result))
    return 0
