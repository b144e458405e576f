"""Figures from run directories: count profile, weight norms, marginal likelihood, accuracy (WB Fig. 2/3/6).

Every function reads finished run directories (never a live trainer) and returns a matplotlib Figure;
``save=path`` also writes it as a PNG. Figures are built without pyplot, so nothing pops up on a desktop,
nothing leaks in a loop, and no display is needed; notebooks still show a returned figure inline.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from .config import PRESETS
from .data import LtrError, class_groups, long_tail_counts
from .engine.rundir import read_json, write_atomic

GROUPS = ("many", "medium", "few")
GROUP_TITLES = {"many": "Many", "medium": "Medium", "few": "Few", "all": "All"}
GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
GROUP_RULES = {"many": "> 100 images", "medium": "20..100 images", "few": "< 20 images"}

# The fixed hyperparameters of WB's Table 1 rows: a run maps to a row only when it uses them.
# (The paper's numbers themselves live in ltr.experiments.tables.PAPER_TABLE1, once.)
WB_STAGE1_WD = 5e-3
WB_STAGE2_WD = 0.1
WB_MAXNORM = 0.1
WB_TAU = 1.9

RunLike = str | os.PathLike | dict
Runs = RunLike | Sequence[RunLike] | Mapping[str, RunLike]


class LtrFigure(Figure):
    """A Figure that Jupyter shows as a PNG when a cell returns it, without pyplot."""

    def _repr_png_(self) -> bytes:
        return figure_png(self)


def figure_png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure rendered as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def _figure(size: tuple[float, float]) -> LtrFigure:
    return LtrFigure(figsize=size, layout="constrained")


def _finish(fig: Figure, title: str | None, save: str | os.PathLike | None) -> Figure:
    if title:
        fig.suptitle(title, fontsize=11)
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, figure_png(fig))
    return fig


# ---------------------------------------------------------------- reading runs


def load_run(run_dir: str | os.PathLike) -> dict:
    """A finished run directory as a dict: config, metrics and the per-epoch history (or None)."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise LtrError(f"{run_dir} is not a run directory (no config.json)")
    if not (run_dir / "metrics.json").is_file():
        raise LtrError(
            f"the run in {run_dir} is not finished (no metrics.json); rerun its command to resume it"
        )
    info = read_json(run_dir / "config.json")
    history = None
    if (run_dir / "history.csv").is_file():
        history = pd.read_csv(run_dir / "history.csv")
        if history.empty:
            history = None
    return {
        "run_dir": run_dir,
        "name": run_dir.name,
        "stage": info.get("stage"),
        "config": info.get("config", {}),
        "stage1": info.get("stage1"),
        "runtime": info.get("runtime", {}),
        "metrics": read_json(run_dir / "metrics.json"),
        "history": history,
    }


def _load(run: RunLike) -> dict:
    if isinstance(run, dict) and "run_dir" in run and "metrics" in run:
        return run
    if isinstance(run, dict):
        raise LtrError("a run must be a run directory or what load_run() returned")
    return load_run(run)


def _load_many(runs: Runs, labels: Sequence[str] | None = None) -> list[tuple[str, dict]]:
    """Normalise one run, a list of runs, or a {label: run} mapping to [(label, loaded run)]."""
    if isinstance(runs, Mapping) and not ("run_dir" in runs and "metrics" in runs):
        keys, items = list(runs.keys()), list(runs.values())
        labels = list(labels) if labels is not None else [str(k) for k in keys]
    elif isinstance(runs, str | os.PathLike | dict):
        items = [runs]
    else:
        items = list(runs)
    if not items:
        raise LtrError("no runs to plot")
    loaded = [_load(r) for r in items]
    if labels is None:
        labels = [run_label(r) for r in loaded]
        if len(set(labels)) < len(labels):  # same recipe twice: tell them apart by directory name
            labels = [f"{lab} [{r['name']}]" for lab, r in zip(labels, loaded, strict=True)]
    labels = list(labels)
    if len(labels) != len(loaded):
        raise LtrError(f"{len(labels)} labels for {len(loaded)} runs")
    return list(zip(labels, loaded, strict=True))


