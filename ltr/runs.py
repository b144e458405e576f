"""Reading run directories, which Table-1 row a run is, and WB's constants that decide it.

A run directory (what ltr.train writes) holds config.json, metrics.json and, for a trained run, history.csv.
Everything here reads those files and returns plain data (dicts, DataFrames); the figures drawn from them
are ltr.plots'.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .config import PRESETS
from .engine.rundir import read_json
from .errors import LtrError

GROUPS = ("many", "medium", "few")
GROUP_TITLES = {"many": "Many", "medium": "Medium", "few": "Few", "all": "All"}

# The fixed hyperparameters of WB's Table 1 rows: a run maps to a row only when it uses them.
# (The paper's numbers themselves live in ltr.experiments, once.)
WB_STAGE1_WD = 5e-3
WB_STAGE2_WD = 0.1
WB_MAXNORM = 0.1
WB_TAU = 1.9

# The cone effect's pairs of samples: over all pairs, same-class pairs and different-class pairs.
CONE_KEYS = ("all", "same", "different")

RunLike = str | os.PathLike | dict
Runs = RunLike | Sequence[RunLike] | Mapping[str, RunLike]


def load_run(run_dir: str | os.PathLike) -> dict:
    """A finished run directory as a dict: config, metrics and the per-epoch history (or None)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise LtrError(f"{run_dir} is not a run directory (no config.json)")
    if not (run_dir / "metrics.json").is_file():
        raise LtrError(f"the run in {run_dir} is not finished (no metrics.json); rerun its command to "
                       "resume it")
    info = read_json(run_dir / "config.json")
    history = pd.read_csv(run_dir / "history.csv") if (run_dir / "history.csv").is_file() else None
    return {"run_dir": run_dir, "name": run_dir.name, "stage": info.get("stage"),
            "config": info.get("config", {}), "stage1": info.get("stage1"),
            "runtime": info.get("runtime", {}), "metrics": read_json(run_dir / "metrics.json"),
            "history": None if history is None or history.empty else history}


def ensure_loaded(run: RunLike) -> dict:
    """What load_run() returns, for a run directory or for what load_run() already returned."""
    if not isinstance(run, dict):
        return load_run(run)
    if "run_dir" in run and "metrics" in run:
        return run
    raise LtrError("a run must be a run directory or what load_run() returned")


