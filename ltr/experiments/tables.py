"""Table 1 / Table 2 of WB: the plan of runs each row needs, the runner, and tables beside the paper.

The paper's numbers live here, once. A cell of ours is always the mean (± std) over the seeds that
a run in the output folder produced; a cell with no finished run says "no run".
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from ..config import (
    CB_LABELS,
    CB_VARIANTS,
    FIDELITIES,
    MLA_TAU,
    OFFICIAL_STAGE2,
    PRESETS,
    Stage1Config,
    preset_config,
    run_name,
    stage2_name,
)
from ..data import LtrError, load_cifar_lt, resolve_device
from ..engine.precision import check_precision
from ..engine.rundir import read_json, write_atomic, write_json
from ..train import TimeLimitReached, stage2_from, train_stage1, train_stage2
from .jobs import check_jobs, run_parallel, stage_kwargs
from .tuning import read_tuned, tuned_header

GROUPS = ("many", "medium", "few", "all")

# WB Table 1 (CIFAR100-LT, IF 100): Many / Medium / Few / All, in percent.
PAPER_TABLE1: dict[str, tuple[float, float, float, float]] = {
    "WD=0 (w/ CE)": (64.05, 35.80, 11.43, 38.38),
    "WD=0 + tau-norm": (59.54, 38.23, 25.93, 42.00),
    "WD tuned (w/ CE)": (76.94, 44.28, 12.17, 46.08),
    "+ tau-norm": (73.11, 47.69, 30.10, 51.31),
    "+ L2norm": (76.09, 47.74, 20.87, 49.60),
    "+ CE & L2norm": (76.37, 48.11, 21.00, 49.87),
    "+ CE & WD": (76.97, 45.94, 14.00, 47.22),
    "+ CB": (77.00, 45.89, 13.60, 47.09),
    "+ CB & L2norm": (76.43, 48.20, 21.60, 50.10),
    "+ CB & WD": (72.77, 49.74, 31.80, 52.42),
    "+ CB & Max": (76.49, 49.23, 20.67, 50.20),
    "+ CB & WD & Max": (72.60, 51.86, 32.63, 53.35),
    "last two layers + CB & WD & Max": (71.37, 51.17, 35.53, 53.55),
}

# WB Table 2, "All" only, by imbalance factor; keyed by our Table 1 row names.
PAPER_TABLE2: dict[str, dict[int, float]] = {
    "WD=0 (w/ CE)": {100: 38.38, 50: 43.99, 10: 57.31},
    "WD tuned (w/ CE)": {100: 46.08, 50: 52.71, 10: 66.03},
    "+ L2norm": {100: 49.60, 50: 56.33, 10: 67.16},
    "+ tau-norm": {100: 51.31, 50: 57.65, 10: 67.79},
    "+ CB & WD": {100: 52.42, 50: 57.47, 10: 67.96},
    "+ CB & Max": {100: 50.24, 50: 56.06, 10: 67.10},
    "+ CB & WD & Max": {100: 53.35, 50: 57.71, 10: 68.67},
}

# Published CIFAR100-LT IF100 "All" of peer methods, as WB's Table 2 quotes them.
PAPER_PEERS: dict[str, float] = {
    "CE": 38.32, "CE+CB": 39.60, "Focal": 38.41, "LDAM-DRW": 42.04, "BBN": 42.56,
    "LogitAdjust": 42.01, "De-confound": 44.10, "tau-norm (Kang et al.)": 47.73, "SSD": 46.00,
    "DiVE": 45.35, "DRO-LT": 47.31, "PaCo": 52.00, "RIDE": 49.1,
}


# The stage-1 models a row can start from: Stage1Config fields over the preset's.
STAGE1_KINDS: dict[str, dict] = {
    "naive": {"wd": 0.0},  # WB's WD=0 model
    "wd": {},  # WB's tuned weight decay (the preset's wd, 5e-3 in the paper preset)
    "aux-balanced": {"method": "aux-balanced"},  # our reading of Zhang et al. (SPEC 6), same wd
    "aux-balanced-rotation": {"method": "aux-balanced", "ssl": "rotation"},  # ... with the rotation head
    # Hasegawa & Sato's one-stage recipe (our implementation): fixed simplex-ETF classifier, learnable bias,
    # feature regularisation; the preset's backbone, epochs and weight decay, as WB's "WD tuned" model.
    "etf-fr": {"method": "etf-fr"},
}


@dataclass(frozen=True)
class Row:
    """One table row: which stage-1 model it starts from and the stage-2 recipe on top."""

    name: str  # row label (as in WB Table 1 where the row is one of WB's)
    stage1: str  # a key of STAGE1_KINDS: "naive", "wd", "aux-balanced", "aux-balanced-rotation", "etf-fr"
    stage2: dict = field(default_factory=dict)  # Stage2Config fields; empty = the stage-1 model
    stage1_fields: dict = field(default_factory=dict)  # Stage1Config fields over the kind's (tuned values)
    paper: str = ""  # the WB Table 1 row it is compared with; "" = the row of the same name


def cb_label(row: Row) -> str:
    """ "WB's loss" / "weighted CE" for a class-balanced row whose variant is set, else ""."""
    if row.stage2.get("loss") != "cb":
        return ""
    return CB_LABELS.get(row.stage2.get("cb_variant", ""), "")


def with_cb_variant(rows: tuple[Row, ...], variant: str | None, preset: str) -> tuple[Row, ...]:
    """Rows whose class-balanced recipes use `variant`: standard | official | both | None (the preset's).

    With both, each CB row (on the preset's variant, under its own name) is followed by the same recipe with
    the other loss, named "<row> (<label>)" and compared with the same WB row; the stage-1 runs are shared.
    """
    if preset not in PRESETS:
        raise LtrError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    if variant not in (None, "both", *CB_VARIANTS):
        raise LtrError(f"--cb-variant {variant!r} is not one of {(*CB_VARIANTS, 'both')}")
    own = preset_config("stage2", preset).cb_variant
    first = own if variant in (None, "both") else variant
    out: list[Row] = []
    for row in rows:
        if row.stage2.get("loss") != "cb":
            out.append(row)
            continue
        out.append(replace(row, stage2={**row.stage2, "cb_variant": first}))
        if variant == "both":
            other = next(v for v in CB_VARIANTS if v != first)
            out.append(replace(row, name=f"{row.name} ({CB_LABELS[other]})", paper=row.paper or row.name,
                               stage2={**row.stage2, "cb_variant": other}))
    return tuple(out)


def with_fidelity(rows: tuple[Row, ...], fidelity: str) -> tuple[Row, ...]:
    """Rows whose trained stage-2 recipes run at `fidelity` (stage-1 and post-hoc rows are unchanged)."""
    if fidelity not in FIDELITIES:
        raise LtrError(f"--fidelity {fidelity!r} is not one of {FIDELITIES}")
    if fidelity == "corrected":
        return rows
    return tuple(replace(r, stage2={**r.stage2, "fidelity": fidelity, **OFFICIAL_STAGE2})
                 if r.stage2 and not r.stage2.get("posthoc") else r for r in rows)


TABLE1_ROWS: tuple[Row, ...] = (
    Row("WD=0 (w/ CE)", "naive"),
    Row("WD=0 + tau-norm", "naive", {"posthoc": "tau-norm", "tau": 1.9}),
    Row("WD tuned (w/ CE)", "wd"),
    Row("+ tau-norm", "wd", {"posthoc": "tau-norm", "tau": 1.9}),
    Row("+ L2norm", "wd", {"posthoc": "l2norm"}),
    Row("+ CE & L2norm", "wd", {"loss": "ce", "unit_norm": True}),
    Row("+ CE & WD", "wd", {"loss": "ce", "wd": 0.1}),
    Row("+ CB", "wd", {"loss": "cb"}),
    Row("+ CB & L2norm", "wd", {"loss": "cb", "unit_norm": True}),
    Row("+ CB & WD", "wd", {"loss": "cb", "wd": 0.1}),
    Row("+ CB & Max", "wd", {"loss": "cb", "maxnorm": 0.1}),
    Row("+ CB & WD & Max", "wd", {"loss": "cb", "wd": 0.1, "maxnorm": 0.1}),
    Row("last two layers + CB & WD & Max", "wd",
        {"loss": "cb", "wd": 0.1, "maxnorm": 0.1, "trainable": "last2"}),
)

# Hasegawa & Sato (ICLR 2024) replace WB's stage 2 by a multiplicative logit adjustment of a model trained
# with a fixed ETF classifier; MLA_TAU is their tau for CIFAR100-LT. Our implementation; no published number.
ONE_STAGE_ROW = Row("Hasegawa & Sato one-stage (our implementation)", "etf-fr",
                    {"posthoc": "mla", "tau": MLA_TAU})


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: its directory and config (stage-2 runs name their stage-1 run)."""

    out: Path  # run directory
    stage: str  # stage1 | stage2
    config: object  # Stage1Config | Stage2Config
    imbalance: float  # imbalance factor (to pick the data)


def stage1_config(kind: str, preset: str, imbalance: float, seed: int,
                  dataset: str = "cifar100", **fields_: object) -> Stage1Config:
    """The stage-1 config of a row's kind (STAGE1_KINDS), e.g. naive (wd 0) or tuned weight decay (5e-3)."""
    if kind not in STAGE1_KINDS:
        raise LtrError(f"unknown stage-1 kind {kind!r}; choose one of {sorted(STAGE1_KINDS)}")
    cfg = preset_config("stage1", preset, dataset=dataset, imbalance=float(imbalance), seed=seed)
    return replace(cfg, **{**STAGE1_KINDS[kind], **fields_})


def plan(rows: tuple[Row, ...], out: Path, preset: str, imbalances: list[float], seeds: list[int],
         dataset: str = "cifar100") -> tuple[list[PlannedRun], dict[tuple[str, float, int], Path]]:
    """Every run the rows need, stage-1 runs shared between rows; and (row, IF, seed) -> run dir."""
    runs: dict[Path, PlannedRun] = {}
    where: dict[tuple[str, float, int], Path] = {}
    for imb in imbalances:
        for seed in seeds:
            for row in rows:
                s1 = stage1_config(row.stage1, preset, imb, seed, dataset, **row.stage1_fields)
                s1_dir = out / "stage1" / run_name(s1)
                runs.setdefault(s1_dir, PlannedRun(s1_dir, "stage1", s1, imb))
                target = s1_dir
                if row.stage2:
                    s2 = replace(stage2_from(s1_dir, preset, **row.stage2), seed=seed)
                    target = out / "stage2" / s1_dir.name / stage2_name(s2)
                    runs.setdefault(target, PlannedRun(target, "stage2", s2, imb))
                where[row.name, float(imb), seed] = target
    # Stage-1 runs first, so every stage-2 run finds its backbone finished.
    ordered = sorted(runs.values(), key=lambda r: r.stage)
    return ordered, where


def _claim_out(out: Path, preset: str, dataset: str) -> None:
    marker = out / "table.json"
    if marker.exists():
        old = read_json(marker)
        if (old.get("preset"), old.get("dataset")) != (preset, dataset):
            raise LtrError(
                f"{out} holds a table made with --preset {old.get('preset')} on {old.get('dataset')}; "
                f"runs of another preset are kept apart: pass another --out (e.g. {out}-{preset})"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"preset": preset, "dataset": dataset})


def run_plan(
    rows: tuple[Row, ...],
    root: str | os.PathLike,
    out: str | os.PathLike,
    preset: str,
    seeds: list[int] | tuple[int, ...],
    imbalances: list[float] | tuple[float, ...],
    dataset: str = "cifar100",
    device: str = "auto",
    download: bool = False,
    compile: bool = False,
    progress: bool = True,
    allow_cpu: bool = False,
    desc: str = "table",
    precision: str = "auto",
    jobs: int = 1,
    compile_mode: str = "default",
) -> tuple[dict[tuple[str, float, int], Path], list[int], list[float]]:
    """Run every run the rows need (finished ones skipped, unfinished resumed); (row, IF, seed) -> dir.

    jobs > 1 trains independent runs at once in that many worker processes (ltr.experiments.jobs); the run
    directories are the same as with jobs=1.
    """
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise LtrError(f"--seeds {seeds} lists a seed twice; give each seed once")
    if preset not in PRESETS:
        raise LtrError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    imbalances = [float(i) for i in imbalances]
    check_precision(precision)
    check_jobs(jobs)
    dev = resolve_device(device)
    if preset == "paper" and dev.type != "cuda" and not allow_cpu:
        kinds = len({r.stage1 for r in rows})
        raise LtrError(
            f"the paper preset trains {kinds} ResNet-34s for 200 epochs per seed and imbalance factor: "
            "days on a CPU. Run it on a CUDA GPU, or try the pipeline with --preset smoke "
            "(add --allow-cpu to insist)"
        )
    out = Path(out)
    # Missing data fails here, before any run starts.
    data = {imb: load_cifar_lt(root, dataset, imb, download=download) for imb in imbalances}
    _claim_out(out, preset, dataset)
    runs, where = plan(rows, out, preset, imbalances, seeds, dataset)
    train_runs(runs, data, dev, root, dataset, compile=compile, precision=precision, jobs=jobs,
               progress=progress, desc=f"{desc} ({preset})", compile_mode=compile_mode)
    return where, seeds, imbalances


def train_runs(runs: list[PlannedRun], data: dict, dev: torch.device, root: str | os.PathLike,
               dataset: str, compile: bool = False, precision: str = "auto", jobs: int = 1,
               progress: bool = True, desc: str = "runs", compile_mode: str = "default") -> None:
    """Train planned runs (stage 1 before the stage 2 on top), finished ones skipped, others resumed.

    data maps each imbalance factor to its loaded LTData; jobs > 1 trains independent runs at once in
    that many worker processes (jobs), into the same run directories as jobs=1. compile applies to
    stage 1 only (ltr.experiments.jobs.stage_kwargs).
    """
    from tqdm.auto import tqdm

    common = dict(root=root, device=str(dev), compile=compile, precision=precision, compile_mode=compile_mode)
    bar = tqdm(total=len(runs), desc=desc, unit="run", disable=not progress)
    try:
        if jobs > 1:
            run_parallel(runs, jobs, dev, root, dataset, common, bar)
        else:
            for run in runs:
                bar.set_postfix_str(f"{run.stage} {run.out.name}")
                train = train_stage1 if run.stage == "stage1" else train_stage2
                train(run.config, run.out, data=data[run.imbalance], progress=progress,
                      **stage_kwargs(run.stage, common))
                bar.update(1)
    finally:
        bar.close()


def tune_rows(rows: tuple[Row, ...], chosen: dict[str, float]) -> tuple[Row, ...]:
    """Table 1's rows with values chosen by sweeps (by kind, tuning.APPLIES) in place of the paper's."""
    new = []
    for row in rows:
        s2 = dict(row.stage2)
        s1 = dict(row.stage1_fields)
        if "stage1-wd" in chosen and row.stage1 == "wd":
            s1["wd"] = chosen["stage1-wd"]
        if "tau" in chosen and s2.get("posthoc") == "tau-norm" and row.stage1 == "wd":
            s2["tau"] = chosen["tau"]
        if "maxnorm" in chosen and s2.get("maxnorm") is not None:
            s2["maxnorm"] = chosen["maxnorm"]
        if "stage2-wd" in chosen and s2.get("wd"):
            s2["wd"] = chosen["stage2-wd"]
        if "mla-tau" in chosen and s2.get("posthoc") == "mla":
            s2["tau"] = chosen["mla-tau"]
        new.append(replace(row, stage2=s2, stage1_fields=s1))
    return tuple(new)


def run_table(
    rows: tuple[Row, ...] = TABLE1_ROWS,
    root: str | os.PathLike = "data",
    out: str | os.PathLike = "exp/table1",
    preset: str = "paper",
    seeds: list[int] | tuple[int, ...] = (0,),
    imbalances: list[float] | tuple[float, ...] = (100,),
    dataset: str = "cifar100",
    device: str = "auto",
    download: bool = False,
    compile: bool = False,
    progress: bool = True,
    allow_cpu: bool = False,
    figures: bool = True,
    precision: str = "auto",
    jobs: int = 1,
    tuned: list[str | os.PathLike] | tuple[str | os.PathLike, ...] = (),
    cb_variant: str | None = None,
    fidelity: str = "corrected",
    compile_mode: str = "default",
) -> dict[str, Path]:
    """Plan, run (skipping finished runs, resuming unfinished ones) and tabulate; returns written files.

    tuned: sweep directories (sweep) whose validation-chosen values replace the paper's; the table
    is then written as table1-tuned.md / .csv beside the paper-valued one, and its header says so.
    cb_variant: the class-balanced loss of the CB rows (standard | official | both; None = the preset's).
    fidelity: stage 2's (official: WB's epoch-stepped schedule, MaxNorm once per epoch, BN in train mode;
    the table is then table1[-tuned]-official.md / .csv).
    """
    rows = with_fidelity(with_cb_variant(rows, cb_variant, preset), fidelity)
    suffix, header = "", ""
    if tuned:
        imbalances = [float(i) for i in imbalances]
        chosen = read_tuned(tuned, preset, dataset, imbalances)
        rows = tune_rows(rows, {kind: value for kind, (value, _, _) in chosen.items()})
        header = tuned_header(chosen, preset)
        suffix = "-tuned"
    if fidelity == "official":
        suffix += "-official"
        header += ("**Stage 2 at `--fidelity official`**: WB's cosine stepped at the start of each epoch "
                   "(the last epoch at lr 0), MaxNorm projected once per epoch, the frozen backbone's BN in "
                   "train mode, fp32.\n\n")
    try:
        where, seeds, imbalances = run_plan(
            rows, root, out, preset, seeds, imbalances, dataset, device, download, compile, progress,
            allow_cpu, precision=precision, jobs=jobs, compile_mode=compile_mode,
        )
    except TimeLimitReached:
        # Cut by the time limit: the tables of what finished ("no run" elsewhere), then the cut itself.
        seeds, imbalances = [int(s) for s in seeds], [float(i) for i in imbalances]
        _, where = plan(rows, Path(out), preset, imbalances, seeds, dataset)
        write_tables(rows, Path(out), where, seeds, imbalances, preset, dataset=dataset, figures=figures,
                     suffix=suffix, header=header)
        raise
    return write_tables(rows, Path(out), where, seeds, imbalances, preset, dataset=dataset, figures=figures,
                        suffix=suffix, header=header)


# ---------------------------------------------------------------- tables


def _cell(values: list[float | None]) -> tuple[float | None, float | None, int]:
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, 0
    s = pd.Series(vals, dtype=float)
    return float(s.mean()), (float(s.std(ddof=1)) if len(s) > 1 else None), len(s)


def best_test_epoch(run_dir: Path) -> tuple[float, float | None] | None:
    """WB's reported figure from a run's history.csv: (best plain test accuracy, flip accuracy at that epoch).

    The official code keeps the epoch with the best plain test accuracy and reports its flip-averaged
    accuracy: optimistic, because the test set picks the epoch. The flip value is None in a history written
    before flip accuracy was recorded per epoch. None: no evaluated epoch (a post-hoc run).
    """
    path = Path(run_dir) / "history.csv"
    if not path.exists():
        return None
    hist = pd.read_csv(path)
    if "test_acc" not in hist:
        return None
    plain = pd.to_numeric(hist["test_acc"], errors="coerce")
    if plain.notna().sum() == 0:
        return None
    best = plain.idxmax()  # the first epoch with the maximum, as the official code's strict ">" keeps it
    flip = pd.to_numeric(hist["test_acc_flip"], errors="coerce")[best] if "test_acc_flip" in hist else None
    return float(plain[best]), (None if flip is None or pd.isna(flip) else float(flip))


def best_test_cells(runs: list[tuple[float, float | None] | None]) -> tuple[list[float | None], str]:
    """Per-seed optimistic figures and their kind: flip (WB's) when every history has it, else plain."""
    found = [r for r in runs if r is not None]
    if found and all(f is not None for _, f in found):
        return [None if r is None else r[1] for r in runs], "flip"
    # An older history (no per-epoch flip accuracy): the best plain accuracy, for every seed alike.
    return [None if r is None else r[0] for r in runs], "plain" if found else ""


BEST_NOTE = (
    "\"best test epoch\" (optimistic): WB's reported figure, the flip-averaged accuracy at the epoch with "
    "the highest plain test accuracy over the epochs a run evaluated (every stage-2 epoch; every "
    "`eval_every` stage-1 epochs), read from its history.csv. The test set picks the epoch, so it "
    "flatters; it is shown only to size how much of a gap to WB's numbers that protocol explains, and "
    "nothing here is chosen by it. \"(plain)\": a run from before flip accuracy was recorded per epoch, "
    "showing the highest plain accuracy instead. \"–\": a post-hoc row has no epochs of its own."
)


CB_NOTE = (
    "CB loss: \"WB's loss\" is the class-balanced loss of WB's code (binary cross-entropy of the softmax "
    "probabilities against the one-hot label, weighted by the label's class weight, averaged over batch x "
    "classes: about 1/C of a weighted cross-entropy); \"weighted CE\" is ours (the class-weighted "
    "cross-entropy, averaged over the batch). WB's columns were made with WB's loss."
)


def collect(rows: tuple[Row, ...], where: dict[tuple[str, float, int], Path], seeds: list[int],
            imbalances: list[float], dataset: str = "cifar100") -> pd.DataFrame:
    """One DataFrame row per (imbalance, row, tta): mean, std, n and WB's value for each group."""
    cifar100 = dataset == "cifar100"  # WB's tables are CIFAR100-LT only
    records = []
    for imb in imbalances:
        for row in rows:
            metrics, best = [], []
            for seed in seeds:
                path = where[row.name, imb, seed] / "metrics.json"
                if path.exists():
                    metrics.append(read_json(path))
                    best.append(best_test_epoch(path.parent))
            best_values, best_tta = best_test_cells(best)
            best_mean, best_std, best_n = _cell(best_values)
            wb_row = row.paper or row.name
            for tta in ("plain", "flip"):
                rec: dict = {"imbalance": imb, "row": row.name, "cb_loss": cb_label(row), "tta": tta,
                             "seeds": len(metrics)}
                rec.update(best_test_all_mean=best_mean, best_test_all_std=best_std, best_test_all_n=best_n,
                           best_test_tta=best_tta)
                paper = PAPER_TABLE1.get(wb_row) if imb == 100 and cifar100 else None
                for i, g in enumerate(GROUPS):
                    mean, std, n = _cell([m[tta][g] for m in metrics])
                    ref = paper[i] if paper else (PAPER_TABLE2.get(wb_row, {}).get(int(imb))
                                                  if g == "all" and cifar100 else None)
                    rec[f"{g}_mean"], rec[f"{g}_std"], rec[f"{g}_n"] = mean, std, n
                    rec[f"{g}_paper"] = ref
                    rec[f"{g}_diff"] = None if mean is None or ref is None else mean - ref
                records.append(rec)
    return pd.DataFrame.from_records(records)


def _mean_std(rec: pd.Series, key: str, empty: str) -> str:
    """rec's {key}_mean ± {key}_std over seeds; `empty` when runs finished without a value, else "no run"."""
    mean, std = rec[f"{key}_mean"], rec[f"{key}_std"]
    if pd.isna(mean):
        return empty if rec["seeds"] else "no run"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if not pd.isna(std) else "")


