"""What a sweep varies (kinds, grids per preset, WB's values) and reading the values sweeps chose.

Below both tables.py (`table1 --tuned` reads the choices) and sweep.py (which makes them), so that
neither imports the other's way up.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import MLA_TAU, PRESETS
from ..engine.rundir import read_json
from ..errors import LtrError
from .report import fmt_number


@dataclass(frozen=True)
class SweepKind:
    """What a sweep varies: one config field of one Table 1 row's recipe."""

    name: str  # the CLI name (stage1-wd | tau | maxnorm | stage2-wd | mla-tau)
    field: str  # the Stage1Config / Stage2Config field it sets
    stage: str  # stage1 | stage2 (stage-2 kinds start from the row's stage-1 model)
    label: str  # axis label
    grid: tuple[float, ...]  # default values of a grid search (a preset's "sweeps" entry overrides it)
    paper: float  # the published value (WB's, or `source`'s)
    log: bool  # a logarithmic quantity: log x axis, log-uniform Bayesian search
    low: float  # default range of the Bayesian search (inclusive)
    high: float
    row: str  # the Table 1 (or one-stage) row whose recipe every point runs, with `field` replaced
    source: str = "WB"  # whose value `paper` is


KINDS: dict[str, SweepKind] = {
    # WB Figure 4's grid of weight decay.
    "stage1-wd": SweepKind("stage1-wd", "wd", "stage1", "stage-1 weight decay",
                           (0.0, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2), 5e-3, True, 1e-4, 2e-2,
                           "WD tuned (w/ CE)"),
    # Post-hoc, so a point costs one matrix product on cached features: a fine grid, WB's 1.9 included.
    "tau": SweepKind("tau", "tau", "stage2", "tau of tau-norm",
                     tuple(sorted({round(0.2 * i, 1) for i in range(16)} | {1.9})), 1.9, False, 0.0, 3.0,
                     "+ tau-norm"),
    "maxnorm": SweepKind("maxnorm", "maxnorm", "stage2", "MaxNorm threshold (+ CB & WD & Max)",
                         (0.02, 0.05, 0.1, 0.2, 0.5, 1.0), 0.1, True, 0.01, 1.0, "+ CB & WD & Max"),
    "stage2-wd": SweepKind("stage2-wd", "wd", "stage2", "stage-2 weight decay (+ CB & WD & Max)",
                           (0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3), 0.1, True, 1e-3, 1.0, "+ CB & WD & Max"),
    # Hasegawa & Sato's multiplicative logit adjustment of the etf-fr model: post-hoc as tau-norm, seconds.
    "mla-tau": SweepKind("mla-tau", "tau", "stage2", "tau of multiplicative logit adjustment (one-stage)",
                         tuple(sorted({round(0.1 * i, 1) for i in range(21)} | {MLA_TAU})), MLA_TAU, False,
                         0.0, 2.0, "Hasegawa & Sato one-stage (our implementation)", "Hasegawa & Sato"),
}
SWEEP_FILE = "sweep.json"  # what `table1 --tuned` reads


def get_kind(kind: str) -> SweepKind:
    """The SweepKind of a CLI name, or an LtrError listing them."""
    if kind not in KINDS:
        raise LtrError(f"unknown sweep {kind!r}; choose one of {', '.join(KINDS)}")
    return KINDS[kind]


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise LtrError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")


def sweep_grid(kind: str, preset: str) -> tuple[float, ...]:
    """The values a preset sweeps by default: its own grid (PRESETS[preset]["sweeps"]) or the kind's."""
    k = get_kind(kind)
    check_preset(preset)
    return tuple(PRESETS[preset].get("sweeps", {}).get(k.name, k.grid))


def read_tuned(sweep_dirs: Sequence[str | os.PathLike], preset: str, dataset: str,
               imbalances: Sequence[float]) -> dict[str, tuple[float, dict, Path]]:
    """The value each sweep chose, by kind: (value, its sweep.json, its folder); LtrError on a mismatch."""
    chosen: dict[str, tuple[float, dict, Path]] = {}
    for d in sweep_dirs:
        path = Path(d) / SWEEP_FILE
        if not path.exists():
            raise LtrError(f"--tuned {d}: no {SWEEP_FILE} there; run `python -m ltr sweep ...` first (its "
                           "folder is out/sweep-KIND)")
        info = read_json(path)
        if (info["preset"], info["dataset"]) != (preset, dataset):
            raise LtrError(f"--tuned {d} was swept with --preset {info['preset']} on {info['dataset']}, this "
                           f"table is --preset {preset} on {dataset}: sweep in the table's recipe")
        if float(info["imbalance"]) not in [float(i) for i in imbalances]:
            raise LtrError(f"--tuned {d} was swept at imbalance factor {info['imbalance']:g}, which this "
                           f"table does not have ({', '.join(f'{i:g}' for i in imbalances)})")
        if info["kind"] in chosen:
            raise LtrError(f"--tuned names two {info['kind']} sweeps ({chosen[info['kind']][2]} and {d}); "
                           "keep one")
        chosen[info["kind"]] = (float(info["chosen"]), info, Path(d))
    return chosen


# What each kind's chosen value replaces in Table 1 (tables.tune_rows applies it).
APPLIES = {"stage1-wd": "the tuned-weight-decay backbone and every row on it",
           "tau": "the tau-norm row on the tuned-weight-decay backbone",
           "maxnorm": "every MaxNorm row", "stage2-wd": "every row with stage-2 weight decay",
           "mla-tau": "every multiplicative-logit-adjustment row (the one-stage recipe)"}


def tuned_header(chosen: dict[str, tuple[float, dict, Path]], preset: str) -> str:
    """The markdown header of a tuned table: each chosen value, WB's, the preset's, and its sweep."""
    lines = ["**Tuned on validation (`ltr sweep`), not the paper's values.** Rows keep WB's names; WB's "
             "columns are the paper's numbers with the paper's values.", ""]
    for name, (v, info, d) in chosen.items():
        k = KINDS[name]
        lines.append(f"- {k.label}: **{v:g}** ({k.source}: {k.paper:g}; preset `{preset}`: "
                     f"{info['preset_value']:g}) for {APPLIES[name]}, chosen on validation by `{d}` "
                     f"(held-out All {fmt_number(info.get('heldout_chosen'))} vs "
                     f"{fmt_number(info.get('heldout_paper'))} with {k.source}'s value)")
    return "\n".join(lines) + "\n\n"
