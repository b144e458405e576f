"""`ltr bench`: training-step throughput of ltr's path against a plain reference loop.

What it measures: images per second of full training steps (forward, cross-entropy loss,
backward, SGD with momentum 0.9 and weight decay) of the same model architecture, at the same
batch size, on the same images, in the same process, after warm-up steps, along two paths:

- ltr: the trainer's own step runner (`ltr.engine.step.StepRunner`, built as `ltr.train.fit`
  builds it, with the plain cross-entropy step `ltr.methods.plain_step`), each step exactly
  fit's `opt.zero_grad(set_to_none=True); runner.forward_backward(batches); runner.update(opt)`,
  without the lr schedule: the training set kept whole on the device as uint8
  (`ltr.data.DeviceLoader`), random crop + flip + normalisation done there, loss statistics
  accumulated on the device (no host sync in the step loop), and whatever the runner does
  (autocast, fp16 GradScaler, fused SGD, channels_last on CUDA, torch.compile and its fallback to
  eager). ltr's path is timed once per variant: every precision and compile mode asked for (the
  trainer's modes; by default on CUDA: fp32, fp16, bf16 where the GPU has it, eager, plus compile
  modes default and reduce-overhead (CUDA graphs) at the precision `auto` picks; on CPU fp32
  eager). A compile failure falls back to eager and is reported. The fastest variant is printed
  as the recommended trainer flags.
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

`benchmark` returns plain JSON types: `variants` (per variant: precision, compile_mode, img_s,
step_ms, est_mfu, peak_source, train_loss, settings, and on CUDA peak_mem_mib), `recommended` (the
fastest variant and the trainer flags that run it), reference_img_s, reference_step_ms, and for the
fastest variant the keys of one ltr path: ltr_img_s, ltr_step_ms, ratio (= ltr / reference),
ltr_settings, est_mfu (None on CPU); plus device, model, batch_size, steps, warmup, data, synthetic,
threads and the load averages before and after.
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
from ..engine.precision import PRECISIONS, native_bf16, resolve_precision, set_backend_flags
from ..engine.step import COMPILE_MODES as TRAINER_COMPILE_MODES
from ..engine.step import StepRunner, prepare_model
from ..losses import cross_entropy
from ..methods import plain_step
from ..models import MODELS, build_model

# The recipe's step (docs/recipe.md §3): lr 0.01, momentum 0.9, weight decay 5e-3 (the WD-tuned row).
LR = 0.01
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-3
# Defaults per device: CPU steps are seconds each for resnet34, GPU steps milliseconds.
DEFAULT_STEPS = {"cpu": 10, "cuda": 200}
DEFAULT_WARMUP = {"cpu": 2, "cuda": 30}
# Eager plus the trainer's torch.compile modes (engine.step.COMPILE_MODES): every variant is one it can run.
COMPILE_MODES = ("none", *TRAINER_COMPILE_MODES)
# The trainer's flags that run each mode.
TRAINER_FLAGS = {"none": "", "default": " --compile", "reduce-overhead": " --compile-mode reduce-overhead"}
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
    """Forward FLOPs of one input of input_shape, counted by FlopCounterMode: {"macs": ..., "flops": ...}."""
    # One forward pass in eval mode (no gradient, BN statistics untouched); the counter adds the FLOPs
    # of every matrix product and convolution (2 per multiply-accumulate), for the whole input (divide
    # by input_shape[0] for one image). A training step costs about 3x the forward (the backward pass
    # is two products of the same size), which is what `benchmark` uses for MFU. A model built under
    # `torch.device("meta")` is counted without doing the arithmetic.
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
    """(uint8 N x 3 x 32 x 32, labels, classes, description, synthetic?): CIFAR100-LT IF100 or its like."""
    # CIFAR100-LT IF100 when root holds cifar-100-python/, else random images with its exact class
    # profile (10,847 images), made in memory.
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


def _synchronize(dev: torch.device) -> None:
    """Wait for the GPU's queued work (nothing on CPU), so a timer reads finished steps."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _allocated_bytes(dev: torch.device) -> int:
    """Bytes the CUDA caching allocator has handed out on dev (0 on CPU)."""
    return torch.cuda.memory_allocated(dev) if dev.type == "cuda" else 0


