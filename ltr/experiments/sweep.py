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
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from ..config import PRESETS, preset_config, run_name, stage2_name
from ..data import VAL_PER_CLASS, load_cifar_lt, resolve_device
from ..engine.precision import check_precision
from ..engine.rundir import read_json, write_atomic, write_json
from ..errors import LtrError
from ..train import stage2_from
from .jobs import check_jobs
from .report import GROUPS
from .tables import (
    ONE_STAGE_ROW,
    TABLE1_ROWS,
    PlannedRun,
    Row,
    claim_out_dir,
    stage1_config,
    train_runs,
)
from .tuning import SWEEP_FILE, SweepKind, fmt_score, get_kind, sweep_grid

# Rows a sweep may run: WB's Table 1 and the one-stage row of `ltr compare`.
SWEEP_ROWS: tuple[Row, ...] = (*TABLE1_ROWS, ONE_STAGE_ROW)
SEARCHES = ("grid", "bayes")


def check_values(kind: SweepKind, values: Sequence[float] | None, preset: str = "paper") -> list[float]:
    """The sorted, distinct values of a sweep (the preset's grid for None), or an LtrError naming one."""
    grid = sweep_grid(kind.name, preset)
    if values is None:
        return list(grid)
    vals = [float(v) for v in values]
    if not vals:
        raise LtrError(f"--values is empty: give at least one {kind.label} (default grid: "
                       f"{' '.join(f'{v:g}' for v in grid)})")
    for v in vals:
        if not math.isfinite(v):
            raise LtrError(f"--values holds {v}: every {kind.label} must be a finite number")
        if kind.field == "maxnorm" and not 0 < v <= 1:
            raise LtrError(f"MaxNorm threshold {v:g} is outside (0, 1]: thresholds are norms of unit-scale "
                           "rows (WB: 0.1)")
        if v < 0:
            what = "weight decay" if kind.field == "wd" else kind.label
            raise LtrError(f"{what} must be >= 0, got {v:g}")
    return sorted(set(vals))


def preset_value(kind: SweepKind, preset: str) -> float:
    """The value a preset's Table 1 uses (the cpu preset tunes its own stage-1 weight decay)."""
    if kind.stage == "stage1":
        return float(getattr(preset_config("stage1", preset), kind.field))
    return float(_swept_row(kind).stage2[kind.field])


def _swept_row(kind: SweepKind) -> Row:
    """The table row whose recipe every point of this kind runs."""
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
    """Every run a sweep needs (stage-1 backbones first, shared) and its points.

    Run directories are named as stage1 / stage2 / table1 name them, so finished ones are reused.
    """
    runs: dict[Path, PlannedRun] = {}
    points = []
    row = _swept_row(kind)
    for seed in seeds:
        for v in values:
            if kind.stage == "stage1":
                s1 = stage1_config(row.stage1, preset, imbalance, seed, dataset, **{kind.field: v})
                s1_dir = out / "stage1" / run_name(s1)
                run = runs.setdefault(s1_dir, PlannedRun(s1_dir, "stage1", s1, imbalance))
            else:
                if from_run is not None:
                    s1_dir = Path(from_run)
                else:
                    s1 = stage1_config(row.stage1, preset, imbalance, seed, dataset)
                    s1_dir = out / "stage1" / run_name(s1)
                    runs.setdefault(s1_dir, PlannedRun(s1_dir, "stage1", s1, imbalance))
                s2 = replace(stage2_from(s1_dir, preset, **{**row.stage2, kind.field: v}), seed=seed)
                target = out / "stage2" / s1_dir.name / stage2_name(s2)
                run = runs.setdefault(target, PlannedRun(target, "stage2", s2, imbalance))
            points.append(Point(v, seed, run))
    ordered = sorted(runs.values(), key=lambda r: r.stage)
    return ordered, points


def point_records(points: Sequence[Point], tta: str = "flip", trial: int | None = None) -> list[dict]:
    """One record per finished point: value, seed, run, then validation and held-out accuracy by group."""
    records = []
    for p in points:
        path = p.run.out / "metrics.json"
        if not path.exists():
            continue
        m = read_json(path)
        rec: dict = {"value": p.value, "seed": p.seed, "run": str(p.run.out)}
        if trial is not None:
            rec["trial"] = trial
        for split in ("val", "heldout"):
            for g in GROUPS:
                rec[f"{split}_{g}"] = m[split][tta][g]
        rec["synthetic_data"] = bool(m.get("synthetic_data"))
        records.append(rec)
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
    """The value with the best mean validation All (the held-out columns are never read).

    Only values with every seed finished compete (when seeds is given); a tie goes to the smaller value.
    """
    pool = summary if seeds is None else summary[summary["seeds"] >= seeds]
    if pool.empty:
        raise LtrError("no value of the sweep has a finished run for every seed: nothing to choose from")
    best = pool["val_all_mean"].max()
    return float(pool[pool["val_all_mean"] == best]["value"].min())