def fmt_cell(rec: pd.Series, g: str) -> str:
    """A cell of ours: mean ± std over seeds, "n/a" for an empty group, "no run" when nothing finished."""
    return _mean_std(rec, g, "n/a" if rec[f"{g}_n"] == 0 else "no run")


def fmt_best(rec: pd.Series) -> str:
    """The optimistic cell: mean ± std over seeds; "(plain)" marks old histories, "–" a post-hoc row."""
    cell = _mean_std(rec, "best_test_all", "–")
    old = rec.get("best_test_tta") == "plain" and not pd.isna(rec["best_test_all_mean"])
    return cell + (" (plain)" if old else "")


def _fmt_num(x: object, signed: bool = False) -> str:
    if x is None or pd.isna(x):
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def synthetic_note(where: dict) -> str:
    """A warning line when any finished run of the plan trained on synthetic files, else ''."""
    runs = [p / "metrics.json" for p in where.values() if (p / "metrics.json").exists()]
    if any(read_json(m).get("synthetic_data") for m in runs):
        return ("**These runs used SYNTHETIC images (ltr.synthetic), not CIFAR: the numbers describe the "
                "code, not the paper.**\n")
    return ""


def md_rows(head: list[str], rows: list[list[str]], preset: str | None = None) -> list[str]:
    """Markdown table lines, preceded by a warning when the preset is not the paper's."""
    lines = []
    if preset is not None and preset != "paper":
        lines += [f"**Preset `{preset}` is not the paper's recipe: compare shapes, not numbers.**", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def markdown_table1(df: pd.DataFrame, imbalance: float, tta: str, preset: str, seeds: list[int],
                    dataset: str = "cifar100") -> str:
    """Table 1 as markdown: ours (mean ± std over seeds), WB's value and the difference per group."""
    sub = df[(df.imbalance == imbalance) & (df.tta == tta)]
    head = ["row", "CB loss"] + [f"{g.capitalize()} ours" for g in GROUPS]
    head += [f"{g.capitalize()} WB" for g in GROUPS]
    head += [f"Δ {g.capitalize()}" for g in GROUPS] + ["All, best test epoch (optimistic)"]
    lines = [
        f"# Table 1: {dataset.upper()}-LT, imbalance factor {imbalance:g} (preset `{preset}`)",
        "",
        f"Evaluation: **{'flip-averaged logits' if tta == 'flip' else 'plain (no test-time flip)'}** on "
        "the full balanced test set, last epoch, no test-set epoch selection. Ours: mean ± std over "
        f"seeds {', '.join(map(str, seeds))}. WB: the paper's Table 1 (they average flips and pick the "
        "best test epoch). \"n/a\": the group has no class; \"no run\": no finished run in this folder.",
        "",
        BEST_NOTE,
        "",
        CB_NOTE,
        "",
    ]
    body = [[rec["row"], rec["cb_loss"] or "–"] + [fmt_cell(rec, g) for g in GROUPS]
            + [_fmt_num(rec[f"{g}_paper"]) for g in GROUPS]
            + [_fmt_num(rec[f"{g}_diff"], signed=True) for g in GROUPS] + [fmt_best(rec)]
            for _, rec in sub.iterrows()]
    lines += md_rows(head, body, preset)
    return "\n".join(lines) + "\n"


def markdown_table2(df: pd.DataFrame, tta: str, preset: str) -> str:
    """Table 2 as markdown: "All" by imbalance factor, ours beside WB's."""
    imbs = sorted(df.imbalance.unique(), reverse=True)
    head = ["row"] + [f"IF {i:g} ours" for i in imbs] + [f"IF {i:g} WB" for i in imbs]
    lines = [f"# Table 2: CIFAR100-LT, All accuracy by imbalance factor (preset `{preset}`, {tta})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in PAPER_TABLE2:
        sub = df[(df.row == name) & (df.tta == tta)]
        if sub.empty:
            continue
        ours = [fmt_cell(sub[sub.imbalance == i].iloc[0], "all") for i in imbs]
        wb = [_fmt_num(PAPER_TABLE2[name].get(int(i))) for i in imbs]
        lines.append("| " + " | ".join([name] + ours + wb) + " |")
    return "\n".join(lines) + "\n"


def write_tables(rows: tuple[Row, ...], out: Path, where: dict, seeds: list[int], imbalances: list[float],
                 preset: str, dataset: str = "cifar100", tta: str = "flip",
                 figures: bool = True, suffix: str = "", header: str = "") -> dict[str, Path]:
    """table1{suffix}.csv / .md (and table2{suffix}.md for several imbalance factors) plus figures.

    suffix keeps a variant apart from the paper-valued table in the same folder (e.g. "-tuned");
    header is markdown put above the tables (what differs from the paper's recipe).
    """
    df = collect(rows, where, seeds, imbalances, dataset)
    t1, t2 = f"table1{suffix}", f"table2{suffix}"
    files = {f"{t1}.csv": out / f"{t1}.csv", f"{t1}.md": out / f"{t1}.md"}
    write_atomic(files[f"{t1}.csv"], df.to_csv(index=False))
    main_imb = 100.0 if 100.0 in imbalances else imbalances[0]
    md = [markdown_table1(df, i, tta, preset, seeds, dataset)
          for i in [main_imb] + [i for i in imbalances if i != main_imb]]
    write_atomic(files[f"{t1}.md"], synthetic_note(where) + header + "\n".join(md))
    if len(imbalances) > 1:
        files[f"{t2}.md"] = out / f"{t2}.md"
        write_atomic(files[f"{t2}.md"], header + markdown_table2(df, tta, preset))
    write_json(out / f"runs{suffix}.json", {
        "preset": preset, "seeds": seeds, "imbalances": imbalances,
        "runs": [{"row": r, "imbalance": i, "seed": s, "dir": str(p)} for (r, i, s), p in where.items()],
        "rows": [asdict(r) for r in rows],
    })
    if figures:
        files.update(table_figures(rows, out, where, seeds[0], main_imb, preset, folder=f"figures{suffix}"))
    return files


def table_figures(rows: tuple[Row, ...], out: Path, where: dict, seed: int, imbalance: float,
                  preset: str, folder: str = "figures") -> dict[str, Path]:
    """SPEC 5's figures from the run directories of one seed, into out/folder."""
    from .. import plots  # builds Figures without pyplot: no backend switch, nothing left open

    fig_dir = out / folder
    fig_dir.mkdir(parents=True, exist_ok=True)
    done = {r.name: where[r.name, imbalance, seed] for r in rows
            if (where[r.name, imbalance, seed] / "metrics.json").exists()}
    if not done:
        return {}
    note = "" if preset == "paper" else f" [preset {preset}: not the paper's recipe]"
    if any(read_json(d / "metrics.json").get("synthetic_data") for d in done.values()):
        note += " [SYNTHETIC data: describes the code, not the paper]"
    names, dirs = list(done), list(done.values())
    stage1 = [n for n in names if not next(r for r in rows if r.name == n).stage2]
    figs = {
        "weight_norms.png": ("Per-class weight norms", lambda: plots.plot_weight_norms(dirs, labels=names)),
        "marginal_likelihood.png": (
            "Marginal likelihood per class", lambda: plots.plot_marginal_likelihood(dirs, labels=names)),
        "group_accuracy.png": (
            "Accuracy by group (flip)", lambda: plots.plot_group_accuracy(dirs, labels=names, tta="flip")),
    }
    for n in stage1:
        key = next(r for r in rows if r.name == n).stage1
        figs[f"norm_evolution_{key}.png"] = (
            f"{n}: weight norms over epochs", lambda d=done[n]: plots.plot_norm_evolution(d))
        figs[f"per_class_accuracy_{key}.png"] = (
            f"{n}: per-class accuracy", lambda d=done[n]: plots.plot_per_class_accuracy(d))
    s1_dirs = {n: done[n] for n in stage1}
    if len(s1_dirs) > 1 and plots.has_feature_analysis(list(s1_dirs.values())):
        # Why weight decay helps (or not): the stage-1 models' Fisher ratio and cone effect side by side.
        figs["feature_analysis.png"] = (
            "Feature analysis of the stage-1 models",
            lambda: plots.plot_feature_analysis(list(s1_dirs.values()), labels=list(s1_dirs)))
    best = "+ CB & WD & Max"
    if best in done:
        figs["per_class_accuracy_cb_wd_max.png"] = (
            f"{best}: per-class accuracy", lambda: plots.plot_per_class_accuracy(done[best]))
    written = {}
    for fname, (title, make) in figs.items():
        fig = make()
        fig.suptitle(title + note)
        write_atomic(fig_dir / fname, plots.figure_png(fig))
        written[f"{folder}/{fname}"] = fig_dir / fname
    return written