class _TimedPath:
    """One way of training, built and warmed up once, then timed in one or more chunks."""

    # Memory (CUDA): `resident` = bytes this path holds after its warm-up (model, optimizer state,
    # data on the device, graph pools); `peak` = resident + the largest extra allocation seen
    # during its timed chunks. Both paths live side by side when the chunks alternate, so a
    # plain max_memory_allocated would mix them up.

    def __init__(self, dev: torch.device, precision: str = "fp32") -> None:
        self.dev = dev
        self.flags_precision = precision  # the trainer's CUDA backend flags for this precision
        self.seconds = 0.0
        self.done = 0
        self.resident = 0
        self.extra_peak = 0

    def step(self) -> None:  # pragma: no cover - overridden
        """One training step."""
        raise NotImplementedError

    def start_chunk(self) -> None:
        """Called inside the timed region before a chunk's steps (nothing by default)."""

    def warm(self, n: int) -> None:
        """Untimed steps; records the memory this path holds afterwards."""
        set_backend_flags(self.dev, self.flags_precision)
        before = _allocated_bytes(self.dev)
        for _ in range(n):
            self.step()
        _synchronize(self.dev)
        self.resident += _allocated_bytes(self.dev) - before

    def timed(self, n: int) -> None:
        """n steps, synchronised on CUDA around the timed region only."""
        set_backend_flags(self.dev, self.flags_precision)
        if self.dev.type == "cuda":
            base = torch.cuda.memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        _synchronize(self.dev)
        t0 = time.perf_counter()
        self.start_chunk()
        for _ in range(n):
            self.step()
        _synchronize(self.dev)
        self.seconds += time.perf_counter() - t0
        self.done += n
        if self.dev.type == "cuda":
            extra = torch.cuda.max_memory_allocated(self.dev) - base
            self.extra_peak = max(self.extra_peak, extra)

    @property
    def peak_mib(self) -> float:
        """Resident plus the largest extra allocation of a timed chunk, in MiB (0 on CPU)."""
        return round((self.resident + self.extra_peak) / 2**20, 1)


class _Reference(_TimedPath):
    """DataLoader over PIL images + torchvision transforms, fp32, eager, `.item()` bookkeeping."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, model_name: str,
                 dev: torch.device, batch_size: int, workers: int) -> None:
        super().__init__(dev)
        before = _allocated_bytes(dev)
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
        self.resident = _allocated_bytes(dev) - before

    def start_chunk(self) -> None:
        """With worker processes, start a fresh pass inside the timed region."""
        # Batches the workers prefetched while the other path ran are thrown away, not counted as free.
        if self.loader.num_workers > 0:
            self.batches = iter(self.loader)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch, starting a new epoch when one ends."""
        try:
            return next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> None:
        """The tutorial step: to device, forward, loss, backward, SGD, `.item()` bookkeeping."""
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


def _optimizer_name(opt: torch.optim.Optimizer, dev: torch.device) -> str:
    """Which SGD kernel opt runs: fused, foreach (torch's default on CUDA) or the per-parameter loop."""
    if opt.defaults.get("fused"):
        return "SGD fused"
    return "SGD foreach" if opt.defaults.get("foreach") or dev.type == "cuda" else "SGD for-loop"


def _is_channels_last(model: nn.Module) -> bool:
    """True when every 4-D weight of model is laid out channels_last."""
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights)


class _TrainerPath(_TimedPath):
    """The trainer's own step (engine.step.StepRunner, plain cross-entropy) on DeviceLoader batches."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int, model_name: str,
                 dev: torch.device, batch_size: int, compile_mode: str, precision: str = "fp32") -> None:
        super().__init__(dev, precision)
        before = _allocated_bytes(dev)
        self.loader = DeviceLoader(images, labels, batch_size, dev, seed=0, num_classes=num_classes)
        self.batches = self._full_batches()
        self.precision, self.compile_mode = precision, compile_mode
        torch.manual_seed(0)
        model = prepare_model(build_model(model_name, num_classes), dev)  # as _train_stage1
        model.train()
        # As fit() builds it (one process: the full batch is the loader's), without the lr schedule.
        compiled = compile_mode != "none"
        self.runner = StepRunner(model, plain_step(cross_entropy), dev, precision, compiled,
                                 compile_mode if compiled else "default", full_batch=batch_size,
                                 desc=f"bench variant {precision}, {compile_mode}")
        self.opt = self.runner.optimizer(model.parameters(), LR, MOMENTUM, WEIGHT_DECAY)
        self.loss_sum = torch.zeros((), device=dev)
        self.correct = torch.zeros((), device=dev, dtype=torch.long)
        self.seen = 0
        self.input_channels_last: bool | None = None
        self.resident = _allocated_bytes(dev) - before

    @property
    def compile_error(self) -> str | None:
        """Why torch.compile failed (the step then ran eager), else None."""
        return self.runner.compile_error

    @property
    def settings(self) -> dict:
        """How this variant trained; compile_mode is what was timed ("none" after a compile failure)."""
        settings = {
            "precision": self.precision,
            "channels_last": _is_channels_last(self.runner.model),
            "optimizer": _optimizer_name(self.opt, self.dev),
            "compile_mode": "none" if self.compile_error is not None else self.compile_mode,
        }
        if self.input_channels_last is not None:
            settings["input_channels_last"] = self.input_channels_last
        return settings

    def _full_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless full batches only: one static shape for compile and CUDA graphs, as the reference."""
        while True:
            for x, y in self.loader:
                if len(y) == self.loader.batch_size:
                    yield x, y

    def step(self) -> None:
        """The trainer's step, as fit() runs it: zero_grad, forward_backward, update."""
        batches = (next(self.batches),)
        if self.input_channels_last is None:  # a stride check, no device sync
            x = batches[0][0]
            self.input_channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        self.opt.zero_grad(set_to_none=True)
        loss, logits, y = self.runner.forward_backward(batches)
        self.runner.update(self.opt)
        # On the device, as the trainer does: reading a number here would stall the GPU.
        self.loss_sum += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def timed(self, n: int) -> None:
        """n timed steps; discards the timing so far when torch.compile fails inside them."""
        failed_before = self.compile_error is not None
        super().timed(n)
        if self.compile_error is not None and not failed_before:
            # The runner fell back to eager mid-chunk (no warm-up steps compiled it first): those steps
            # mixed compiling, a failure and eager ones; the driver loop times them again, all eager.
            self.seconds, self.done, self.extra_peak = 0.0, 0, 0


