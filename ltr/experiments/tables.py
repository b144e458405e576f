"""Table 1 / Table 2 of WB: the rows, the plan of runs each row needs, and the runner.

A row is a recipe (which stage-1 model, which stage 2 on top); the plan maps every (row, imbalance
factor, seed) to a run directory, stage-1 runs shared between rows; the runner trains what is missing
and hands the run directories to ltr.experiments.report, which writes the tables beside the paper's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import config
from ..data import load_cifar_lt, resolve_device
from ..engine.precision import check_precision
from ..engine.rundir import read_json, write_json
from ..errors import LtrError, TimeLimitReached
from ..train import stage2_from, train_stage1, train_stage2
from .jobs import check_jobs, run_parallel, stage_kwargs
from .report import PAPER_TABLE1, write_tables  # noqa: F401 - PAPER_TABLE1 re-exported for the notebooks
from .tuning import check_preset, read_tuned, tuned_header

# The stage-1 models a row can start from: Stage1Config fields over the preset's.
STAGE1_KINDS: dict[str, dict] = {
    "naive": {"wd": 0.0},  # WB's WD=0 model
    "wd": {},  # WB's tuned weight decay (the preset's wd, 5e-3 in the paper preset)
    "aux-balanced": {"method": "aux-balanced"},  # our reading of Zhang et al. (docs/recipe.md §6), same wd
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


def with_cb_variant(rows: tuple[Row, ...], variant: str | None, preset: str) -> tuple[Row, ...]:
    """Rows whose class-balanced recipes use `variant`: standard | official | both | None (the preset's).

    With both, each CB row (on the preset's variant, under its own name) is followed by the same recipe with
    the other loss, named "<row> (<label>)" and compared with the same WB row; the stage-1 runs are shared.
    """
    own = config.preset_config("stage2", preset).cb_variant  # an LtrError for an unknown preset
    if variant not in (None, "both", *config.CB_VARIANTS):
        raise LtrError(f"--cb-variant {variant!r} is not one of {(*config.CB_VARIANTS, 'both')}")
    first = own if variant in (None, "both") else variant
    out: list[Row] = []
    for row in rows:
        if row.stage2.get("loss") != "cb":
            out.append(row)
            continue
        out.append(replace(row, stage2={**row.stage2, "cb_variant": first}))
        if variant == "both":
            other = next(v for v in config.CB_VARIANTS if v != first)
            out.append(replace(row, name=f"{row.name} ({config.CB_LABELS[other]})",
                               paper=row.paper or row.name, stage2={**row.stage2, "cb_variant": other}))
    return tuple(out)


def with_fidelity(rows: tuple[Row, ...], fidelity: str) -> tuple[Row, ...]:
    """Rows whose trained stage-2 recipes run at `fidelity` (stage-1 and post-hoc rows are unchanged)."""
    if fidelity not in config.FIDELITIES:
        raise LtrError(f"--fidelity {fidelity!r} is not one of {config.FIDELITIES}")
    official = {"fidelity": fidelity, **config.OFFICIAL_STAGE2}
    return rows if fidelity == "corrected" else tuple(replace(r, stage2={**r.stage2, **official})
                                                      if r.stage2 and not r.stage2.get("posthoc") else r
                                                      for r in rows)


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
                    {"posthoc": "mla", "tau": config.MLA_TAU})


@dataclass(frozen=True)
class PlannedRun:
    """One run of the plan: its directory and config (stage-2 runs name their stage-1 run)."""

    out: Path  # run directory
    stage: str  # stage1 | stage2
    config: object  # Stage1Config | Stage2Config
    imbalance: float  # imbalance factor (to pick the data)


def stage1_config(kind: str, preset: str, imbalance: float, seed: int,
                  dataset: str = "cifar100", **fields_: object) -> config.Stage1Config:
    """The stage-1 config of a row's kind (STAGE1_KINDS), e.g. naive (wd 0) or tuned weight decay (5e-3)."""
    if kind not in STAGE1_KINDS:
        raise LtrError(f"unknown stage-1 kind {kind!r}; choose one of {sorted(STAGE1_KINDS)}")
    cfg = config.preset_config("stage1", preset, dataset=dataset, imbalance=float(imbalance), seed=seed)
    return replace(cfg, **{**STAGE1_KINDS[kind], **fields_})


def plan(rows: tuple[Row, ...], out: Path, preset: str, imbalances: list[float], seeds: list[int],
         dataset: str = "cifar100") -> tuple[list[PlannedRun], dict[tuple[str, float, int], Path]]:
    """Every run the rows need, stage-1 runs shared between rows; and (row, IF, seed) -> run dir."""
    runs: dict[Path, PlannedRun] = {}
    where = {(row.name, float(imb), seed): plan_row(runs, row, out, preset, imb, seed, dataset)
             for imb in imbalances for seed in seeds for row in rows}
    # Stage-1 runs first, so every stage-2 run finds its backbone finished.
    return sorted(runs.values(), key=lambda r: r.stage), where


def plan_row(runs: dict[Path, PlannedRun], row: Row, out: Path, preset: str, imbalance: float, seed: int,
             dataset: str, from_run: str | os.PathLike | None = None) -> Path:
    """Add the runs a row needs to runs (keyed by directory, so shared) and return the row's run directory;
    from_run: a finished stage-1 run that stage 2 starts from instead of the row's own."""
    s1_dir = Path(from_run) if from_run is not None else None
    if s1_dir is None:
        s1 = stage1_config(row.stage1, preset, imbalance, seed, dataset, **row.stage1_fields)
        s1_dir = out / "stage1" / config.run_name(s1)
        runs.setdefault(s1_dir, PlannedRun(s1_dir, "stage1", s1, imbalance))
    if not row.stage2:
        return s1_dir
    s2 = replace(stage2_from(s1_dir, preset, **row.stage2), seed=seed)
    target = out / "stage2" / s1_dir.name / config.stage2_name(s2)
    runs.setdefault(target, PlannedRun(target, "stage2", s2, imbalance))
    return target


def claim_out_dir(out: Path, preset: str, dataset: str) -> None:
    """Mark out as a table folder of this preset and dataset; refuse one that another preset made."""
    marker = out / "table.json"
    if marker.exists():
        old = read_json(marker)
        if (old.get("preset"), old.get("dataset")) != (preset, dataset):
            raise LtrError(f"{out} holds a table made with --preset {old.get('preset')} on "
                           f"{old.get('dataset')}; runs of another preset are kept apart: pass another --out "
                           f"(e.g. {out}-{preset})")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"preset": preset, "dataset": dataset})