def _heldout_all(summary: pd.DataFrame, value: float) -> float | None:
    """The mean held-out All of a swept value, None when the sweep did not run it."""
    hit = summary[summary["value"].map(lambda v: math.isclose(v, value, rel_tol=1e-9, abs_tol=1e-12))]
    return None if hit.empty else float(hit["heldout_all_mean"].iloc[0])


def _mean_std_text(mean: float, std: float) -> str:
    """mean ± std with two decimals; the mean alone for one seed."""
    return f"{mean:.2f}" + ("" if pd.isna(std) else f" ± {std:.2f}")


def markdown(kind: SweepKind, summary: pd.DataFrame, info: dict) -> str:
    """sweep.md: what was swept, the choice, held-out of the choice beside the paper's value, the table."""
    chosen, paper, pre = info["chosen"], info["paper"], info["preset_value"]
    tta = "flip-averaged logits" if info["tta"] == "flip" else "plain (no test-time flip)"
    lines = []
    if info.get("synthetic_data"):
        lines += ["**These runs used SYNTHETIC images (ltr.synthetic), not CIFAR: the numbers describe the "
                  "code, not the paper.**", ""]
    if info["preset"] != "paper":
        lines += [f"**Preset `{info['preset']}` is not the paper's recipe: compare shapes, not numbers.**",
                  ""]
    base = f", from `{info['from_run']}`" if info.get("from_run") else ""
    lines += [
        f"# Sweep: {kind.label} ({info['search']}, preset `{info['preset']}`, "
        f"{info['dataset'].upper()}-LT IF {info['imbalance']:g}, seeds {', '.join(map(str, info['seeds']))})",
        "",
        f"Every point runs the recipe of the Table 1 row \"{kind.row}\" with `{kind.field}` set to the value"
        f"{base}. Evaluation: {tta}, last epoch. **Chosen on validation** (the first 20 test images of each "
        "class, mean over seeds): the value with the best validation All. **Held-out** (the other 80 images "
        "of each class) reports the choice; the test set as a whole chooses nothing.",
        "",
        f"- chosen: **{kind.field} = {chosen:g}**, held-out All {fmt_score(info['heldout_chosen'])}",
        f"- {kind.source}'s value: {kind.field} = {paper:g}, held-out All {fmt_score(info['heldout_paper'])}"
        + ("" if info["heldout_paper"] is not None else " (not in this sweep)"),
    ]
    if not math.isclose(pre, paper):
        lines.append(f"- preset `{info['preset']}`'s value: {kind.field} = {pre:g}, held-out All "
                     f"{fmt_score(info['heldout_preset'])}"
                     + ("" if info["heldout_preset"] is not None else " (not in this sweep)"))
    if info["heldout_paper"] is not None:
        gap = info["heldout_chosen"] - info["heldout_paper"]
        lines.append(f"- held-out All, chosen minus {kind.source}'s value: {gap:+.2f}")
    lines += ["", "| " + " | ".join(
        [kind.field, "runs"] + [f"val {g.capitalize()}" for g in GROUPS]
        + [f"held-out {g.capitalize()}" for g in GROUPS] + [""]) + " |",
        "|" + "---|" * (2 + 2 * len(GROUPS) + 1)]
    for _, r in summary.iterrows():
        marks = []
        if math.isclose(r["value"], chosen, rel_tol=1e-9, abs_tol=1e-12):
            marks.append("**chosen**")
        if math.isclose(r["value"], paper, rel_tol=1e-9, abs_tol=1e-12):
            marks.append(kind.source)
        if not math.isclose(pre, paper) and math.isclose(r["value"], pre, rel_tol=1e-9, abs_tol=1e-12):
            marks.append("preset")
        cells = [f"{r['value']:g}", str(int(r["seeds"]))]
        cells += [_mean_std_text(r[f"val_{g}_mean"], r[f"val_{g}_std"]) for g in GROUPS]
        cells += [_mean_std_text(r[f"heldout_{g}_mean"], r[f"heldout_{g}_std"]) for g in GROUPS]
        lines.append("| " + " | ".join(cells + [", ".join(marks)]) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(kind: SweepKind, points: pd.DataFrame, sweep_dir: Path, info: dict,
                  figures: bool = True) -> dict[str, Path]:
    """sweep.csv (one row per point), sweep.md, sweep.json and sweep.png; the chosen value in info."""
    summary = summarize(points)
    info = dict(info)
    info["chosen"] = choose(summary, len(info["seeds"]))
    info["synthetic_data"] = bool(points["synthetic_data"].any())
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
                     search: str, trials: int, tta: str) -> tuple[list[float], list[int]]:
    """The sweep's values and seeds, after checking every argument that needs no data or device."""
    if search not in SEARCHES:
        raise LtrError(f"unknown --search {search!r}; choose grid or bayes")
    if tta not in ("flip", "plain"):
        raise LtrError(f"unknown --tta {tta!r}; choose flip or plain")
    if preset not in PRESETS:
        raise LtrError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    vals = check_values(k, values, preset)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise LtrError(f"--seeds {seeds}: give at least one seed, each once")
    if search == "bayes" and (not isinstance(trials, int) or trials < 1):
        raise LtrError(f"--trials must be a whole number >= 1, got {trials!r}")
    return vals, seeds