def _load_avg() -> float | None:
    """The 1-minute load average (other processes competing for the CPU), where the OS has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


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
    """(precision, compile mode) of each ltr variant to time."""
    # Asked-for precisions and modes are timed in every combination. By default every precision runs
    # eager, and on CUDA DEFAULT_CUDA_COMPILED's modes are added at the precision `auto` picks, so that
    # compiling (a minute or so each) happens at most twice; compile modes asked for without precisions
    # likewise run at the auto precision only.
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


def _checked_plan(model: str, device: str | torch.device, steps: int | None, batch_size: int,
                  warmup: int | None, workers: int | None, rounds: int | None) -> dict:
    """The device and step counts of a run, defaults filled in per device; LtrError for bad values."""
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
    if steps < 1 or warmup < 0 or batch_size < 1 or workers < 0 or rounds < 1:
        raise LtrError(
            "need --steps >= 1, --warmup >= 0, --batch-size >= 1, --workers >= 0 and rounds >= 1 "
            f"(got {steps}, {warmup}, {batch_size}, {workers}, {rounds})"
        )
    return {"dev": dev, "kind": kind, "steps": steps, "warmup": warmup, "rounds": rounds, "workers": workers}


def _run_paths(ref: _Reference, variants: list[_TrainerPath], steps: int, rounds: int) -> None:
    """Time every path for `steps` steps, in `rounds` chunks that take turns (reference first)."""
    paths: list[_TimedPath] = [ref, *variants]
    chunk = -(-steps // rounds)
    while any(path.done < steps for path in paths):
        for path in paths:
            n = min(chunk, steps - path.done)
            if n > 0:
                path.timed(n)


def _variant_record(v: _TrainerPath, n_img: int, steps: int, train_flops: float,
                    peak: tuple[float | None, str], cuda: bool) -> dict:
    """One variant's timing, MFU estimate, loss and settings, in plain JSON types."""
    peak_flops, source = peak
    rec = {
        "precision": v.precision,
        "compile_mode": v.settings["compile_mode"],  # what was timed (eager after a compile failure)
        "img_s": round(n_img / v.seconds, 2),
        "step_ms": round(1000 * v.seconds / steps, 3),
        "est_mfu": round(train_flops / v.seconds / peak_flops, 5) if peak_flops else None,
        "peak_source": source,
        "train_loss": round(float(v.loss_sum) / max(v.seen, 1), 4),
        "settings": v.settings,
    }
    if v.compile_error is not None:
        rec["compile_error"] = v.compile_error
    if cuda:
        rec["peak_mem_mib"] = v.peak_mib
    return rec