def run_plan(rows: tuple[Row, ...], root: str | os.PathLike, out: str | os.PathLike, preset: str,
             seeds: list[int] | tuple[int, ...], imbalances: list[float] | tuple[float, ...],
             dataset: str = "cifar100", device: str = "auto", download: bool = False, compile: bool = False,
             progress: bool = True, allow_cpu: bool = False, desc: str = "table", precision: str = "auto",
             jobs: int = 1, compile_mode: str = "default",
             ) -> tuple[dict[tuple[str, float, int], Path], list[int], list[float]]:
    """Run every run the rows need (finished ones skipped, unfinished resumed); (row, IF, seed) -> dir.
    jobs > 1 trains independent runs at once in worker processes (jobs), into the same run directories."""
    seeds = [int(s) for s in seeds]
    if len(set(seeds)) != len(seeds):
        raise LtrError(f"--seeds {seeds} lists a seed twice; give each seed once")
    check_preset(preset)
    imbalances = [float(i) for i in imbalances]
    check_precision(precision)
    check_jobs(jobs)
    dev = resolve_device(device)
    if preset == "paper" and dev.type != "cuda" and not allow_cpu:
        raise LtrError(f"the paper preset trains {len({r.stage1 for r in rows})} ResNet-34s for 200 epochs "
                       "per seed and imbalance factor: days on a CPU. Run it on a CUDA GPU, or try the "
                       "pipeline with --preset smoke (add --allow-cpu to insist)")
    out = Path(out)
    data = {imb: load_cifar_lt(root, dataset, imb, download=download) for imb in imbalances}  # before any run
    claim_out_dir(out, preset, dataset)
    runs, where = plan(rows, out, preset, imbalances, seeds, dataset)
    train_runs(runs, data, dev, root, dataset, compile=compile, precision=precision, jobs=jobs,
               progress=progress, desc=f"{desc} ({preset})", compile_mode=compile_mode)
    return where, seeds, imbalances


