"""WB beside its neighbours on one backbone and budget: aux-balanced (our reading of Zhang et al.), the
decoupling / loss baselines (cRT, LWS, logit adjustment, balanced softmax, LDAM-DRW) and Hasegawa & Sato's
one-stage recipe (our implementation).

Planning, running and resume are the Table 1 runner's (tables), the cells, notes and figures the Table 1
report's (report); this module only picks the rows and writes compare.csv / compare.md. A cell of ours is
the mean (± std) over the seeds that a run in the output folder produced; a published number is only ever
one that report quotes from a paper.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..config import MLA_TAU, preset_config
from ..engine.rundir import write_atomic
from . import report
from .tables import ONE_STAGE_ROW, Row, apply_tuned, run_plan, with_cb_variant

IMBALANCE = 100.0  # the published figures are CIFAR100-LT at imbalance factor 100
DATASET = "cifar100"

COMPARE_ROWS: tuple[Row, ...] = (
    Row("WD=0 (w/ CE)", "naive"),
    Row("WD tuned (w/ CE)", "wd"),
    Row("+ CB & WD & Max", "wd", {"loss": "cb", "wd": 0.1, "maxnorm": 0.1}),
    Row("aux-balanced (our reading)", "aux-balanced"),
    Row("aux-balanced + rotation (our reading)", "aux-balanced-rotation"),
    Row("+ cRT", "wd", {"sampling": "balanced", "reinit": True}),
    Row("+ LWS", "wd", {"sampling": "balanced", "lws": True}),
    Row("+ tau-norm", "wd", {"posthoc": "tau-norm", "tau": 1.9}),
    Row("+ logit adjustment, post-hoc (tau=1)", "wd", {"posthoc": "logit-adjust", "la_tau": 1.0}),
    # Ren et al.'s balanced softmax is this loss at tau = 1 (`--loss bs` computes the same numbers), so
    # one run serves both names.
    Row("+ logit-adjusted loss (tau=1) = balanced softmax", "wd", {"loss": "la", "la_tau": 1.0}),
    Row("+ LDAM-DRW", "wd", {"loss": "ldam-drw"}),
    # Hasegawa & Sato's one-stage recipe: its stage-1 model alone, then with the post-hoc adjustment.
    Row("ETF + feature reg., before MLA (our implementation)", "etf-fr"),
    ONE_STAGE_ROW,
)


@dataclass(frozen=True)
class Published:
    """Where a row's published CIFAR100-LT IF100 figure comes from (keys into report's quotes)."""

    wb_row: str | None = None  # a row of WB Table 1 with the same recipe (PAPER_TABLE1)
    peer: str | None = None  # the method's own paper, own recipe, as WB Table 2 quotes it (PAPER_PEERS)
    note: str = ""  # what the reader must know about the figure


OUR_READING = "our reading, no published number"
OUR_IMPLEMENTATION = "our implementation of Hasegawa & Sato (ICLR 2024), no published number quoted"

PUBLISHED: dict[str, Published] = {
    "WD=0 (w/ CE)": Published("WD=0 (w/ CE)", "CE"),
    "WD tuned (w/ CE)": Published("WD tuned (w/ CE)"),
    "+ CB & WD & Max": Published("+ CB & WD & Max"),
    "aux-balanced (our reading)": Published(note=OUR_READING),
    "aux-balanced + rotation (our reading)": Published(note=OUR_READING),
    "+ tau-norm": Published("+ tau-norm", "tau-norm (Kang et al.)"),
    "+ logit adjustment, post-hoc (tau=1)": Published(
        peer="LogitAdjust", note="WB Table 2 does not say which LogitAdjust variant it quotes"),
    "+ logit-adjusted loss (tau=1) = balanced softmax": Published(
        peer="LogitAdjust", note="WB Table 2 does not say which LogitAdjust variant it quotes"),
    "+ LDAM-DRW": Published(peer="LDAM-DRW"),
    "ETF + feature reg., before MLA (our implementation)": Published(note=OUR_IMPLEMENTATION),
    ONE_STAGE_ROW.name: Published(note=OUR_IMPLEMENTATION),
}

# What each stage-1 kind is, in words, for the table's "stage 1" column.
STAGE1_WORDS = {
    "naive": "CE, WD=0",
    "wd": "CE, WD={wd:g}",
    "aux-balanced": "aux-balanced, WD={wd:g}",
    "aux-balanced-rotation": "aux-balanced + rotation, WD={wd:g}",
    "etf-fr": "fixed ETF + feature reg., WD={wd:g}",
}


def published_cell(name: str) -> str:
    """The markdown 'published' cell of a row: WB's same-recipe figure and/or the method paper's own."""
    pub = PUBLISHED.get(name, Published())
    parts = []
    if pub.wb_row is not None:
        parts.append(f"{report.PAPER_TABLE1[pub.wb_row][3]:.2f} (WB Table 1, same recipe)")
    if pub.peer is not None:
        parts.append(f"{report.PAPER_PEERS[pub.peer]:.2f} ({pub.peer}, own recipe, via WB Table 2)")
    if pub.note:
        parts.append(pub.note)
    return "; ".join(parts) or "–"


def compare_frame(rows: tuple[Row, ...], where: dict, seeds: list[int], preset: str) -> pd.DataFrame:
    """collect()'s table (ours, WB's same-recipe Many/Medium/Few/All) plus stage 1, recipe and peers."""
    df = report.collect(rows, where, seeds, [IMBALANCE], DATASET)
    by_name = {r.name: r for r in rows}
    wd = preset_config("stage1", preset).wd
    df.insert(2, "stage1", [STAGE1_WORDS.get(by_name[n].stage1, by_name[n].stage1).format(wd=wd)
                            for n in df.row])
    df.insert(3, "stage2", [json.dumps(by_name[n].stage2, sort_keys=True) if by_name[n].stage2 else ""
                            for n in df.row])
    df["peer"] = peers = [PUBLISHED.get(n, Published()).peer for n in df.row]
    df["peer_all"] = [report.PAPER_PEERS[p] if p else None for p in peers]
    df["published"] = [published_cell(n) for n in df.row]
    return df


def _posthoc_tau(rows: tuple[Row, ...], posthoc: str, default: float) -> float:
    """The tau of the first row with this post-hoc adjustment (a tuned table changes it), else default."""
    return next((float(r.stage2.get("tau", default)) for r in rows if r.stage2.get("posthoc") == posthoc),
                default)


def markdown_compare(df: pd.DataFrame, tta: str, preset: str, seeds: list[int],
                     taus: tuple[float, float] = (1.9, MLA_TAU)) -> str:
    """The comparison as markdown: ours (mean ± std over seeds) beside the published figures; taus: the tau
    of tau-norm and of the one-stage recipe's logit adjustment, as the rows used them."""
    tau_norm, mla_tau = taus
    sub = df[df.tta == tta]
    head = (["method", "stage 1"] + [g.capitalize() for g in report.GROUPS]
            + ["All, best test epoch (optimistic)", "published All (source)"])
    lines = [
        f"# WB beside aux-balanced and the decoupling baselines: CIFAR100-LT, IF 100 (preset `{preset}`)",
        "",
        f"Evaluation: **{report.tta_words(tta)}** on the "
        "full balanced test set, last epoch, no test-set epoch selection. Ours: mean ± std over seeds "
        f"{', '.join(map(str, seeds))}. Every row here uses the same backbone, optimizer, stage-1 epochs and "
        "augmentation; the \"+ ...\" rows retrain (or adjust) the classifier of the WD-tuned stage-1 model "
        "with the stage-2 schedule. \"n/a\": the group has no class; \"no run\": no finished run here.",
        "",
        "Published figures: \"same recipe\" = WB's own Table 1 row; \"own recipe\" = the method's paper with "
        "its own backbone and schedule (end to end), as WB's Table 2 quotes it, so not like for like. "
        "aux-balanced is our reading of the abstract of Zhang et al. (\"To Balance or Not to Balance\"), "
        "which publishes no code or number. \"–\": no published CIFAR100-LT IF100 figure in our sources.",
        "", report.BEST_NOTE, "",
    ]
    body = [[rec["row"], rec["stage1"]] + [report.fmt_cell(rec, g) for g in report.GROUPS]
            + [report.fmt_best(rec), rec["published"]] for _, rec in sub.iterrows()]
    lines += report.md_rows(head, body, preset) + [
        "",
        "Recipes: cRT = classifier re-initialised and retrained with class-balanced sampling (Kang et al.); "
        "LWS = stage-1 classifier frozen, a per-class logit scale (init 1) learnt on class-balanced batches "
        f"(Kang et al.); tau-norm = w_c / ||w_c||^{tau_norm:g}; logit adjustment post-hoc = b_c - tau log "
        "p(c), no training (Menon et al.); logit-adjusted loss = CE on z + tau log p(y) (Menon et al.), "
        "which at tau = 1 is balanced softmax (Ren et al.); LDAM-DRW = cosine classifier, s = 30, margins "
        "proportional to n_c^(-1/4) with the largest 0.5, class-balanced weights (beta 0.9999) from the "
        "second half of the epochs on (Cao et al.); Hasegawa & Sato one-stage = stage 1 with a fixed, "
        "untrained simplex-ETF classifier (unit rows, randomly rotated into feature space), a learnable bias "
        "and CE + 0.01 x batch mean of ||f||^2 / 2 (the preset's weight decay on every trained parameter), "
        f"then every logit divided by p(c)^{mla_tau:g}, no training (our implementation, on this table's "
        "backbone and schedule, not theirs). Priors p(c) are the training counts.",
        "",
    ]
    return "\n".join(lines)