def labelled_runs(runs: Runs, labels: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    """Normalise one run, a list of runs, or a {label: run} mapping to [(label, loaded run)]."""
    if isinstance(runs, Mapping) and not ("run_dir" in runs and "metrics" in runs):
        keys, items = list(runs.keys()), list(runs.values())
        labels = list(labels) if labels is not None else [str(k) for k in keys]
    else:
        items = [runs] if isinstance(runs, str | os.PathLike | dict) else list(runs)
    if not items:
        raise LtrError("no runs to plot")
    loaded = [ensure_loaded(r) for r in items]
    if labels is None:
        labels = [run_label(r) for r in loaded]
        if len(set(labels)) < len(labels):  # same recipe twice: tell them apart by directory name
            labels = [f"{lab} [{r['name']}]" for lab, r in zip(labels, loaded, strict=True)]
    labels = list(labels)
    if len(labels) != len(loaded):
        raise LtrError(f"{len(labels)} labels for {len(loaded)} runs")
    return list(zip(labels, loaded, strict=True))


def check_tta(tta: str) -> str:
    """tta itself when it names a test-time evaluation (plain or flip), else an LtrError."""
    if tta not in ("plain", "flip"):
        raise LtrError(f"tta must be 'plain' or 'flip', got {tta!r}")
    return tta


def _stage1_config_of(run: dict) -> dict:
    """The config of the stage-1 model behind a run: its own, or the one a stage-2 run started from."""
    return run["config"] if run["stage"] == "stage1" else (run.get("stage1") or {})


def _posthoc_label(cfg: dict) -> str | None:
    """The words of a post-hoc stage 2 (no training), or None for a trained one."""
    tau = f"{cfg.get('tau', WB_TAU):g}"
    return {"logit-adjust": f"+ logit adjustment (tau={cfg.get('la_tau', 1.0):g})",
            "mla": f"+ multiplicative logit adjustment (tau={tau})", "tau-norm": f"+ tau-norm (tau={tau})",
            "l2norm": "+ L2-norm"}.get(cfg.get("posthoc"))


def _trained_stage2_parts(cfg: dict) -> list[str]:
    """The ingredients of a retrained classifier in the paper's words, e.g. ['CB', 'WD', 'MaxNorm']."""
    parts = [str(cfg.get("loss", "ce")).upper()]
    if parts == ["CB"] and cfg.get("cb_variant") == "standard":
        parts = ["CB (weighted CE)"]  # ours; plain "CB" is WB's loss
    if cfg.get("sampling", "instance") != "instance":
        parts = ["cRT"] if cfg.get("reinit") and parts == ["CE"] else parts + ["balanced sampling"]
    return parts + [name for name, on in (("LWS", cfg.get("lws")), ("WD", cfg.get("wd")),
                                          ("MaxNorm", cfg.get("maxnorm") is not None),
                                          ("L2norm", cfg.get("unit_norm"))) if on]


def run_label(run: RunLike) -> str:
    """A short name of a run in the paper's words, e.g. 'WD=5e-3' or '+ CB & WD & MaxNorm'."""
    run = ensure_loaded(run)
    cfg, s1 = run["config"], _stage1_config_of(run)
    base = "WD=0 (naive)" if not s1.get("wd") else f"WD={s1['wd']:g}"
    if s1.get("method", "ce") == "aux-balanced":
        # docs/recipe.md §6 (our reading of Zhang et al.): balanced main head + instance auxiliary head.
        base = f"aux-balanced{' + rotation' if s1.get('ssl') else ''}, {base}"
    elif s1.get("method", "ce") == "etf-fr":
        # Hasegawa & Sato's stage 1: fixed simplex-ETF classifier and feature regularisation.
        base = f"fixed ETF + feature reg., {base}"
    if run["stage"] == "stage1":
        return base
    prefix = f"[{base}] " if s1.get("method", "ce") != "ce" else "WD=0 " if not s1.get("wd") else ""
    posthoc = _posthoc_label(cfg)
    if posthoc is not None:
        return prefix + posthoc
    if cfg.get("trainable", "fc") != "fc":
        prefix += "last two layers "
    return f"{prefix}+ {' & '.join(_trained_stage2_parts(cfg))}"


def _is_tuned_wd(s1: dict) -> bool:
    """WB's tuned weight decay, or a preset's own tuned value on that preset's backbone and schedule."""
    wd = float(s1.get("wd", 0.0))
    # The cpu preset retunes weight decay for its shorter, faster schedule: its tuned model is WB's
    # "WD tuned" row in that recipe, and only there (the same wd on another recipe is just a sweep point).
    return math.isclose(wd, WB_STAGE1_WD) or any(
        "wd" in fields and math.isclose(wd, fields["wd"]) and all(s1.get(k) == v for k, v in fields.items()
                                                                  if k != "wd")
        for fields in ({k: v for k, v in p["stage1"].items() if k != "eval_every"} for p in PRESETS.values()))


def _retrained_row(cfg: dict) -> str | None:
    """The Table 1 row of a classifier retrained on the tuned backbone with instance sampling, or None."""
    if (cfg.get("lws") or cfg.get("reinit") or cfg.get("loss", "ce") not in ("ce", "cb")
            or cfg.get("posthoc") in ("logit-adjust", "mla")):
        return None  # the comparison baselines are not rows of WB's Table 1
    if cfg.get("loss") == "cb" and cfg.get("cb_variant") == "standard":
        return None  # our weighted cross-entropy, not the class-balanced loss behind WB's rows
    if cfg.get("posthoc") == "l2norm":
        return "+ L2norm"
    wd = float(cfg.get("wd", 0.0))
    if wd and not math.isclose(wd, WB_STAGE2_WD):
        return None
    mx = cfg.get("maxnorm")
    if mx is not None and not math.isclose(float(mx), WB_MAXNORM):
        return None
    parts = [str(cfg.get("loss", "ce")).upper()] + (["WD"] if wd else [])
    parts += (["Max"] if mx is not None else []) + (["L2norm"] if cfg.get("unit_norm") else [])
    return ("last two layers " if cfg.get("trainable", "fc") != "fc" else "") + "+ " + " & ".join(parts)


def table1_row(run: RunLike) -> str | None:
    """The name of WB's Table 1 row whose recipe this run follows (CIFAR100-LT IF100), or None."""
    run = ensure_loaded(run)
    cfg, s1 = run["config"], _stage1_config_of(run)
    if (s1.get("dataset", "cifar100") != "cifar100" or float(s1.get("imbalance", 100)) != 100
            or s1.get("method", "ce") != "ce"):
        return None
    naive, tuned = float(s1.get("wd", 0.0)) == 0, _is_tuned_wd(s1)
    if run["stage"] == "stage1":
        return "WD=0 (w/ CE)" if naive else "WD tuned (w/ CE)" if tuned else None
    if cfg.get("posthoc") == "tau-norm":
        if not math.isclose(float(cfg.get("tau", WB_TAU)), WB_TAU):
            return None
        return "WD=0 + tau-norm" if naive else "+ tau-norm" if tuned else None
    if not tuned or cfg.get("sampling", "instance") != "instance":
        return None
    return _retrained_row(cfg)


def results_table(runs: Runs, labels: Sequence[str] | None = None, tta: str = "flip",
                  paper: Mapping[str, Sequence[float]] | None = None) -> pd.DataFrame:
    """Many/Medium/Few/All per run ('n/a' = empty group), beside the paper's row of the same recipe."""
    # paper maps Table 1 row names to (Many, Medium, Few, All), e.g. tables.PAPER_TABLE1; the "WB"
    # columns are filled only for a run whose recipe is that row's (table1_row), else "-".
    check_tta(tta)
    rows = []
    for label, run in labelled_runs(runs, labels):
        m = run["metrics"][tta]
        row: dict[str, Any] = {"run": label, "epochs": run["metrics"].get("epochs")}
        for g in (*GROUPS, "all"):
            row[GROUP_TITLES[g]] = "n/a" if m.get(g) is None else round(float(m[g]), 2)
        if paper is not None:
            key = table1_row(run)
            wb = paper.get(key) if key else None
            row["WB row"] = key if wb else "-"
            for i, g in enumerate((*GROUPS, "all")):
                row[f"WB {GROUP_TITLES[g]}"] = wb[i] if wb else "-"
        rows.append(row)
    return pd.DataFrame(rows).set_index("run")


# Feature analysis (Hasegawa & Sato).


def final_features(run: dict) -> dict:
    """metrics.json's `features` of a stage-1 run ({split: {fdr, cone}}), {} when it has none."""
    feats = run["metrics"].get("features") or {}
    return {split: v for split, v in feats.items() if isinstance(v, dict) and "fdr" in v}


def fdr_history(run: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, test FDR) of the evaluated epochs in history.csv, or None when it records none."""
    hist = run["history"]
    if hist is None or "test_fdr" not in hist:
        return None
    fdr = pd.to_numeric(hist["test_fdr"], errors="coerce")
    if not (keep := fdr.notna().to_numpy()).any():
        return None
    return hist["epoch"].to_numpy(dtype=float)[keep], fdr.to_numpy(dtype=float)[keep]


def has_feature_analysis(runs: Runs, labels: Sequence[str] | None = None) -> bool:
    """True when at least one of the runs records the feature analysis (history or metrics.json)."""
    return any(final_features(r) or fdr_history(r) is not None for _, r in labelled_runs(runs, labels))


def feature_table(runs: Runs, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Fisher discriminant ratio and cone effect at the end of each run: `FDR {test, train}`, `cone {all,
    same, different} {test, train}` (mean cosine of two samples' features); empty where not recorded."""
    rows = []
    for label, run in labelled_runs(runs, labels):
        feats = final_features(run)
        row: dict[str, Any] = {"run": label}
        for split in ("test", "train"):
            f = feats.get(split, {})
            row[f"FDR {split}"] = f.get("fdr")
            for k in CONE_KEYS:
                row[f"cone {k} {split}"] = (f.get("cone") or {}).get(k)
        rows.append(row)
    return pd.DataFrame(rows).set_index("run").astype(float).round(4)