def _stage1_config(run: dict) -> dict:
    return run["config"] if run["stage"] == "stage1" else (run.get("stage1") or {})


def run_label(run: RunLike) -> str:
    """A short name of a run in the paper's words, e.g. 'WD=5e-3' or '+ CB & WD & MaxNorm'."""
    run = _load(run)
    cfg = run["config"]
    s1 = _stage1_config(run)
    base = "WD=0 (naive)" if not s1.get("wd") else f"WD={s1['wd']:g}"
    if s1.get("method", "ce") == "aux-balanced":
        # SPEC 6 (our reading of Zhang et al.): balanced main head + instance auxiliary head.
        base = f"aux-balanced{' + rotation' if s1.get('ssl') else ''}, {base}"
    elif s1.get("method", "ce") == "etf-fr":
        # Hasegawa & Sato's stage 1: fixed simplex-ETF classifier and feature regularisation.
        base = f"fixed ETF + feature reg., {base}"
    if run["stage"] == "stage1":
        return base
    prefix = "WD=0 " if not s1.get("wd") else ""
    if s1.get("method", "ce") != "ce":
        prefix = f"[{base}] "
    if cfg.get("posthoc") == "logit-adjust":
        return f"{prefix}+ logit adjustment (tau={cfg.get('la_tau', 1.0):g})"
    if cfg.get("posthoc") == "mla":
        return f"{prefix}+ multiplicative logit adjustment (tau={cfg.get('tau', WB_TAU):g})"
    if cfg.get("posthoc") == "tau-norm":
        return f"{prefix}+ tau-norm (tau={cfg.get('tau', WB_TAU):g})"
    if cfg.get("posthoc") == "l2norm":
        return f"{prefix}+ L2-norm"
    parts = [str(cfg.get("loss", "ce")).upper()]
    if parts == ["CB"] and cfg.get("cb_variant") == "standard":
        parts = ["CB (weighted CE)"]  # ours; plain "CB" is WB's loss
    if cfg.get("sampling", "instance") != "instance":
        parts = ["cRT"] if cfg.get("reinit") and parts == ["CE"] else parts + ["balanced sampling"]
    if cfg.get("lws"):
        parts.append("LWS")
    if cfg.get("wd"):
        parts.append("WD")
    if cfg.get("maxnorm") is not None:
        parts.append("MaxNorm")
    if cfg.get("unit_norm"):
        parts.append("L2norm")
    if cfg.get("trainable", "fc") != "fc":
        prefix += "last two layers "
    return f"{prefix}+ {' & '.join(parts)}"


def _tuned_wd(s1: dict) -> bool:
    """WB's tuned weight decay, or a preset's own tuned value on that preset's backbone and schedule."""
    wd = float(s1.get("wd", 0.0))
    if math.isclose(wd, WB_STAGE1_WD):
        return True
    # The cpu preset retunes weight decay for its shorter, faster schedule: its tuned model is WB's
    # "WD tuned" row in that recipe, and only there (the same wd on another recipe is just a sweep point).
    for preset in PRESETS.values():
        fields = {k: v for k, v in preset["stage1"].items() if k != "eval_every"}
        if "wd" in fields and math.isclose(wd, fields["wd"]) and all(
                s1.get(k) == v for k, v in fields.items() if k != "wd"):
            return True
    return False


def table1_row(run: RunLike) -> str | None:
    """The name of WB's Table 1 row whose recipe this run follows (CIFAR100-LT IF100), or None."""
    run = _load(run)
    cfg = run["config"]
    s1 = _stage1_config(run)
    if s1.get("dataset", "cifar100") != "cifar100" or float(s1.get("imbalance", 100)) != 100:
        return None
    if s1.get("method", "ce") != "ce":
        return None
    naive, tuned = float(s1.get("wd", 0.0)) == 0, _tuned_wd(s1)
    if run["stage"] == "stage1":
        return "WD=0 (w/ CE)" if naive else "WD tuned (w/ CE)" if tuned else None
    if cfg.get("posthoc") == "tau-norm":
        if not math.isclose(float(cfg.get("tau", WB_TAU)), WB_TAU):
            return None
        return "WD=0 + tau-norm" if naive else "+ tau-norm" if tuned else None
    if not tuned or cfg.get("sampling", "instance") != "instance":
        return None
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
    loss = str(cfg.get("loss", "ce")).upper()
    parts = [loss] + (["WD"] if wd else []) + (["Max"] if mx is not None else [])
    parts += ["L2norm"] if cfg.get("unit_norm") else []
    row = "+ " + " & ".join(parts)
    if cfg.get("trainable", "fc") != "fc":
        row = "last two layers " + row
    return row


