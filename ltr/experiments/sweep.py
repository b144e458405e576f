"""Tune on validation, never on test: one hyperparameter swept over a grid or by Bayesian optimisation.

WB tune their weight decay with Bayesian optimisation (their Figure 4 plots accuracy against it); the
official code hard-codes 5e-3. Here every point of a sweep is an ordinary run directory in the same
folder as Table 1's runs (`out/stage1/...`, `out/stage2/...`), so a point Table 1 already trained is
reused and an interrupted sweep resumes. The value is chosen on the validation split (the first 20 test
images of each class); the held-out split (the other 80) reports how good that choice is, beside the
paper's value. The test set as a whole chooses nothing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pandas as pd

from ..config import preset_config
from ..data import VAL_PER_CLASS, load_cifar_lt, resolve_device
from ..engine.precision import check_precision
from ..engine.rundir import read_json, write_atomic, write_json
from ..errors import LtrError
from .jobs import check_jobs
from .report import GROUPS, SYNTHETIC_WARNING, fmt_number, md_line, mean_std_text, preset_warning, tta_words
from .tables import ONE_STAGE_ROW, TABLE1_ROWS, PlannedRun, Row, claim_out_dir, plan_row, train_runs
from .tuning import SWEEP_FILE, SweepKind, get_kind, sweep_grid

# Rows a sweep may run: WB's Table 1 and the one-stage row of `ltr compare`.
SWEEP_ROWS: tuple[Row, ...] = (*TABLE1_ROWS, ONE_STAGE_ROW)
SEARCHES = ("grid", "bayes")


def check_values(kind: SweepKind, values: Sequence[float] | None, preset: str = "paper") -> list[float]:
    """The sorted, distinct values of a sweep (the preset's grid for None), or an LtrError naming one."""
    grid = sweep_grid(kind.name, preset)
    if values is None:
        return list(grid)
    if not (vals := [float(v) for v in values]):
        raise LtrError(f"--values is empty: give at least one {kind.label} (default grid: "
                       f"{' '.join(f'{v:g}' for v in grid)})")
    for v in vals:
        if not math.isfinite(v):
            raise LtrError(f"--values holds {v}: every {kind.label} must be a finite number")
        if kind.field == "maxnorm" and not 0 < v <= 1:
            raise LtrError(f"MaxNorm threshold {v:g} is outside (0, 1]: thresholds are norms of unit-scale "
                           "rows (WB: 0.1)")
        if v < 0:
            raise LtrError(f"{'weight decay' if kind.field == 'wd' else kind.label} must be >= 0, got {v:g}")
    return sorted(set(vals))


def preset_value(kind: SweepKind, preset: str) -> float:
    """The value a preset's Table 1 uses (the cpu preset tunes its own stage-1 weight decay)."""
    if kind.stage == "stage1":
        return float(getattr(preset_config("stage1", preset), kind.field))
    return float(_swept_row(kind).stage2[kind.field])


def _swept_row(kind: SweepKind) -> Row:
    return next(r for r in SWEEP_ROWS if r.name == kind.row)


@dataclass(frozen=True)
class Point:
    """One (value, seed) of a sweep and the run directory that answers it."""

    value: float  # the swept field's value
    seed: int  # random seed
    run: PlannedRun  # the run to train (or reuse)


def plan_points(kind: SweepKind, values: Sequence[float], out: Path, preset: str, seeds: Sequence[int],
                imbalance: float, dataset: str = "cifar100",
                from_run: str | os.PathLike | None = None) -> tuple[list[PlannedRun], list[Point]]:
    """Every run a sweep needs (stage-1 backbones first, shared) and its points; run directories are
    named as stage1 / stage2 / table1 name them, so finished ones are reused."""
    runs: dict[Path, PlannedRun] = {}
    points = []
    row, stage1 = _swept_row(kind), kind.stage == "stage1"
    base = None if stage1 else from_run  # --from is for stage-2 sweeps only
    for seed in seeds:
        for v in values:
            swept = (replace(row, stage1_fields={**row.stage1_fields, kind.field: v}) if stage1
                     else replace(row, stage2={**row.stage2, kind.field: v}))
            target = plan_row(runs, swept, out, preset, imbalance, seed, dataset, base)
            points.append(Point(v, seed, runs[target]))
    return sorted(runs.values(), key=lambda r: r.stage), points


def point_records(points: Sequence[Point], tta: str = "flip", trial: int | None = None) -> list[dict]:
    """One record per finished point: value, seed, run, then validation and held-out accuracy by group."""
    records = []
    for p in points:
        if not (p.run.out / "metrics.json").exists():
            continue
        m = read_json(p.run.out / "metrics.json")
        rec: dict = {"value": p.value, "seed": p.seed, "run": str(p.run.out)}
        rec.update({} if trial is None else {"trial": trial})
        rec.update({f"{split}_{g}": m[split][tta][g] for split in ("val", "heldout") for g in GROUPS})
        records.append({**rec, "synthetic_data": bool(m.get("synthetic_data"))})
    return records


def summarize(points: pd.DataFrame) -> pd.DataFrame:
    """Mean (and std, n) over seeds of every split and group, one row per value, sorted by value."""
    cols = [f"{s}_{g}" for s in ("val", "heldout") for g in GROUPS]
    agg = points.groupby("value")[cols].agg(["mean", "std", "count"])
    agg.columns = [f"{c}_{stat}" if stat != "count" else f"{c}_n" for c, stat in agg.columns]
    agg = agg.reset_index().sort_values("value", ignore_index=True)
    agg["seeds"] = agg["val_all_n"].astype(int)
    return agg


def choose(summary: pd.DataFrame, seeds: int | None = None) -> float:
    """The value with the best mean validation All (never the held-out columns), among values with every
    seed finished (when seeds is given); a tie goes to the smaller value."""
    pool = summary if seeds is None else summary[summary["seeds"] >= seeds]
    if pool.empty:
        raise LtrError("no value of the sweep has a finished run for every seed: nothing to choose from")
    best = pool["val_all_mean"].max()
    return float(pool[pool["val_all_mean"] == best]["value"].min())


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _heldout_all(summary: pd.DataFrame, value: float) -> float | None:
    """The mean held-out All of a swept value, None when the sweep did not run it."""
    hit = summary[summary["value"].map(lambda v: _same(v, value))]
    return None if hit.empty else float(hit["heldout_all_mean"].iloc[0])


def _value_line(kind: SweepKind, whose: str, value: float, heldout: float | None) -> str:
    return (f"- {whose} value: {kind.field} = {value:g}, held-out All {fmt_number(heldout)}"
            + ("" if heldout is not None else " (not in this sweep)"))


def markdown(kind: SweepKind, summary: pd.DataFrame, info: dict) -> str:
    """sweep.md: what was swept, the choice, held-out of the choice beside the paper's value, the table."""
    chosen, paper, pre = info["chosen"], info["paper"], info["preset_value"]
    lines = [SYNTHETIC_WARNING, ""] if info.get("synthetic_data") else []
    lines += preset_warning(info["preset"])
    base = f", from `{info['from_run']}`" if info.get("from_run") else ""
    lines += [
        f"# Sweep: {kind.label} ({info['search']}, preset `{info['preset']}`, "
        f"{info['dataset'].upper()}-LT IF {info['imbalance']:g}, seeds {', '.join(map(str, info['seeds']))})",
        "",
        f"Every point runs the recipe of the Table 1 row \"{kind.row}\" with `{kind.field}` set to the value"
        f"{base}. Evaluation: {tta_words(info['tta'])}, last epoch. **Chosen on validation** (the first 20 "
        "test images of each class, mean over seeds): the value with the best validation All. **Held-out** "
        "(the other 80 images of each class) reports the choice; the test set as a whole chooses nothing.",
        "",
        f"- chosen: **{kind.field} = {chosen:g}**, held-out All {fmt_number(info['heldout_chosen'])}",
        _value_line(kind, f"{kind.source}'s", paper, info["heldout_paper"]),
    ]
    if not math.isclose(pre, paper):
        lines.append(_value_line(kind, f"preset `{info['preset']}`'s", pre, info["heldout_preset"]))
    if info["heldout_paper"] is not None:
        gap = info["heldout_chosen"] - info["heldout_paper"]
        lines.append(f"- held-out All, chosen minus {kind.source}'s value: {gap:+.2f}")
    lines += ["", md_line([kind.field, "runs"] + [f"{s} {g.capitalize()}" for s in ("val", "held-out")
                                                  for g in GROUPS] + [""]),
              "|" + "---|" * (2 + 2 * len(GROUPS) + 1)]
    for _, r in summary.iterrows():
        v = r["value"]
        marks = [m for m, hit in (("**chosen**", _same(v, chosen)), (kind.source, _same(v, paper)),
                                  ("preset", not math.isclose(pre, paper) and _same(v, pre))) if hit]
        cells = [f"{v:g}", str(int(r["seeds"]))] + [mean_std_text(r[f"{s}_{g}_mean"], r[f"{s}_{g}_std"])
                                                    for s in ("val", "heldout") for g in GROUPS]
        lines.append(md_line(cells + [", ".join(marks)]))
    return "\n".join(lines) + "\n"


def write_outputs(kind: SweepKind, points: pd.DataFrame, sweep_dir: Path, info: dict,
                  figures: bool = True) -> dict[str, Path]:
    """sweep.csv (one row per point), sweep.md, sweep.json and sweep.png; the chosen value in info."""
    summary = summarize(points)
    info = {**info, "chosen": choose(summary, len(info["seeds"])),
            "synthetic_data": bool(points["synthetic_data"].any())}
    for key, v in (("chosen", info["chosen"]), ("paper", info["paper"]), ("preset", info["preset_value"])):
        info[f"heldout_{key}"] = _heldout_all(summary, v)
    info["values"] = [float(v) for v in summary["value"]]
    files = {name: sweep_dir / name for name in ("sweep.csv", "sweep.md", SWEEP_FILE)}
    write_atomic(files["sweep.csv"], points.sort_values(["value", "seed"]).to_csv(index=False))
    write_atomic(files["sweep.md"], markdown(kind, summary, info))
    write_json(files[SWEEP_FILE], info)
    if figures:
        from .. import plots

        fig = plots.plot_sweep(summary, kind.field, kind.label, info["chosen"], info["paper"],
                               log=kind.log, preset_value=info["preset_value"], preset=info["preset"],
                               synthetic=info["synthetic_data"], paper_label=kind.source)
        files["sweep.png"] = sweep_dir / "sweep.png"
        write_atomic(files["sweep.png"], plots.figure_png(fig))
    return files


def _checked_request(k: SweepKind, values: Sequence[float] | None, preset: str, seeds: Sequence[int],
                     search: str, trials: int, tta: str,
                     from_run: str | os.PathLike | None) -> tuple[list[float], list[int]]:
    """The sweep's values and seeds, after checking every argument that needs no data or device (--from
    names one finished stage-1 run, for a stage-2 sweep of one seed)."""
    if search not in SEARCHES:
        raise LtrError(f"unknown --search {search!r}; choose grid or bayes")
    if tta not in ("flip", "plain"):
        raise LtrError(f"unknown --tta {tta!r}; choose flip or plain")
    vals = check_values(k, values, preset)  # an LtrError for an unknown preset too
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise LtrError(f"--seeds {seeds}: give at least one seed, each once")
    if search == "bayes" and (not isinstance(trials, int) or trials < 1):
        raise LtrError(f"--trials must be a whole number >= 1, got {trials!r}")
    if from_run is None:
        return vals, seeds
    if k.stage == "stage1":
        raise LtrError(f"--from names a stage-1 run to start stage 2 from; {k.name} trains stage 1 itself")
    if not (Path(from_run) / "metrics.json").exists():
        raise LtrError(f"--from {from_run}: no finished stage-1 run there (metrics.json missing); train "
                       "it with `python -m ltr stage1` or leave --from out to use the preset's")
    if len(seeds) > 1:
        raise LtrError("--from starts every point from one stage-1 run: give one seed")
    return vals, seeds


def run_sweep(kind: str, values: Sequence[float] | None = None, root: str | os.PathLike = "data",
              out: str | os.PathLike | None = None, preset: str = "paper", seeds: Sequence[int] = (0,),
              imbalance: float = 100.0, dataset: str = "cifar100", from_run: str | os.PathLike | None = None,
              search: str = "grid", trials: int = 20, tta: str = "flip",
              sweep_dir: str | os.PathLike | None = None, device: str = "auto", download: bool = False,
              compile: bool = False, precision: str = "auto", jobs: int = 1, progress: bool = True,
              allow_cpu: bool = False, figures: bool = True) -> dict[str, Path]:
    """Sweep one hyperparameter (grid, or Optuna with search="bayes"), choose it on validation, write it.

    out is the run folder shared with table1 (default exp/table1[-PRESET]); the sweep's own files go to
    sweep_dir (default out/sweep-KIND, out/sweep-KIND-bayes for a Bayesian search). Returns the files.
    """
    k = get_kind(kind)
    vals, seeds = _checked_request(k, values, preset, seeds, search, trials, tta, from_run)
    check_precision(precision)
    check_jobs(jobs)
    dev = resolve_device(device)
    if preset == "paper" and dev.type != "cuda" and not allow_cpu:
        raise LtrError("the paper preset trains ResNet-34s for 200 epochs per point: days on a CPU. Run "
                       "it on a CUDA GPU, or try the sweep with --preset cpu or smoke (add --allow-cpu to "
                       "insist)")
    imbalance = float(imbalance)
    out = Path(out or ("exp/table1" if preset == "paper" else f"exp/table1-{preset}"))
    sdir = Path(sweep_dir or out / (f"sweep-{k.name}" + ("-bayes" if search == "bayes" else "")))
    optuna = _import_optuna() if search == "bayes" else None  # fail before any training (data too)
    data = {imbalance: load_cifar_lt(root, dataset, imbalance, download=download)}
    if not len(data[imbalance].val_idx) or not len(data[imbalance].heldout_idx):
        raise LtrError(f"the test set in {root} has no images beyond the first {VAL_PER_CLASS} of each "
                       "class: a sweep needs both validation (those) and held-out images (the rest)")
    if (out / "table.json").exists():  # a table folder of another preset keeps its runs apart
        claim_out_dir(out, preset, dataset)
    sdir.mkdir(parents=True, exist_ok=True)
    info = {"kind": k.name, "field": k.field, "stage": k.stage, "row": k.row, "search": search,
            "preset": preset, "dataset": dataset, "imbalance": imbalance, "seeds": seeds, "tta": tta,
            "from_run": str(from_run) if from_run is not None else None, "out": str(out),
            "paper": k.paper, "preset_value": preset_value(k, preset),
            "objective": f"validation All ({tta}), mean over seeds"}
    points_at = partial(plan_points, k, out=out, preset=preset, seeds=seeds, imbalance=imbalance,
                        dataset=dataset, from_run=from_run)
    train = partial(train_runs, data=data, dev=dev, root=root, dataset=dataset, compile=compile,
                    precision=precision, jobs=jobs, progress=progress)
    if search == "grid":
        runs, points = points_at(vals)
        train(runs, desc=f"sweep {k.name} ({preset})")
        records = point_records(points, tta)
    else:
        lo, hi = (k.low, k.high) if values is None else (min(vals), max(vals))
        if k.log and lo <= 0:
            raise LtrError(f"a Bayesian search of {k.label} is log-uniform: its range must be > 0, got "
                           f"{lo:g}..{hi:g} (give --values LOW HIGH)")
        info.update(trials=trials, low=lo, high=hi)
        records = _bayes(optuna, k, lo, hi, trials, sdir, points_at, train, tta)
    if not records:
        raise LtrError("the sweep finished no point: nothing to choose from")
    return write_outputs(k, pd.DataFrame.from_records(records), sdir, info, figures)


def _import_optuna():  # noqa: ANN202 - the optuna module
    try:
        import optuna
    except ImportError:
        raise LtrError("--search bayes needs Optuna, an optional extra: pip install 'ltr[tune]' "
                       "(or pip install optuna); the default --search grid does not") from None
    return optuna


def _bayes(optuna, k: SweepKind, lo: float, hi: float, trials: int, sdir: Path,  # noqa: ANN001
           points_at: Callable, train: Callable, tta: str) -> list[dict]:
    """Optuna's TPE on mean validation All; the study lives in sdir/optuna.db, so a rerun resumes it. A trial
    an interruption left running is failed and its value retried first (from its run's checkpoint).
    points_at(values) plans a value's runs and points; train(runs, desc=...) trains them."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=k.name, storage=f"sqlite:///{(sdir / 'optuna.db').resolve()}",
                                direction="maximize", load_if_exists=True)
    state = optuna.trial.TrialState
    for t in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        study.tell(t.number, state=state.FAIL)
        study.enqueue_trial(t.params, skip_if_exists=False)
    done = len(study.get_trials(deepcopy=False, states=(state.COMPLETE,)))
    # A fresh seed per resume: the same seed would replay the first random start-up values.
    study.sampler = optuna.samplers.TPESampler(seed=len(study.trials),
                                               n_startup_trials=min(10, max(2, trials // 3)))
    dist = optuna.distributions.FloatDistribution(lo, hi, log=k.log)
    for _ in range(done, trials):
        trial = study.ask({k.field: dist})
        # Three significant digits: readable run names, and a repeated value reuses its runs.
        v = float(f"{trial.params[k.field]:.3g}")
        trial.set_user_attr("value", v)
        runs, points = points_at([v])
        train(runs, desc=f"trial {trial.number} {k.field}={v:g}")
        recs = point_records(points, tta)
        study.tell(trial, sum(r["val_all"] for r in recs) / len(recs))
    return [rec for t in study.get_trials(deepcopy=False, states=(state.COMPLETE,))
            for rec in point_records(points_at([float(t.user_attrs["value"])])[1], tta, trial=t.number)]
