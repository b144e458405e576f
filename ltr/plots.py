"""Figures from run directories: count profile, weight norms, marginal likelihood, accuracy (WB Fig. 2/3/6).

Every function draws finished run directories (read by ltr.runs, never a live trainer) or numbers computed
from them (tau-norm on cached features, stage 2 as a logit rescaling) and returns a matplotlib Figure;
``save=path`` also writes it as a PNG. Figures are built without pyplot, so nothing pops up on a desktop,
nothing leaks in a loop, and no display is needed; notebooks still show a returned figure inline.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, NullLocator, ScalarFormatter

from .data import class_groups, long_tail_counts
from .engine.rundir import read_json, write_atomic
from .errors import LtrError
from .runs import (  # noqa: F401 - feature_table, results_table, table1_row re-exported: called as plots.X
    CONE_KEYS,
    GROUP_TITLES,
    GROUPS,
    RunLike,
    Runs,
    check_tta,
    ensure_loaded,
    fdr_history,
    feature_table,
    final_features,
    has_feature_analysis,
    labelled_runs,
    load_run,
    results_table,
    run_label,
    table1_row,
)

GROUP_COLOURS = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
GROUP_RULES = {"many": "> 100 images", "medium": "20..100 images", "few": "< 20 images"}


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
    loaded = labelled_runs(runs, labels)
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
    loaded = labelled_runs(runs, labels)
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
    run = ensure_loaded(run)
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
    run = ensure_loaded(run)
    m = run["metrics"]
    acc = np.asarray(m["per_class_acc" if check_tta(tta) == "plain" else "per_class_acc_flip"], float)
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
    check_tta(tta)
    loaded = labelled_runs(runs, labels)
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
    check_tta(tta)
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

CONE_TITLES = {"all": "all pairs", "same": "same class", "different": "different classes"}
SYNTHETIC_TAG = " [SYNTHETIC data: describes the code, not the paper]"


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
    loaded = labelled_runs(runs, labels)
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
        hist = fdr_history(run)
        feats = final_features(run)
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


# ---------------------------------------------------------------- tau-norm and stage 2 as a rescaling


def _plain_log_y_axis(ax: Axes, ylim: tuple[float, float] | None = None) -> None:
    """A log y axis labelled with plain numbers (norms span about one decade)."""
    ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_tau_norm(result: Mapping, counts: Sequence[int], base: Mapping | None = None,
                  title: str | None = None, ylim: tuple[float, float] | None = None) -> Figure:
    """One tau: per-class norms of the rescaled classifier and Many/Medium/Few/All, beside base (tau 0)."""
    fig = _figure((10.5, 3.6))
    ax, bars = fig.subplots(1, 2, width_ratios=[1.7, 1.0])
    _class_bands(ax, counts)
    if base is not None:
        ax.plot(base["norms"], color="0.6", lw=1.2, label=f"tau = {base['tau']:g} (stage 1)")
    ax.plot(result["norms"], color="tab:purple", lw=1.6, label=f"tau = {result['tau']:.2f}")
    _plain_log_y_axis(ax, ylim)
    ax.set_xlabel("class (head on the left, tail on the right)")
    ax.set_ylabel("||w_c|| after tau-norm (log)")
    ax.legend(fontsize=8, loc="lower left")
    keys = ("many", "medium", "few", "all")
    x = np.arange(len(keys))
    now = [result["accuracy"].get(k) for k in keys]
    drawn = bars.bar(x, [v if v is not None else 0.0 for v in now], 0.6, color="tab:purple",
                     label=f"tau = {result['tau']:.2f}")
    bars.bar_label(drawn, labels=["n/a" if v is None else f"{v:.1f}" for v in now], fontsize=8)
    if base is not None:
        ref = [base["accuracy"].get(k) for k in keys]
        bars.scatter([i for i, v in zip(x, ref, strict=True) if v is not None],
                     [v for v in ref if v is not None], marker="_", s=400, color="0.3",
                     label=f"tau = {base['tau']:g}")
    bars.set_xticks(x, [GROUP_TITLES[k] for k in keys])
    bars.set_ylim(0, 100)
    bars.set_ylabel("test accuracy, %")
    bars.legend(fontsize=8, loc="upper right")
    return _finish(fig, title, None)


def plot_tau_sweep(results: Mapping[float, Mapping], marks: Sequence[float] = (0.0, 1.0, 1.9, 3.0),
                   title: str | None = None) -> Figure:
    """Many/Medium/Few/All against tau, and the per-class norms at a few marked taus (the static view)."""
    taus = sorted(results)
    fig = _figure((10.5, 3.6))
    acc, norms = fig.subplots(1, 2)
    for g in ("many", "medium", "few", "all"):
        ys = [results[t]["accuracy"].get(g) for t in taus]
        if all(y is None for y in ys):
            continue
        acc.plot(taus, [math.nan if y is None else y for y in ys], lw=2,
                 color=GROUP_COLOURS.get(g, "black"), ls="-" if g != "all" else "--",
                 label=GROUP_TITLES[g])
    for t in marks:
        acc.axvline(t, color="0.8", lw=0.8, zorder=0)
    acc.set_xlabel("tau (0 = stage-1 classifier, 1 = L2-norm)")
    acc.set_ylabel("test accuracy, %")
    acc.legend(fontsize=8)
    acc.set_title("accuracy by group as tau grows", fontsize=9)
    shades = colormaps["viridis"](np.linspace(0.0, 0.85, len(marks)))  # not the group colours on the left
    for t, shade in zip(marks, shades, strict=True):
        near = min(taus, key=lambda s, t=t: abs(s - t))
        norms.plot(results[near]["norms"], lw=1.2, color=shade, label=f"tau = {near:g}")
    _plain_log_y_axis(norms)
    norms.set_xlabel("class (head on the left, tail on the right)")
    norms.set_ylabel("||w_c|| after tau-norm (log)")
    norms.legend(fontsize=8)
    norms.set_title("per-class norms at a few tau", fontsize=9)
    return _finish(fig, title, None)


def plot_logit_rescaling(df: pd.DataFrame, title: str | None = None) -> Figure:
    """The table of logit_rescaling drawn: norms before / after, per-class scale (prior^-tau_fit), biases."""
    counts = df["images"].tolist()
    classes = np.arange(len(df))
    fig = _figure((13.0, 3.6))
    axes = fig.subplots(1, 3)
    for ax in axes:
        _class_bands(ax, counts)
        ax.set_xlabel("class (head on the left, tail on the right)")
    norms, scale, bias = axes
    norms.plot(classes, df["norm_before"], color="0.5", lw=1.4, label="before (stage 1)")
    norms.plot(classes, df["norm_after"], color="tab:purple", lw=1.4, label="after (stage 2)")
    norms.set_ylabel("||w_c||")
    norms.set_ylim(bottom=0)
    norms.legend(fontsize=8, loc="lower left")
    norms.set_title("classifier row norms", fontsize=9)
    tau = df.attrs.get("tau_fit", 0.0)
    prior = np.asarray(counts, dtype=float) / sum(counts)
    fit = prior ** -tau
    fit *= np.exp(np.mean(np.log(df["scale"].clip(lower=1e-12))) - np.mean(np.log(fit)))
    scale.plot(classes, df["scale"], color="tab:purple", lw=1.4, label="||w_c after|| / ||w_c before||")
    scale.plot(classes, fit, color="0.3", ls="--", lw=1.2, label=f"prior_c^-tau, tau = {tau:.2f} (fit)")
    _plain_log_y_axis(scale)
    scale.set_ylabel("per-class logit scale (log)")
    scale.legend(fontsize=8, loc="lower right")
    scale.set_title(f"rescaling; rows keep direction: cosine min {df['cosine'].min():.3f}", fontsize=9)
    bias.plot(classes, df["bias_before"], color="0.5", lw=1.4, label="before")
    bias.plot(classes, df["bias_after"], color="tab:purple", lw=1.4, label="after")
    bias.axhline(0, color="0.3", lw=0.8)
    bias.set_ylabel("b_c")
    bias.legend(fontsize=8, loc="lower left")
    bias.set_title("classifier bias", fontsize=9)
    return _finish(fig, title, None)


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


# ---------------------------------------------------------------- readable norms; fit against test accuracy


def _group_norms(norms: np.ndarray, counts: Sequence[int]) -> dict[str, np.ndarray]:
    """{group: norms[..., classes of the group]} for the non-empty groups (last axis = classes)."""
    return {g: norms[..., classes] for g, classes in class_groups(counts).items() if classes}


def plot_norm_groups(
    runs: Runs,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Per-class classifier norms summarised by group, one row per run: readable for any number of runs.

    Each row shows the Many / Medium / Few mean norm (dots) and the group's smallest to largest norm
    (bar), on a log axis so that stage-2 rows a thousand times shorter stay visible; the right margin
    gives the Many / Few ratio of the means.
    """
    loaded = labelled_runs(runs, labels)
    fig = _figure((9.5, 1.0 + 0.42 * len(loaded)))
    ax = fig.add_subplot()
    offsets = {"many": 0.18, "medium": 0.0, "few": -0.18}
    ratio_x = []
    for row, (_, run) in enumerate(loaded):
        y = len(loaded) - 1 - row
        norms = np.asarray(run["metrics"]["weight_norms"], dtype=float)
        parts = _group_norms(norms, run["metrics"]["counts"])
        for g, part in parts.items():
            ax.plot([part.min(), part.max()], [y + offsets[g]] * 2, color=GROUP_COLOURS[g], lw=2.5,
                    alpha=0.3)
            ax.plot([part.mean()], [y + offsets[g]], "o", color=GROUP_COLOURS[g], ms=5,
                    label=GROUP_TITLES[g] if row == 0 else None)
        ratio_x.append((y, parts["many"].mean() / parts["few"].mean() if "many" in parts and "few" in parts
                        else float("nan")))
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_yticks(range(len(loaded)), [label for label, _ in reversed(loaded)], fontsize=8)
    ax.set_ylim(-0.6, len(loaded) - 0.4)
    for y, ratio in ratio_x:
        ax.text(1.01, y, f"{ratio:.2f}" if math.isfinite(ratio) else "n/a", va="center", fontsize=8,
                transform=ax.get_yaxis_transform())
    ax.text(1.01, len(loaded) - 0.45, "Many/Few", transform=ax.get_yaxis_transform(), fontsize=8,
            va="bottom")
    ax.set_xlabel("||w_c||, log scale (dot: group mean; bar: smallest to largest)")
    ax.grid(axis="x", alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False)
    return _finish(fig, title, save)