def train_runs(runs: list[PlannedRun], data: dict, dev: torch.device, root: str | os.PathLike,
               dataset: str, compile: bool = False, precision: str = "auto", jobs: int = 1,
               progress: bool = True, desc: str = "runs", compile_mode: str = "default") -> None:
    """Train planned runs (stage 1 before the stage 2 on top), finished ones skipped, others resumed; data
    maps each imbalance factor to its LTData; compile applies to stage 1 only (jobs.stage_kwargs)."""
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
        s2, s1 = dict(row.stage2), dict(row.stage1_fields)
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


def apply_tuned(rows: tuple[Row, ...], tuned: list | tuple, preset: str, dataset: str,
                imbalances: list[float]) -> tuple[tuple[Row, ...], str, str]:
    """(rows, file suffix, markdown header) with the values the sweeps in `tuned` chose; rows as they are
    without any."""
    if not tuned:
        return rows, "", ""
    chosen = read_tuned(tuned, preset, dataset, imbalances)
    rows = tune_rows(rows, {kind: value for kind, (value, _, _) in chosen.items()})
    return rows, "-tuned", tuned_header(chosen, preset)


def run_table(rows: tuple[Row, ...] = TABLE1_ROWS, root: str | os.PathLike = "data",
              out: str | os.PathLike = "exp/table1", preset: str = "paper",
              seeds: list[int] | tuple[int, ...] = (0,), imbalances: list[float] | tuple[float, ...] = (100,),
              dataset: str = "cifar100", device: str = "auto", download: bool = False, compile: bool = False,
              progress: bool = True, allow_cpu: bool = False, figures: bool = True, precision: str = "auto",
              jobs: int = 1, tuned: list[str | os.PathLike] | tuple[str | os.PathLike, ...] = (),
              cb_variant: str | None = None, fidelity: str = "corrected",
              compile_mode: str = "default") -> dict[str, Path]:
    """Plan, run (skipping finished runs, resuming unfinished ones) and tabulate; returns written files.

    tuned: sweep directories (sweep) whose validation-chosen values replace the paper's; the table
    is then written as table1-tuned.md / .csv beside the paper-valued one, and its header says so.
    cb_variant: the class-balanced loss of the CB rows (standard | official | both; None = the preset's).
    fidelity: stage 2's (official: WB's epoch-stepped schedule, MaxNorm once per epoch, BN in train mode;
    the table is then table1[-tuned]-official.md / .csv).
    """
    rows = with_fidelity(with_cb_variant(rows, cb_variant, preset), fidelity)
    rows, suffix, header = apply_tuned(rows, tuned, preset, dataset, [float(i) for i in imbalances])
    if fidelity == "official":
        suffix += "-official"
        header += ("**Stage 2 at `--fidelity official`**: WB's cosine stepped at the start of each epoch "
                   "(the last epoch at lr 0), MaxNorm projected once per epoch, the frozen backbone's BN in "
                   "train mode, fp32.\n\n")
    tables = dict(dataset=dataset, figures=figures, suffix=suffix, header=header)
    try:
        where, seeds, imbalances = run_plan(rows, root, out, preset, seeds, imbalances, dataset, device,
                                            download, compile, progress, allow_cpu, precision=precision,
                                            jobs=jobs, compile_mode=compile_mode)
    except TimeLimitReached:
        # Cut by the time limit: the tables of what finished ("no run" elsewhere), then the cut itself.
        seeds, imbalances = [int(s) for s in seeds], [float(i) for i in imbalances]
        _, where = plan(rows, Path(out), preset, imbalances, seeds, dataset)
        write_tables(rows, Path(out), where, seeds, imbalances, preset, **tables)
        raise
    return write_tables(rows, Path(out), where, seeds, imbalances, preset, **tables)