def write_compare(rows: tuple[Row, ...], out: Path, where: dict, seeds: list[int], preset: str,
                  tta: str = "flip", figures: bool = True, suffix: str = "",
                  header: str = "") -> dict[str, Path]:
    """compare{suffix}.csv / .md, compare{suffix}_runs.json, compare{suffix}_groups.png and figures; suffix
    keeps a variant apart in the same folder ("-tuned"); header is markdown above the table."""
    # Every name starts with "compare", so the folder may be a Table 1 folder whose runs it reuses.
    df = compare_frame(rows, where, seeds, preset)
    md = markdown_compare(df, tta, preset, seeds, (_posthoc_tau(rows, "tau-norm", 1.9),
                                                   _posthoc_tau(rows, "mla", MLA_TAU)))
    files = report.write_report(out, f"compare{suffix}", df, header + md, f"compare{suffix}_runs.json", rows,
                                where, preset, seeds, [IMBALANCE])
    if figures:
        from .. import plots

        # The figure a reader looks at first: every method's groups with their spread over seeds.
        note = report.figure_note(preset, bool(report.synthetic_note(where)))
        fig = plots.plot_group_summary(df, tta=tta)
        fig.suptitle(f"CIFAR100-LT IF 100, seeds {', '.join(map(str, seeds))}{note}", fontsize=9)
        png = out / f"compare{suffix}_groups.png"
        write_atomic(png, plots.figure_png(fig))
        files[png.name] = png
        files.update(report.table_figures(rows, out, where, seeds[0], IMBALANCE, preset,
                                          f"figures-compare{suffix}"))
    return files