def _check_tta(tta: str) -> str:
    if tta not in ("plain", "flip"):
        raise LtrError(f"tta must be 'plain' or 'flip', got {tta!r}")
    return tta


def results_table(
    runs: Runs,
    labels: Sequence[str] | None = None,
    tta: str = "flip",
    paper: Mapping[str, Sequence[float]] | None = None,
) -> pd.DataFrame:
    """Many/Medium/Few/All per run ('n/a' = empty group), beside the paper's row of the same recipe."""
    # paper maps Table 1 row names to (Many, Medium, Few, All), e.g. tables.PAPER_TABLE1; the "WB"
    # columns are filled only for a run whose recipe is that row's (table1_row), else "-".
    _check_tta(tta)
    rows = []
    for label, run in _load_many(runs, labels):
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


# ---------------------------------------------------------------- decoration


def _distinct_colours(ax: Axes, n: int) -> None:
    """More than 10 runs in one plot: 20 distinct colours instead of the default 10 that repeat."""
    if n > 10:
        ax.set_prop_cycle(color=[colormaps["tab20"](i % 20) for i in range(n)])


def _class_bands(ax: Axes, counts: Sequence[int]) -> None:
    """Shade the Many/Medium/Few class ranges of a class-index axis and name them."""
    for g, classes in class_groups(counts).items():
        if not classes:
            continue
        lo, hi = min(classes) - 0.5, max(classes) + 0.5
        ax.axvspan(lo, hi, color=GROUP_COLOURS[g], alpha=0.08, lw=0)
        ax.text(
            (lo + hi) / 2, 0.98, f"{GROUP_TITLES[g]} ({len(classes)})", ha="center", va="top",
            transform=ax.get_xaxis_transform(), fontsize=8, color=GROUP_COLOURS[g],
        )
    ax.set_xlim(-0.5, len(counts) - 0.5)


def _class_axis(ax: Axes, values: Sequence[np.ndarray]) -> None:
    """Label a class-index axis; leave headroom above the curves for the group names."""
    ax.set_xlabel("class (sorted by training images: head on the left, tail on the right)")
    finite = [float(np.nanmax(v)) for v in values if np.isfinite(v).any()]
    top = max(finite) if finite else 1.0
    ax.set_ylim(0, top * 1.18 if top > 0 else 1.0)


# ---------------------------------------------------------------- figures


