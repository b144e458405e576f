"""Training precision by device: the auto choice, autocast dtypes, and the fp16 gradient scaler."""

from __future__ import annotations

import warnings

import torch

from ..errors import LtrError

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
# Compute capability from which a GPU has bfloat16 tensor cores (Ampere: A100, RTX 30xx, and later).
# Below it (T4 = 7.5, V100 = 7.0) bf16 runs emulated, slower than fp16; fp16 needs a GradScaler.
BF16_CAPABILITY = (8, 0)


def check_precision(precision: str) -> str:
    """The precision name, or an LtrError naming the choices."""
    if precision not in PRECISIONS:
        raise LtrError(f"unknown --precision {precision!r}; choose one of {' | '.join(PRECISIONS)}")
    return precision


def native_bf16(device: torch.device) -> bool:
    """True when the CUDA device has bf16 arithmetic in hardware (compute capability >= 8.0)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return tuple(torch.cuda.get_device_capability(device)) >= BF16_CAPABILITY


def resolve_precision(precision: str, device: torch.device, fidelity: str = "corrected") -> str:
    """The precision a run trains in: auto = bf16 on GPUs with native bf16, fp16 on older GPUs, else fp32.

    fidelity "official" trains in fp32, as the official code does. An explicit bf16 or fp16 is honoured on
    any device (CPU autocast has both; the tests train fp16 on CPU), with a warning for emulated bf16.
    """
    check_precision(precision)
    if fidelity == "official":
        if precision not in ("auto", "fp32"):
            raise LtrError(f"--fidelity official reproduces the official code, which trains in fp32; drop "
                           f"--precision {precision} (or pass --precision fp32)")
        return "fp32"
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if native_bf16(device) else "fp16"
    if precision == "bf16" and device.type == "cuda" and not native_bf16(device):
        warnings.warn(f"{torch.cuda.get_device_name(device)} has no bf16 arithmetic (compute capability "
                      f"below {BF16_CAPABILITY[0]}.{BF16_CAPABILITY[1]}): bf16 runs emulated and slowly; "
                      "--precision fp16 (or auto) is the fast choice here", stacklevel=2)
    return precision


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a resolved precision; None for fp32 (no autocast)."""
    return DTYPES[precision]


def autocast(device_type: str, dtype: torch.dtype | None) -> torch.autocast:
    """torch.autocast to dtype on a device type; a disabled one for None (fp32)."""
    return torch.autocast(device_type, dtype=dtype if dtype is not None else torch.bfloat16,
                          enabled=dtype is not None)


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled for fp16 only: its 5 exponent bits underflow small gradients without scaling."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def set_backend_flags(device: torch.device, precision: str) -> dict:
    """Set the CUDA backend flags the trainer and `ltr bench` share; returns them (nothing on CPU).

    cudnn.benchmark: a fixed input shape every step, so cuDNN's autotuner pays for itself after the
    first steps. TF32 matmuls only under a half precision: there the few fp32 products left outside
    autocast lose nothing that matters, while an fp32 run keeps torch's default (fp32 matmuls, TF32
    convolutions), which is what the official code ran with.
    """
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = precision in ("bf16", "fp16")
    return {"cudnn_benchmark": True, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_conv": torch.backends.cudnn.allow_tf32}
