"""ltr: long-tailed recognition via weight balancing (Alshammari et al., CVPR 2022)."""

__version__ = "0.1.0"

from .data import load_cifar_lt  # noqa: E402
from .errors import DataError, LtrError  # noqa: E402
from .experiments.sweep import run_sweep  # noqa: E402
from .experiments.tuning import sweep_grid  # noqa: E402
from .train import (  # noqa: E402
    Stage1Config,
    Stage2Config,
    preset_config,
    stage2_from,
    train_stage1,
    train_stage2,
)

__all__ = [
    "DataError",
    "LtrError",
    "Stage1Config",
    "Stage2Config",
    "load_cifar_lt",
    "preset_config",
    "run_sweep",
    "stage2_from",
    "sweep_grid",
    "train_stage1",
    "train_stage2",
]