def plot_count_profile(
    imbalances: Sequence[float] = (100, 50, 10),
    n_max: int = 500,
    num_classes: int = 100,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Training images per class of the long-tailed set for each imbalance factor, log scale."""
    fig = _figure((7.5, 4.0))
    ax = fig.add_subplot()
    lowest = n_max
    for imb in imbalances:
        counts = long_tail_counts(n_max, num_classes, imb)
        sizes = "/".join(str(len(v)) for v in class_groups(counts).values())
        ax.plot(range(num_classes), counts, lw=2,
                label=f"IF {imb:g}: {sum(counts):,} images, Many/Med/Few {sizes}")
        lowest = min(lowest, min(counts))
    bottom, top = max(lowest * 0.6, 0.5), n_max * 1.6
    spans = {"many": (100, top), "medium": (20, 100), "few": (bottom, 20)}
    for g, (lo, hi) in spans.items():
        if hi <= lo:
            continue
        ax.axhspan(lo, hi, color=GROUP_COLOURS[g], alpha=0.08, lw=0)
        # Name each band just above its lower edge on the left, where the curves are still high.
        ax.text(0.01, lo * 1.08, f"{GROUP_TITLES[g]} ({GROUP_RULES[g]})", ha="left", va="bottom",
                transform=ax.get_yaxis_transform(), fontsize=8, color=GROUP_COLOURS[g])
    ax.set_yscale("log")
    ax.set_ylim(bottom, top)
    ax.set_xlim(-0.5, num_classes - 0.5)
    ax.set_xlabel("class index i (0 = head)")
    ax.set_ylabel("training images n_i (log scale)")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(f"n_i = n_max * IF^(-i/(C-1)),  n_max = {n_max}, C = {num_classes}", fontsize=9)
    return _finish(fig, title, save)


def plot_weight_norms(
    runs: Runs,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Per-class norms of the classifier weights of one or several runs (WB Fig. 3 and Fig. 6)."""
    loaded = _load_many(runs, labels)
    fig = _figure((10.5, 3.8))
    ax = fig.add_subplot()
    _distinct_colours(ax, len(loaded))
    _class_bands(ax, loaded[0][1]["metrics"]["counts"])
    curves = []
    for label, run in loaded:
        norms = np.asarray(run["metrics"]["weight_norms"], dtype=float)
        ax.plot(np.arange(len(norms)), norms, lw=1.4, label=label)
        curves.append(norms)
    _class_axis(ax, curves)
    ax.set_ylabel("||w_c|| (row of fc.weight)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("per-class classifier weight norms", fontsize=9)
    return _finish(fig, title, save)


def plot_marginal_likelihood(
    runs: Runs,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Mean softmax probability of each class over the balanced test set (WB Fig. 6); flat = unbiased."""
    loaded = _load_many(runs, labels)
    fig = _figure((10.5, 3.8))
    ax = fig.add_subplot()
    counts = loaded[0][1]["metrics"]["counts"]
    _distinct_colours(ax, len(loaded))
    _class_bands(ax, counts)
    curves = [np.array([1.0 / len(counts)])]
    for label, run in loaded:
        ml = np.asarray(run["metrics"]["marginal_likelihood"], dtype=float)
        ax.plot(np.arange(len(ml)), ml, lw=1.4, label=label)
        curves.append(ml)
    ax.axhline(1.0 / len(counts), color="0.3", ls="--", lw=1, label="uniform 1/C")
    _class_axis(ax, curves)
    ax.set_ylabel("mean p(class | test image)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("marginal likelihood per class on the balanced test set", fontsize=9)
    return _finish(fig, title, save)


def _norm_history(run: dict) -> tuple[np.ndarray, np.ndarray]:
    """(epochs, epochs x classes norms) from history.csv; a stage-2 run starts at its stage-1 norms."""
    hist = run["history"]
    cols = sorted((c for c in hist.columns if c.startswith("wn_")), key=lambda c: int(c[3:]))
    if not cols:
        raise LtrError(f"{run['run_dir']}/history.csv has no weight-norm columns (wn_0, wn_1, ...)")
    epochs = hist["epoch"].to_numpy(dtype=float)
    norms = hist[cols].to_numpy(dtype=float)
    src = Path(str(run["config"].get("from_run", "")))
    if run["stage"] == "stage2" and (src / "metrics.json").is_file():
        start = read_json(src / "metrics.json").get("weight_norms")
        if start is not None and len(start) == norms.shape[1]:
            epochs = np.concatenate([[0.0], epochs])
            norms = np.vstack([np.asarray(start, dtype=float), norms])
    return epochs, norms


def plot_norm_evolution(
    run: RunLike,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Classifier weight norms over the epochs (WB Fig. 2): group means and an epoch x class map."""
    run = _load(run)
    if run["history"] is None:
        raise LtrError(
            f"{run['run_dir']} has no history.csv: a post-hoc run trains nothing, so its norms do not "
            "evolve; plot its stage-1 run instead"
        )
    epochs, norms = _norm_history(run)
    counts = run["metrics"]["counts"]
    fig = _figure((10.0, 3.8))
    ax, hm = fig.subplots(1, 2, width_ratios=[1.0, 1.3])
    for g, classes in class_groups(counts).items():
        if not classes:
            continue
        part = norms[:, classes]
        ax.plot(epochs, part.mean(1), lw=2, color=GROUP_COLOURS[g],
                label=f"{GROUP_TITLES[g]} ({len(classes)} classes)")
        ax.fill_between(epochs, part.min(1), part.max(1), color=GROUP_COLOURS[g], alpha=0.15, lw=0)
    ax.set_xlabel("epoch" + (" (0 = the stage-1 classifier)" if epochs[0] == 0 else ""))
    ax.set_ylabel("||w_c||: group mean (band: min..max)")
    ax.set_ylim(bottom=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    ax.set_title("weight norms by group", fontsize=9)
    e0, e1 = epochs[0] - 0.5, epochs[-1] + 0.5
    im = hm.imshow(norms.T, aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(e0, e1, len(counts) - 0.5, -0.5))
    for classes in class_groups(counts).values():
        if classes and max(classes) < len(counts) - 1:
            hm.axhline(max(classes) + 0.5, color="white", lw=0.8, ls=":")
    hm.xaxis.set_major_locator(MaxNLocator(integer=True))
    hm.set_xlabel("epoch")
    hm.set_ylabel("class (head at the top)")
    hm.set_title("||w_c|| per class and epoch", fontsize=9)
    fig.colorbar(im, ax=hm, label="||w_c||")
    return _finish(fig, title, save)


def plot_per_class_accuracy(
    run: RunLike,
    tta: str = "plain",
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Test accuracy of every class with the Many/Medium/Few bands and each group's mean."""
    run = _load(run)
    m = run["metrics"]
    acc = np.asarray(m["per_class_acc" if _check_tta(tta) == "plain" else "per_class_acc_flip"], float)
    counts = m["counts"]
    fig = _figure((9.0, 3.8))
    ax = fig.add_subplot()
    _class_bands(ax, counts)
    ax.bar(np.arange(len(acc)), acc, width=0.85, color="0.35")
    for g, classes in class_groups(counts).items():
        mean = m[tta].get(g)
        if not classes or mean is None:
            continue
        lo, hi = min(classes) - 0.5, max(classes) + 0.5
        ax.plot([lo, hi], [mean, mean], color=GROUP_COLOURS[g], lw=2, ls="--")
        ax.text((lo + hi) / 2, mean + 1.5, f"mean {mean:.1f}", ha="center", va="bottom", fontsize=8,
                color=GROUP_COLOURS[g])
    _class_axis(ax, [np.array([100.0])])
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(f"test accuracy, % ({tta})")
    ax.set_title(f"per-class accuracy of {run_label(run)} (all classes: {m[tta]['all']:.1f}%)", fontsize=9)
    return _finish(fig, title, save)


def plot_group_accuracy(
    runs: Runs,
    labels: Sequence[str] | None = None,
    tta: str = "plain",
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Grouped bars of Many/Medium/Few/All accuracy per run; an empty group is marked n/a."""
    _check_tta(tta)
    loaded = _load_many(runs, labels)
    keys = (*GROUPS, "all")
    sizes = {g: len(v) for g, v in class_groups(loaded[0][1]["metrics"]["counts"]).items()}
    sizes["all"] = len(loaded[0][1]["metrics"]["counts"])
    n = len(loaded)
    width = 0.8 / n
    crowded = n > 4  # many bars: print their values upright so they do not overlap
    fig = _figure((max(6.5, 2.5 + 1.0 * n), 4.0))
    ax = fig.add_subplot()
    _distinct_colours(ax, n)
    for j, (label, run) in enumerate(loaded):
        m = run["metrics"][tta]
        offsets = [i + (j - (n - 1) / 2) * width for i in range(len(keys))]
        have = [(x, float(m[k])) for x, k in zip(offsets, keys, strict=True) if m.get(k) is not None]
        bars = ax.bar([x for x, _ in have], [v for _, v in have], width * 0.95, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1, rotation=90 if crowded else 0)
        for x, k in zip(offsets, keys, strict=True):
            if m.get(k) is None:
                ax.text(x, 2, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="0.4")
    ax.set_xticks(range(len(keys)), [f"{GROUP_TITLES[k]}\n({sizes[k]} classes)" for k in keys])
    ax.set_ylim(0, 118 if crowded else 110)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel(f"test accuracy, % ({'flip-averaged' if tta == 'flip' else 'plain'})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("accuracy by group (mean of per-class accuracies)", fontsize=9)
    return _finish(fig, title, save)


def plot_group_summary(
    table: pd.DataFrame | str | os.PathLike,
    tta: str = "flip",
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Many / Medium / Few / All per method: mean over seeds, ±1 std error bars (compare.csv, table1.csv).

    One panel per group, methods as horizontal bars in the table's order, so a long method name stays
    readable; the number of seeds behind each bar is printed beside it.
    """
    _check_tta(tta)
    df = pd.read_csv(table) if not isinstance(table, pd.DataFrame) else table
    need = {"row", "tta", *(f"{g}_mean" for g in (*GROUPS, "all")), *(f"{g}_std" for g in (*GROUPS, "all"))}
    if not need <= set(df.columns):
        raise LtrError(f"a group summary needs the columns of compare.csv / table1.csv; missing "
                       f"{sorted(need - set(df.columns))}")
    sub = df[df.tta == tta].reset_index(drop=True)
    if sub.empty:
        raise LtrError(f"the table has no {tta!r} rows")
    names = list(sub.row)
    keys = (*GROUPS, "all")
    fig = _figure((13.0, 0.9 + 0.32 * len(names)))
    axes = fig.subplots(1, len(keys), sharey=True)
    y = np.arange(len(names))
    for ax, g in zip(axes, keys, strict=True):
        mean = pd.to_numeric(sub[f"{g}_mean"], errors="coerce").to_numpy(float)
        std = np.nan_to_num(pd.to_numeric(sub[f"{g}_std"], errors="coerce").to_numpy(float))
        colour = GROUP_COLOURS.get(g, "0.35")
        ax.barh(y, np.nan_to_num(mean), xerr=std, color=colour, alpha=0.8, height=0.7,
                error_kw={"elinewidth": 1.0, "capsize": 2.5})
        best = np.nanargmax(mean) if np.isfinite(mean).any() else None
        for i, (m, s) in enumerate(zip(mean, std, strict=True)):
            text = "no run" if not np.isfinite(m) else f"{m:.1f}" + (f" ±{s:.1f}" if s else "")
            ax.text((0 if not np.isfinite(m) else m + s) + 1, i, text, va="center", fontsize=7,
                    fontweight="bold" if i == best else "normal")
        ax.set_title(GROUP_TITLES[g], fontsize=10)
        ax.set_xlim(0, max(100.0 if g == "many" else 0.0, float(np.nanmax(mean + std, initial=0)) + 18))
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [f"{n}  (n={int(k)})" for n, k in zip(names, sub.seeds, strict=True)]
                       if "seeds" in sub else names, fontsize=8)
    axes[0].invert_yaxis()
    fig.supxlabel(f"test accuracy, % ({'flip-averaged' if tta == 'flip' else 'plain'}), mean ± std over "
                  "seeds (n = seeds); the best mean of each group in bold", fontsize=8)
    return _finish(fig, title, save)


def plot_sweep(
    summary: pd.DataFrame,
    field: str,
    label: str,
    chosen: float,
    paper: float,
    log: bool = True,
    preset_value: float | None = None,
    preset: str = "paper",
    synthetic: bool = False,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    paper_label: str = "WB",
) -> Figure:
    """Validation and held-out accuracy (All, Many, Medium, Few) against a swept value (sweep).

    summary has one row per value with {val,heldout}_{group}_{mean,std}; the chosen value and WB's (and
    the preset's, where it differs) are marked. A log quantity with a 0 among its values gets a symlog
    axis, linear below the smallest positive value, so that 0 shows.
    """
    keys = ("all", *GROUPS)
    x = summary["value"].to_numpy(dtype=float)
    fig = _figure((12.0, 3.6))
    axes = fig.subplots(1, len(keys), sharex=True)
    for ax, g in zip(axes, keys, strict=True):
        for split, style, name in (("val", "-o", "validation"), ("heldout", "--s", "held-out")):
            y = summary[f"{split}_{g}_mean"].to_numpy(dtype=float)
            err = summary[f"{split}_{g}_std"].fillna(0).to_numpy(dtype=float)
            ax.errorbar(x, y, yerr=err if err.any() else None, fmt=style, ms=4, capsize=2, label=name)
        ax.axvline(chosen, color="tab:green", lw=1.5, label=f"chosen on validation ({chosen:g})")
        ax.axvline(paper, color="0.3", ls=":", lw=1.5, label=f"{paper_label} ({paper:g})")
        if preset_value is not None and not math.isclose(preset_value, paper):
            ax.axvline(preset_value, color="tab:purple", ls="-.", lw=1.2,
                       label=f"preset {preset} ({preset_value:g})")
        if log:
            positive = x[x > 0]
            if (x <= 0).any() and len(positive):
                ax.set_xscale("symlog", linthresh=float(positive.min()))
            elif len(positive) == len(x):
                ax.set_xscale("log")
            if len(x) <= 10:  # label the swept values themselves, not the decades around them
                ax.set_xticks(x, [f"{v:g}" for v in x], rotation=60, fontsize=7)
                ax.xaxis.set_minor_locator(NullLocator())
        ax.set_title(GROUP_TITLES[g], fontsize=9)
        ax.set_xlabel(field)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy, %")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    note = "" if preset == "paper" else f" [preset {preset}: not the paper's recipe]"
    if synthetic:
        note += " [SYNTHETIC data: describes the code, not the paper]"
    return _finish(fig, (title or f"{label}: chosen on validation, reported on held-out") + note, save)


# ---------------------------------------------------------------- feature analysis (Hasegawa & Sato)

CONE_KEYS = ("all", "same", "different")
CONE_TITLES = {"all": "all pairs", "same": "same class", "different": "different classes"}
SYNTHETIC_TAG = " [SYNTHETIC data: describes the code, not the paper]"


def _features_of(run: dict) -> dict:
    """metrics.json's `features` of a stage-1 run ({split: {fdr, cone}}), {} when it has none."""
    feats = run["metrics"].get("features") or {}
    return {split: v for split, v in feats.items() if isinstance(v, dict) and "fdr" in v}


def _fdr_history(run: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(epochs, test FDR) of the evaluated epochs in history.csv, or None when it records none."""
    hist = run["history"]
    if hist is None or "test_fdr" not in hist.columns:
        return None
    fdr = pd.to_numeric(hist["test_fdr"], errors="coerce")
    keep = fdr.notna().to_numpy()
    if not keep.any():
        return None
    return hist["epoch"].to_numpy(dtype=float)[keep], fdr.to_numpy(dtype=float)[keep]


def has_feature_analysis(runs: Runs, labels: Sequence[str] | None = None) -> bool:
    """True when at least one of the runs records the feature analysis (history or metrics.json)."""
    return any(_features_of(r) or _fdr_history(r) is not None for _, r in _load_many(runs, labels))


def feature_table(runs: Runs, labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Fisher discriminant ratio and cone effect at the end of each run, test and training features.

    One row per run: `FDR test`, `FDR train`, and `cone {all, same, different} {test, train}` (mean cosine
    similarity of two samples' features); empty where a run does not record it (made before ltr did).
    """
    rows = []
    for label, run in _load_many(runs, labels):
        feats = _features_of(run)
        row: dict[str, Any] = {"run": label}
        for split in ("test", "train"):
            f = feats.get(split, {})
            row[f"FDR {split}"] = f.get("fdr")
            for k in CONE_KEYS:
                row[f"cone {k} {split}"] = (f.get("cone") or {}).get(k)
        rows.append(row)
    return pd.DataFrame(rows).set_index("run").astype(float).round(4)


def plot_feature_analysis(
    runs: Runs,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Why weight decay helps (Hasegawa & Sato): how separable and how spread out the features are.

    Left: the Fisher discriminant ratio Tr(S_W^+ S_B) of the test features at every evaluated epoch
    (history.csv `test_fdr`); higher = classes further apart relative to their spread. Middle: the ratio
    of the test and the (un-augmented) training features at the end (metrics.json `features`). Right: the
    cone effect of the test features at the end, the mean cosine similarity of two samples' features over
    all pairs, same-class pairs and different-class pairs; a high different-class cosine means every
    class points the same way. Meant for stage-1 runs, e.g. naive vs weight decay. A run recorded before
    ltr measured these is drawn as "not recorded"; if no run records anything, LtrError says so.
    """
    loaded = _load_many(runs, labels)
    if not has_feature_analysis([r for _, r in loaded]):
        raise LtrError("none of these runs records the feature analysis (history.csv `test_fdr`, "
                       "metrics.json `features`): they were made before ltr measured it; rerun them")
    fig = _figure((13.0, 3.8))
    ax_t, ax_f, ax_c = fig.subplots(1, 3, width_ratios=[1.3, 0.8, 1.1])
    n = len(loaded)
    colours = [f"C{i}" for i in range(n)] if n <= 10 else [colormaps["tab20"](i % 20) for i in range(n)]
    width = 0.8 / n
    for j, (label, run) in enumerate(loaded):
        colour = colours[j]
        hist = _fdr_history(run)
        feats = _features_of(run)
        if hist is not None:
            ax_t.plot(*hist, "-o", ms=3, lw=1.5, color=colour, label=label)
        else:
            ax_t.plot([], [], color=colour, label=f"{label} (no FDR over epochs recorded)")
        for ax, keys, get in (
            (ax_f, ("test", "train"), lambda k, feats=feats: (feats.get(k) or {}).get("fdr")),
            (ax_c, CONE_KEYS, lambda k, feats=feats: ((feats.get("test") or {}).get("cone") or {}).get(k)),
        ):
            for i, key in enumerate(keys):
                x = i + (j - (n - 1) / 2) * width
                v = get(key)
                if v is None:
                    ax.text(x, 0, "not\nrecorded", ha="center", va="bottom", fontsize=6, rotation=90,
                            color="0.4")
                    continue
                bar = ax.bar([x], [float(v)], width * 0.95, color=colour)
                ax.bar_label(bar, fmt="%.3g", fontsize=7, padding=1, rotation=90 if n > 3 else 0)
    ax_t.set_xlabel("epoch")
    ax_t.set_ylabel("Fisher ratio Tr(S_W^+ S_B), test")
    ax_t.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_t.set_title("feature separability during training", fontsize=9)
    ax_t.grid(alpha=0.3)
    ax_t.legend(fontsize=7)
    ax_f.set_xticks([0, 1], ["test", "train"])
    ax_f.set_ylabel("Fisher ratio at the end")
    ax_f.set_title("separability at the end", fontsize=9)
    ax_f.margins(y=0.15)
    ax_c.set_xticks(range(len(CONE_KEYS)), [CONE_TITLES[k] for k in CONE_KEYS])
    ax_c.axhline(0, color="0.3", lw=0.8)
    ax_c.set_ylabel("mean cosine of two test features")
    ax_c.set_title("cone effect at the end (test)", fontsize=9)
    ax_c.margins(y=0.15)
    if title is None:
        title = "feature analysis: Fisher discriminant ratio and cone effect"
    if any(r["metrics"].get("synthetic_data") for _, r in loaded) and "SYNTHETIC" not in title:
        title += SYNTHETIC_TAG
    return _finish(fig, title, save)


def run_figures(run_dir: str | os.PathLike) -> list[Path]:
    """Write the per-run PNG figures into a finished run directory; returns their paths."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        return []  # an unfinished run (stopped early) has nothing final to plot
    run = load_run(run_dir)
    title = f"{run['stage']} run {run['name']}"
    if run["metrics"].get("synthetic_data"):
        title += "  [SYNTHETIC data: describes the code, not the paper]"
    jobs = [
        ("weight_norms.png", lambda p: plot_weight_norms(run, title=title, save=p)),
        ("per_class_acc.png", lambda p: plot_per_class_accuracy(run, title=title, save=p)),
        ("group_acc.png", lambda p: plot_group_accuracy(run, title=title, save=p)),
        ("marginal_likelihood.png", lambda p: plot_marginal_likelihood(run, title=title, save=p)),
    ]
    if run["history"] is not None and any(c.startswith("wn_") for c in run["history"].columns):
        jobs.append(("weight_norm_evolution.png", lambda p: plot_norm_evolution(run, title=title, save=p)))
    if run["stage"] == "stage1" and has_feature_analysis(run):
        jobs.append(("feature_analysis.png", lambda p: plot_feature_analysis(run, title=title, save=p)))
    paths = []
    for name, make in jobs:
        make(run_dir / name)
        paths.append(run_dir / name)
    return paths