def run_compare(root: str | os.PathLike = "data", out: str | os.PathLike = "exp/compare",
                preset: str = "paper", seeds: list[int] | tuple[int, ...] = (0,), device: str = "auto",
                download: bool = False, compile: bool = False, progress: bool = True, allow_cpu: bool = False,
                figures: bool = True,
                rows: tuple[Row, ...] = COMPARE_ROWS, precision: str = "auto", jobs: int = 1,
                tuned: list[str | os.PathLike] | tuple[str | os.PathLike, ...] = ()) -> dict[str, Path]:
    """Plan, run (finished runs skipped, unfinished resumed) and tabulate the comparison; returns files.
    tuned: sweep directories (ltr sweep) whose validation-chosen values replace WB's in WB's rows and in
    every baseline on the tuned-weight-decay backbone; written as compare-tuned.* beside compare.*."""
    rows = with_cb_variant(rows, None, preset)  # the preset's CB loss, named in compare.csv's cb_loss
    rows, suffix, header = apply_tuned(rows, tuned, preset, DATASET, [IMBALANCE])
    where, seeds, _ = run_plan(rows, root, out, preset, seeds, [IMBALANCE], DATASET, device, download,
                               compile, progress, allow_cpu, desc="compare", precision=precision, jobs=jobs)
    return write_compare(rows, Path(out), where, seeds, preset, figures=figures, suffix=suffix,
                         header=header)
