"""Sweep kinds and per-preset grids (ltr.experiments.tuning); the import layering is test_layering's."""

from __future__ import annotations

from dataclasses import asdict

import pytest

from ltr.config import PRESETS, Stage1Config, Stage2Config, preset_config
from ltr.data import LtrError
from ltr.experiments.tuning import KINDS, sweep_grid


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_full_presets_sweep_the_full_grids(preset: str) -> None:
    assert sweep_grid("stage1-wd", preset) == (0.0, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2)  # WB Fig. 4
    assert all(sweep_grid(k.name, preset) == k.grid for k in KINDS.values())


@pytest.mark.parametrize("preset", ["smoke", "tiny"])
def test_quick_presets_sweep_three_points_with_wb_value(preset: str) -> None:
    for k in KINDS.values():
        grid = sweep_grid(k.name, preset)
        assert len(grid) == 3 and list(grid) == sorted(set(grid)) and k.paper in grid, (k.name, grid)
    # The naive and tuned backbones of notebook 1 / Table 1 are two of the stage-1 points.
    wd = preset_config("stage1", preset).wd
    assert {0.0, wd} <= set(sweep_grid("stage1-wd", preset))


def test_grids_stay_out_of_the_stage_configs() -> None:
    # A run's config.json is asdict(config): a new field would make every existing run clash.
    for preset in PRESETS:
        for stage, cls in (("stage1", Stage1Config), ("stage2", Stage2Config)):
            assert set(asdict(preset_config(stage, preset))) == set(asdict(cls()))
    assert "sweeps" not in asdict(Stage1Config()) and "sweeps" not in asdict(Stage2Config())


def test_unknown_preset_is_an_ltr_error() -> None:
    with pytest.raises(LtrError, match="unknown preset"):
        sweep_grid("tau", "huge")