def _summary(records: list[dict], variants: list[_TrainerPath], ref: _Reference, n_img: int, steps: int,
             train_flops: float, ref_peak: float | None, cuda: bool) -> dict:
    """The fastest variant against the reference: recommendation, ratio, the keys of one ltr path."""
    best_i = max(range(len(records)), key=lambda i: records[i]["img_s"])
    best, fastest = records[best_i], variants[best_i]
    out: dict = {
        # Every variant runs the trainer's StepRunner in a mode the trainer has: the fastest is runnable.
        "recommended": {
            "precision": best["precision"],
            "compile_mode": best["compile_mode"],
            "img_s": best["img_s"],
            "trainer_flags": f"--precision {best['precision']}" + TRAINER_FLAGS[best["compile_mode"]],
        },
        # The fastest variant under the keys of a single ltr path (what earlier versions reported).
        "ltr_settings": best["settings"],
    }
    errors = [r["compile_error"] for r in records if "compile_error" in r]
    if errors:
        out["compile_error"] = errors[0]
    out.update({
        "ltr_img_s": best["img_s"],
        "reference_img_s": round(n_img / ref.seconds, 2),
        "ratio": round(ref.seconds / fastest.seconds, 4),
        "ltr_step_ms": best["step_ms"],
        "reference_step_ms": round(1000 * ref.seconds / steps, 3),
        "ltr_train_loss": best["train_loss"],
        "reference_train_loss": round(ref.running_loss / max(ref.seen, 1), 4),
        "est_mfu": best["est_mfu"],
        "reference_est_mfu": round(train_flops / ref.seconds / ref_peak, 5) if ref_peak else None,
        "peak_source": best["peak_source"],
    })
    if cuda:
        out.update({"ltr_peak_mem_mib": best["peak_mem_mib"], "reference_peak_mem_mib": ref.peak_mib,
                    "peak_mem_mib": best["peak_mem_mib"]})
    return out