def _check_from_run(k: SweepKind, from_run: str | os.PathLike | None, seeds: list[int]) -> None:
    """--from names one finished stage-1 run, for a stage-2 sweep of one seed."""
    if from_run is None:
        return
    if k.stage == "stage1":
        raise LtrError(f"--from names a stage-1 run to start stage 2 from; {k.name} trains stage 1 "
                       "itself")
    if not (Path(from_run) / "metrics.json").exists():
        raise LtrError(f"--from {from_run}: no finished stage-1 run there (metrics.json missing); train "
                       "it with `python -m ltr stage1` or leave --from out to use the preset's")
    if len(seeds) > 1:
        raise LtrError("--from starts every point from one stage-1 run: give one seed")


def run_sweep(
    kind: str,
    values: Sequence[float] | None = None,
    root: str | os.PathLike = "data",
    out: str | os.PathLike | None = None,
    preset: str = "paper",
    seeds: Sequence[int] = (0,),
    imbalance: float = 100.0,
    dataset: str = "cifar100",
    from_run: str | os.PathLike | None = None,
    search: str = "grid",
    trials: int = 20,
    tta: str = "flip",
    sweep_dir: str | os.PathLike | None = None,
    device: str = "auto",
    download: bool = False,
    compile: bool = False,
    precision: str = "auto",
    jobs: int = 1,
    progress: bool = True,
    allow_cpu: bool = False,
    figures: bool = True,
) -> dict[str, Path]:
    """Sweep one hyperparameter (grid, or Optuna with search="bayes"), choose it on validation, write it.

    out is the run folder shared with table1 (default exp/table1[-PRESET]); the sweep's own files go to
    sweep_dir (default out/sweep-KIND, out/sweep-KIND-bayes for a Bayesian search). Returns the files.
    """
    k = get_kind(kind)
    vals, seeds = _checked_request(k, values, preset, seeds, search, trials, tta)
    check_precision(precision)
    check_jobs(jobs)
    dev = resolve_device(device)
    if preset == "paper" and dev.type != "cuda" and not allow_cpu:
        raise LtrError("the paper preset trains ResNet-34s for 200 epochs per point: days on a CPU. Run "
                       "it on a CUDA GPU, or try the sweep with --preset cpu or smoke (add --allow-cpu to "
                       "insist)")
    _check_from_run(k, from_run, seeds)
    imbalance = float(imbalance)
    if out is None:
        out = "exp/table1" if preset == "paper" else f"exp/table1-{preset}"
    out = Path(out)
    sdir = Path(sweep_dir or out / (f"sweep-{k.name}" + ("-bayes" if search == "bayes" else "")))
    optuna = _import_optuna() if search == "bayes" else None  # fail before any training
    # Missing data fails here, before any run starts.
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
    train = dict(compile=compile, precision=precision, jobs=jobs, progress=progress)
    if search == "grid":
        runs, points = plan_points(k, vals, out, preset, seeds, imbalance, dataset, from_run)
        train_runs(runs, data, dev, root, dataset, desc=f"sweep {k.name} ({preset})", **train)
        records = point_records(points, tta)
    else:
        lo, hi = (k.low, k.high) if values is None else (min(vals), max(vals))
        if k.log and lo <= 0:
            raise LtrError(f"a Bayesian search of {k.label} is log-uniform: its range must be > 0, got "
                           f"{lo:g}..{hi:g} (give --values LOW HIGH)")
        info.update(trials=trials, low=lo, high=hi)
        records = _bayes(optuna, k, lo, hi, trials, sdir, out, preset, seeds, imbalance, dataset, from_run,
                         tta, data, dev, root, train)
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


def _bayes(optuna, k: SweepKind, lo: float, hi: float, trials: int, sdir: Path, out: Path,  # noqa: ANN001
           preset: str, seeds: list[int], imbalance: float, dataset: str, from_run: str | os.PathLike | None,
           tta: str, data: dict, dev: object, root: str | os.PathLike, train: dict) -> list[dict]:
    """Optuna's TPE on mean validation All; the study lives in sdir/optuna.db, so a rerun resumes it.

    A trial that an interruption left running is failed and its value retried first: its run
    directories are the same, so the training itself resumes from its checkpoint.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{(sdir / 'optuna.db').resolve()}"
    study = optuna.create_study(study_name=k.name, storage=storage, direction="maximize",
                                load_if_exists=True)
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
        runs, points = plan_points(k, [v], out, preset, seeds, imbalance, dataset, from_run)
        train_runs(runs, data, dev, root, dataset, desc=f"trial {trial.number} {k.field}={v:g}", **train)
        recs = point_records(points, tta)
        study.tell(trial, sum(r["val_all"] for r in recs) / len(recs))
    records = []
    for t in study.get_trials(deepcopy=False, states=(state.COMPLETE,)):
        v = float(t.user_attrs["value"])
        _, points = plan_points(k, [v], out, preset, seeds, imbalance, dataset, from_run)
        records += point_records(points, tta, trial=t.number)
    return records