def plot_norm_ratio_evolution(
    runs: Runs,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Several stage-1 runs over their epochs: the Many / Medium / Few mean norm (left, one line style a
    run) and the Many / Few ratio of the means (right). Needs history.csv's wn_ columns."""
    loaded = labelled_runs(runs, labels)
    fig = _figure((10.5, 3.6))
    left, right = fig.subplots(1, 2, width_ratios=[1.3, 1.0])
    styles = ["-", "--", ":", "-."]
    for i, (label, run) in enumerate(loaded):
        if run["history"] is None:
            raise LtrError(f"{run['run_dir']} has no history.csv: its norms do not evolve")
        epochs, norms = _norm_history(run)
        parts = _group_norms(norms, run["metrics"]["counts"])
        ls = styles[i % len(styles)]
        for g, part in parts.items():
            left.plot(epochs, part.mean(1), ls=ls, lw=1.8, color=GROUP_COLOURS[g],
                      label=f"{label}: {GROUP_TITLES[g]}")
        if "many" in parts and "few" in parts:
            right.plot(epochs, parts["many"].mean(1) / parts["few"].mean(1), ls=ls, lw=1.8, color="0.2",
                       label=label)
    left.set_xlabel("epoch")
    left.set_ylabel("mean ||w_c|| of the group")
    left.set_ylim(bottom=0)
    left.legend(fontsize=7, ncol=len(loaded))
    left.set_title("group mean norms", fontsize=9)
    right.set_xlabel("epoch")
    right.set_ylabel("Many / Few (ratio of the means)")
    right.axhline(1.0, color="0.6", lw=0.8, ls=":")
    right.legend(fontsize=8)
    right.set_title("how much longer the head rows are", fontsize=9)
    return _finish(fig, title, save)


def plot_fit_and_test(
    panels: Mapping[str, Mapping[str, pd.DataFrame]],
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Training and test accuracy per epoch, epochs as a fraction of each run's schedule.

    panels: {panel title: {run label: history}}, a history having the columns epoch, train_acc and
    test_acc (percent; test_acc may be empty on the epochs without an evaluation). Solid: test; dashed:
    training. The i-th run of every panel has the same colour, so that WB's logs and our runs line up.
    """
    fig = _figure((5.0 * len(panels) + 0.5, 3.8))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    palette = ["tab:blue", "tab:green", "tab:purple", "tab:brown"]
    for ax, (panel, runs) in zip(axes, panels.items(), strict=True):
        for i, (label, hist) in enumerate(runs.items()):
            colour = palette[i % len(palette)]
            x = hist["epoch"].to_numpy(dtype=float) / float(hist["epoch"].max())
            ax.plot(x, hist["train_acc"], ls="--", lw=1.3, color=colour, label=f"{label}: training")
            test = hist["test_acc"].notna().to_numpy()
            ax.plot(x[test], hist["test_acc"].to_numpy(dtype=float)[test], lw=1.8, color=colour,
                    marker="." if test.sum() < 40 else None, label=f"{label}: test")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("fraction of the schedule (epoch / last epoch)")
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    axes[0].set_ylabel("accuracy (%)")
    axes[0].set_ylim(0, 100)
    return _finish(fig, title, save)


# ---------------------------------------------------------------- stage 2: who gains, which epoch


def _one_decimal(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _group_spans(ax: Axes, counts: Sequence[int]) -> None:
    """Shade the Many/Medium/Few ranges of a class-size (images per class) x axis and name them."""
    lo, hi = min(counts) * 0.85, max(counts) * 1.15
    for g, classes in class_groups(counts).items():
        if not classes:
            continue
        sizes = [counts[c] for c in classes]
        left, right = max(lo, min(sizes) * 0.95), min(hi, max(sizes) * 1.05)
        ax.axvspan(left, right, color=GROUP_COLOURS[g], alpha=0.08, lw=0)
        ax.text(math.sqrt(left * right), 0.98, f"{GROUP_TITLES[g]} ({len(classes)})", ha="center", va="top",
                transform=ax.get_xaxis_transform(), fontsize=8, color=GROUP_COLOURS[g])
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([t for t in (5, 10, 20, 50, 100, 200, 500) if lo <= t <= hi])


def plot_accuracy_vs_class_size(
    runs: Runs,
    labels: Sequence[str] | None = None,
    tta: str = "flip",
    window: int = 9,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Per-class test accuracy against the class's training images (log), every run in one overlay.

    Dots: the classes; line: the mean over `window` classes of neighbouring size. Put a stage-1 run beside
    its stage-2 runs to see which class sizes a stage 2 lifts or drops.
    """
    key = "per_class_acc" if check_tta(tta) == "plain" else "per_class_acc_flip"
    loaded = labelled_runs(runs, labels)
    counts = np.asarray(loaded[0][1]["metrics"]["counts"], dtype=float)
    order = np.argsort(-counts, kind="stable")
    fig = _figure((9.0, 4.2))
    ax = fig.add_subplot()
    _group_spans(ax, counts.astype(int).tolist())
    colours = colormaps["tab10"]
    for j, (label, run) in enumerate(loaded):
        m = run["metrics"]
        acc = np.asarray(m[key], dtype=float)
        colour = colours(j % 10)
        ax.scatter(counts, acc, s=9, color=colour, alpha=0.35, lw=0)
        smooth = pd.Series(acc[order]).rolling(window, center=True, min_periods=1).mean()
        ax.plot(counts[order], smooth, color=colour, lw=2,
                label=f"{label} (All {m[tta]['all']:.1f}, Few {_one_decimal(m[tta].get('few'))})")
    ax.set_ylim(0, 105)
    ax.set_xlabel("training images of the class (log scale; tail on the left, head on the right)")
    ax.set_ylabel(f"test accuracy of the class, % ({'flip-averaged' if tta == 'flip' else 'plain'})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(f"per-class accuracy against class size (dots: classes; lines: mean of {window} "
                 "neighbouring classes)", fontsize=9)
    return _finish(fig, title, save)


def _test_curve(run: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(epochs, reported accuracy, plain accuracy, tta of the reported one) of the evaluated epochs."""
    hist = run["history"]
    hist = hist[hist["test_acc"].notna()] if "test_acc" in hist else hist.iloc[0:0]
    if hist.empty:
        raise LtrError(f"{run['run_dir']}/history.csv has no test accuracy (test_acc) per epoch")
    plain = hist["test_acc"].to_numpy(dtype=float)
    if "test_acc_flip" in hist and hist["test_acc_flip"].notna().all():
        return hist["epoch"].to_numpy(dtype=float), hist["test_acc_flip"].to_numpy(dtype=float), plain, "flip"
    return hist["epoch"].to_numpy(dtype=float), plain, plain, "plain"


def plot_stage2_test_curves(
    runs: Runs,
    labels: Sequence[str] | None = None,
    stage1: RunLike | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Test accuracy at every evaluated stage-2 epoch, with the epoch the official protocol would report.

    Star: the epoch with the best plain test accuracy (WB's code keeps that epoch, so the test set chooses
    it); circle: the last epoch (what this project reports). Lines are flip-averaged where the history has
    it. stage1: the model stage 2 starts from, drawn at epoch 0 and as a dotted line.
    """
    loaded = [(label, run) for label, run in labelled_runs(runs, labels) if run["history"] is not None]
    if not loaded:
        raise LtrError("no stage-2 run with a history.csv to plot (post-hoc runs train no epochs)")
    base = ensure_loaded(stage1) if stage1 is not None else None
    fig = _figure((9.0, 4.2))
    ax = fig.add_subplot()
    colours = colormaps["tab10"]
    shown = set()
    for j, (label, run) in enumerate(loaded):
        epochs, acc, plain, tta = _test_curve(run)
        shown.add(tta)
        colour = colours(j % 10)
        # The best epoch is chosen among the stage-2 epochs (before epoch 0 is prepended), as WB's code.
        best = int(np.nanargmax(plain))
        if base is not None:
            epochs = np.concatenate([[0.0], epochs])
            acc = np.concatenate([[base["metrics"][tta]["all"]], acc])
            best += 1
        ax.plot(epochs, acc, color=colour, lw=1.8, marker=".", ms=5,
                label=f"{label}: best test epoch {acc[best]:.1f} (epoch {epochs[best]:g}), "
                      f"last {acc[-1]:.1f}")
        ax.scatter([epochs[best]], [acc[best]], marker="*", s=180, color=colour, edgecolor="black", lw=0.6,
                   zorder=3)
        ax.scatter([epochs[-1]], [acc[-1]], marker="o", s=60, facecolor="white", edgecolor=colour, lw=2,
                   zorder=3)
    if base is not None:
        tta = "flip" if "flip" in shown else "plain"
        ax.axhline(base["metrics"][tta]["all"], color="0.4", ls=":", lw=1.2,
                   label=f"stage-1 model (epoch 0): {base['metrics'][tta]['all']:.1f}")
    ax.scatter([], [], marker="*", s=120, color="0.5", edgecolor="black", lw=0.6,
               label="best test epoch (chosen on the test set, as WB's code does)")
    ax.scatter([], [], marker="o", s=50, facecolor="white", edgecolor="0.5", lw=2,
               label="last epoch (reported here)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("stage-2 epoch" + (" (0 = the stage-1 model)" if base is not None else ""))
    ax.set_ylabel(f"test accuracy, all classes, % ({' / '.join(sorted(shown))})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("stage-2 test accuracy per epoch: which epoch would the test set pick?", fontsize=9)
    return _finish(fig, title, save)


def plot_norm_range(
    run: RunLike,
    stage1: RunLike | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
) -> Figure:
    """Longest and shortest classifier row per stage-2 epoch (log), with the MaxNorm cap when there is one.

    stage1: the run stage 2 starts from, drawn at epoch 0. The cap is the run's maxnorm_thresholds
    (metrics.json): a row above the dashed line is projected back onto it after every step.
    """
    run = ensure_loaded(run)
    if run["history"] is None:
        raise LtrError(f"{run['run_dir']} has no history.csv: a post-hoc run trains no epochs")
    hist = run["history"]
    cols = sorted((c for c in hist.columns if c.startswith("wn_")), key=lambda c: int(c[3:]))
    if not cols:
        raise LtrError(f"{run['run_dir']}/history.csv has no weight-norm columns (wn_0, wn_1, ...)")
    epochs = hist["epoch"].to_numpy(dtype=float)
    norms = hist[cols].to_numpy(dtype=float)
    if stage1 is not None:
        start = ensure_loaded(stage1)["metrics"]["weight_norms"]
        epochs, norms = np.concatenate([[0.0], epochs]), np.vstack([np.asarray(start, dtype=float), norms])
    counts = run["metrics"]["counts"]
    fig = _figure((7.5, 4.0))
    ax = fig.add_subplot()
    for g, classes in class_groups(counts).items():
        if classes:
            ax.plot(epochs, norms[:, classes].mean(1), color=GROUP_COLOURS[g], lw=1.2, alpha=0.8,
                    label=f"{GROUP_TITLES[g]}: mean row")
    ax.plot(epochs, norms.max(1), color="black", lw=2, marker=".", label="longest row")
    ax.plot(epochs, norms.min(1), color="0.55", lw=2, marker=".", label="shortest row")
    for i, cap in enumerate(run["metrics"].get("maxnorm_thresholds") or []):
        ax.axhline(cap, color="tab:purple", ls="--", lw=1.5,
                   label=f"MaxNorm cap {cap:.3g}" if i == 0 else None)
    _plain_log_y_axis(ax)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("stage-2 epoch" + (" (0 = the stage-1 classifier)" if stage1 is not None else ""))
    ax.set_ylabel("||w_c|| at the end of the epoch (log)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title(f"classifier row norms of {run_label(run)}", fontsize=9)
    return _finish(fig, title, save)