def _run_header(plan: dict, model: str, batch_size: int, data_desc: str, synthetic: bool,
                fwd_flops: int, gpu: str | None) -> dict:
    """What was run, where, and how busy the machine was before it: the result's first keys."""
    dev = plan["dev"]
    header: dict = {
        "model": model,
        "device": str(dev) if plan["kind"] == "cpu" else f"cuda ({gpu})",
        "batch_size": int(batch_size),
        "steps": plan["steps"],
        "warmup": plan["warmup"],
        "rounds": plan["rounds"],
        "data": data_desc,
        "synthetic": synthetic,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "reference_workers": plan["workers"],
        "fwd_gmacs_per_image": round(fwd_flops / 2 / 1e9, 4),
        "train_gflops_per_image": round(3 * fwd_flops / 1e9, 4),
        "cpu_count": os.cpu_count(),
        "load_avg_before": _load_avg(),
        "auto_precision": resolve_precision("auto", dev),
    }
    if gpu is not None:
        header["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(dev)))
    return header


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
    """Time `steps` steps of each ltr variant (bench_variants) and of the reference, after `warmup` each."""
    # The timed steps are split into `rounds` chunks that take turns between the paths (reference,
    # variant 1, variant 2, ...), so a change in machine load during the run hits all alike (default:
    # 1 round on CUDA; on CPU one step a round). The result's keys: see the module docstring.
    plan = _checked_plan(model, device, steps, batch_size, warmup, workers, rounds)
    dev, steps = plan["dev"], plan["steps"]
    cuda = plan["kind"] == "cuda"
    pairs = bench_variants(precision, compile_mode, dev)
    images, labels, num_classes, data_desc, synthetic = bench_data(root)
    if batch_size > len(labels):
        raise LtrError(f"--batch-size {batch_size} exceeds the {len(labels)} training images")
    with torch.device("meta"):  # shapes only: no memory, no arithmetic
        fwd_flops = estimate_flops(build_model(model, num_classes), (1, 3, 32, 32))["flops"]
    gpu = torch.cuda.get_device_name(dev) if cuda else None
    result = _run_header(plan, model, batch_size, data_desc, synthetic, fwd_flops, gpu)
    # Every path runs under the trainer's backend flags for its precision (engine.precision.set_backend_flags:
    # cuDNN's autotuner for all, which most LTR repos set too); the caller's flags come back at the end.
    flags_before = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    ref = None
    variants: list[_TrainerPath] = []
    try:
        ref = _Reference(images, labels, num_classes, model, dev, batch_size, plan["workers"])
        ref.warm(plan["warmup"])
        for prec, mode in pairs:
            variant = _TrainerPath(images, labels, num_classes, model, dev, batch_size, mode, prec)
            variant.warm(plan["warmup"])
            variants.append(variant)
        _run_paths(ref, variants, steps, plan["rounds"])
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = flags_before
        if ref is not None:
            ref.close()
    result["load_avg_after"] = _load_avg()
    n_img = steps * batch_size
    train_flops = 3 * fwd_flops * n_img  # backward ~ 2x forward

    def peak_of(prec: str) -> tuple[float | None, str]:
        """The assumed peak FLOP/s of prec here, and where it comes from."""
        if not cuda:
            return None, "no peak table for CPUs"
        if peak_tflops is not None:
            return peak_tflops * 1e12, f"{peak_tflops:g} TFLOP/s (given by --peak-tflops)"
        return gpu_peak(gpu, prec)

    records = [_variant_record(v, n_img, steps, train_flops, peak_of(v.precision), cuda) for v in variants]
    result["variants"] = records
    # The reference trains in fp32.
    result.update(_summary(records, variants, ref, n_img, steps, train_flops, peak_of("fp32")[0], cuda))
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


def _variant_description(s: dict) -> str:
    """What differs between variants, in words: precision, compile mode, optimizer kernel."""
    mode = s.get("compile_mode", "none")
    return ", ".join([
        s.get("precision", "fp32") + (" + GradScaler" if s.get("precision") == "fp16" else ""),
        "eager" if mode == "none" else f"compile {mode}",
        s.get("optimizer", "SGD"),
    ])


def _shared_description(s: dict) -> str:
    """What every variant shares, in words."""
    how = ["trainer's StepRunner", "data on device as uint8, on-device crop/flip/normalize"]
    if s.get("channels_last"):
        how.append("channels_last model")
    elif s.get("input_channels_last"):
        how.append("channels_last input (as augment lays it out)")
    return ", ".join(how)


def _percent(v: float | None) -> str:
    """An MFU as a percentage, or n/a."""
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _busy_notes(r: dict) -> list[str]:
    """Warnings for a result measured on a busy machine."""
    loads = [v for v in (r.get("load_avg_before"), r.get("load_avg_after")) if v is not None]
    if not (loads and r.get("cpu_count") and max(loads) > 0.5 * r["cpu_count"] + 1):
        return []
    notes = [f"  note: the machine was busy (load average up to {max(loads):.1f} on {r['cpu_count']} cores): "
             "absolute numbers are noisy; the alternating rounds keep the ratio fair"]
    if r.get("threads", 1) > 1 and (r.get("omp_wait_policy") or "").upper() != "PASSIVE":
        notes.append("  note: OpenMP threads spin while they wait, which collapses throughput when "
                     "other processes share the cores; set OMP_WAIT_POLICY=PASSIVE (before Python "
                     "starts) or use fewer threads")
    return notes


def format_result(r: dict) -> str:
    """The human-readable report of a benchmark result."""
    ref_how = (f"DataLoader + PIL + torchvision transforms, {r['reference_workers']} workers, "
               "fp32, eager, SGD default")
    lines = [
        f"ltr bench: {r['model']}, batch {r['batch_size']}, {r['steps']} timed steps after "
        f"{r['warmup']} warm-up steps per path ({r['rounds']} alternating rounds), "
        f"device {r['device']}, "
        f"{r['threads']} CPU threads, torch {r['torch']}",
        f"  data: {r['data']}",
        f"  ltr ({_shared_description(r.get('ltr_settings', {}))}):",
        f"    {'variant':48s} {'img/s':>10s} {'ms/step':>9s} {'est. MFU':>9s}",
    ]
    for v in r.get("variants", []):
        lines.append(f"    {_variant_description(v['settings']):48s} {v['img_s']:10.1f} {v['step_ms']:9.2f} "
                     f"{_percent(v['est_mfu']):>9s}")
        if "compile_error" in v:
            lines.append(f"      torch.compile failed, timed in eager mode: {v['compile_error']}")
    lines.append(f"  reference : {r['reference_img_s']:10.1f} img/s  {r['reference_step_ms']:9.2f} ms/step  "
                 f"est. MFU {_percent(r.get('reference_est_mfu'))}  ({ref_how})")
    if "ltr_peak_mem_mib" in r:
        lines.append(f"  peak GPU memory: fastest ltr variant {r['ltr_peak_mem_mib']:.0f} MiB, "
                     f"reference {r['reference_peak_mem_mib']:.0f} MiB")
    lines.append(f"  ratio ltr / reference: {r['ratio']:.2f}x (fastest variant; both measured in this run)")
    lines.append(f"  est. MFU = {r['train_gflops_per_image']:.3f} GFLOP/image/step (3 x forward, counted by "
                 f"FlopCounterMode) x img/s / peak of its precision; fastest's: {r['peak_source']}")
    rec = r.get("recommended")
    if rec:
        mode = "eager" if rec["compile_mode"] == "none" else "compile " + rec["compile_mode"]
        lines.append(f"  recommended for the trainer: {rec['trainer_flags']} (the fastest variant: "
                     f"{rec['precision']}, {mode}; --precision auto picks {r['auto_precision']} "
                     "on this device)")
    return "\n".join(lines + _busy_notes(r))


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
