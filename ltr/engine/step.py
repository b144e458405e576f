"""The step runner: one training step's forward and backward pass, made fast without changing its maths.

The loop in ltr/train.py calls it in one line a step. What it hides: DistributedDataParallel (under
torchrun), torch.compile with its two fallbacks to eager, CUDA-graph step marking, the fused SGD
kernel, mixed precision (autocast and the fp16 gradient scaler) and the epoch's short last batch.
`ltr bench` times this same runner, so a speed it reports is the trainer's.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..errors import LtrError
from . import dist
from .precision import autocast, autocast_dtype, grad_scaler

COMPILE_MODES = ("default", "reduce-overhead")  # torch.compile modes the trainer runs

# One (images, labels) pair per loader of a job, drawn in lockstep.
Batches = tuple[tuple[torch.Tensor, torch.Tensor], ...]
# (loss, logits, targets); the logits and targets score training accuracy.
StepOut = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def check_compile_mode(mode: str) -> str:
    """The compile mode, or an LtrError naming the choices."""
    if mode not in COMPILE_MODES:
        raise LtrError(f"unknown --compile-mode {mode!r}; choose one of {' | '.join(COMPILE_MODES)}")
    return mode


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """The model on its device; channels_last on CUDA, where cuDNN's convolutions run fastest in it."""
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def make_sgd(params: Iterable[nn.Parameter], lr: float, momentum: float, weight_decay: float,
             fused: bool) -> torch.optim.SGD:
    """SGD with momentum and weight decay; the fused kernel when asked for and this torch has it."""
    kwargs = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
    params = list(params)
    if fused:
        try:
            return torch.optim.SGD(params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # an older torch without this device's fused kernel
            pass
    return torch.optim.SGD(params, **kwargs)


class StepModule(nn.Module):
    """A step's forward pass as a module: what DistributedDataParallel wraps and torch.compile compiles."""

    def __init__(self, model: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.model = model
        self.step_forward = forward

    def forward(self, *images: torch.Tensor) -> Any:
        return self.step_forward(self.model, *images)


def compile_warning(exc: BaseException, desc: str) -> str:
    """Warn that torch.compile failed and training goes on in eager mode; returns the reason."""
    why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    warnings.warn(f"torch.compile failed ({why}); training {desc or 'this run'} in eager mode instead",
                  RuntimeWarning, stacklevel=3)
    return why


def try_compile(module: nn.Module, mode: str, desc: str = "") -> nn.Module | None:
    """torch.compile(module) for one static shape in mode, or None (warned) when torch refuses at once."""
    try:
        return torch.compile(module, dynamic=False, **({} if mode == "default" else {"mode": mode}))
    except Exception as exc:  # e.g. no compiler for this Python or platform
        compile_warning(exc, desc)
        return None


class StepRunner:
    """Runs a method's step (ltr.methods.Step) on a model: forward under autocast, loss, backward, update."""

    def __init__(self, model: nn.Module, step: Any, device: torch.device, precision: str = "fp32",
                 compile: bool = False, compile_mode: str = "default", full_batch: int | None = None,
                 desc: str = "") -> None:
        self.model, self.step, self.device, self.desc = model, step, device, desc
        # Without fp16 the scaler is off: scale() returns the loss and step() is opt.step().
        self.scaler = grad_scaler(precision, device)
        self.autocast = functools.partial(autocast, device.type, autocast_dtype(precision))
        # The forward pass as ONE module call: DDP all-reduces gradient buckets during the backward pass.
        self.eager = dist.data_parallel(StepModule(model, step.forward), device)
        self.compiled = self.eager
        self.compile_error: str | None = None
        if compile:
            compiled = try_compile(self.eager, check_compile_mode(compile_mode), desc)
            if compiled is None:
                self.compile_error = "torch.compile refused the model"
            else:
                self.compiled = compiled
        # CUDA graphs (reduce-overhead) reuse their output memory on the next replay: mark each step.
        self.mark_step = (getattr(torch.compiler, "cudagraph_mark_step_begin", None)
                          if compile and compile_mode == "reduce-overhead" else None)
        # Compiled for the full batch only (one static graph): the epoch's shorter last batch runs eager,
        # with the same arithmetic, instead of a recompile or a second graph capture.
        self.full_batch = full_batch

    def optimizer(self, params: Iterable[nn.Parameter], lr: float, momentum: float,
                  weight_decay: float) -> torch.optim.SGD:
        """SGD for this runner: fused on CUDA (launches, not FLOPs, dominate at batch 64) and with fp16,
        where the fused kernel skips an inf/NaN step on the device instead of reading found_inf each step."""
        fused = self.device.type == "cuda" or self.scaler.is_enabled()
        return make_sgd(params, lr, momentum, weight_decay, fused)

    def forward_backward(self, batches: Batches) -> StepOut:
        """Forward pass, loss and backward pass of one step; (loss, logits, labels)."""
        images = self.step.inputs(batches)
        if self.compiled is not self.eager and all(len(x) == self.full_batch for x in images):
            try:
                return self._run(self.compiled, images, batches)
            except Exception as exc:
                # Compilation is lazy, so it fails here, in a compiled step: that batch runs again eager
                # (a failed forward may have moved BN statistics once).
                self.compile_error = compile_warning(exc, self.desc)
                self.compiled = self.eager
                self.model.zero_grad(set_to_none=True)
        return self._run(self.eager, images, batches)

    def _run(self, module: nn.Module, images: tuple[torch.Tensor, ...], batches: Batches) -> StepOut:
        if module is not self.eager and self.mark_step is not None:
            self.mark_step()
        with self.autocast():
            outputs = module(*images)
        # Outside autocast: BCE refuses it, and LDAM's loss reads fc's rows.
        loss, logits, y = self.step.loss(self.model, outputs, batches)
        self.scaler.scale(loss).backward()
        return loss, logits, y

    def update(self, opt: torch.optim.Optimizer) -> None:
        """The optimizer step (skipped by the fp16 scaler when a gradient is inf or NaN)."""
        self.scaler.step(opt)
        self.scaler.update()
