"""Tables and figures from run directories: Table 1 / Table 2 of WB beside the paper's numbers.

WB's published numbers live here, once. A cell of ours is always the mean (± std) over the seeds that
a run in the output folder produced; a cell with no finished run says "no run". The plans and runners
that make the run directories are ltr.experiments.tables'.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import pandas as pd

from ..config import CB_LABELS
from ..engine.rundir import read_json, write_atomic, write_json

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


SYNTHETIC_WARNING = ("**These runs used SYNTHETIC images (ltr.synthetic), not CIFAR: the numbers describe "
                     "the code, not the paper.**")


class TableRow(Protocol):
    """What the report reads of a table row (ltr.experiments.tables.Row, which imports this module)."""

    name: str  # row label
    stage1: str  # the stage-1 kind it starts from
    stage2: dict  # Stage2Config fields; empty = the stage-1 model
    paper: str  # the WB Table 1 row it is compared with; "" = the row of the same name


def cb_label(row: TableRow) -> str:
    """ "WB's loss" / "weighted CE" for a class-balanced row whose variant is set, else ""."""
    return CB_LABELS.get(row.stage2.get("cb_variant", ""), "") if row.stage2.get("loss") == "cb" else ""


def tta_words(tta: str) -> str:
    return "flip-averaged logits" if tta == "flip" else "plain (no test-time flip)"


def mean_std_text(mean: float, std: float | None) -> str:
    """mean ± std with two decimals; the mean alone without a std (one seed)."""
    return f"{mean:.2f}" + ("" if pd.isna(std) else f" ± {std:.2f}")


def md_line(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def preset_warning(preset: str | None) -> list[str]:
    """A warning paragraph for a preset other than the paper's."""
    if preset is None or preset == "paper":
        return []
    return [f"**Preset `{preset}` is not the paper's recipe: compare shapes, not numbers.**", ""]


def figure_note(preset: str, synthetic: bool) -> str:
    """What a figure's title adds when it is not the paper's recipe on CIFAR."""
    note = "" if preset == "paper" else f" [preset {preset}: not the paper's recipe]"
    return note + (" [SYNTHETIC data: describes the code, not the paper]" if synthetic else "")


def write_report(out: Path, stem: str, df: pd.DataFrame, text: str, runs_json: str,
                 rows: tuple[TableRow, ...], where: dict, preset: str, seeds: list[int],
                 imbalances: list[float]) -> dict[str, Path]:
    """stem.csv (df), stem.md (a synthetic-data warning, then text) and the plan as runs_json, into out."""
    files = {f"{stem}.csv": out / f"{stem}.csv", f"{stem}.md": out / f"{stem}.md"}
    write_atomic(files[f"{stem}.csv"], df.to_csv(index=False))
    write_atomic(files[f"{stem}.md"], synthetic_note(where) + text)
    write_json(out / runs_json, {
        "preset": preset, "seeds": seeds, "imbalances": imbalances,
        "runs": [{"row": r, "imbalance": i, "seed": s, "dir": str(p)} for (r, i, s), p in where.items()],
        "rows": [asdict(r) for r in rows],
    })
    return files


def _mean_std_count(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, std, n) of the values that are not None; std is None for fewer than two of them."""
    s = pd.Series([v for v in values if v is not None], dtype=float)
    if s.empty:
        return None, None, 0
    return float(s.mean()), (float(s.std(ddof=1)) if len(s) > 1 else None), len(s)


def best_test_epoch(run_dir: Path) -> tuple[float, float | None] | None:
    """WB's reported figure from a run's history.csv: (best plain test accuracy, flip accuracy at that epoch).

    The official code keeps the epoch with the best plain test accuracy and reports its flip-averaged
    accuracy: optimistic, because the test set picks the epoch. The flip value is None in a history written
    before flip accuracy was recorded per epoch. None: no evaluated epoch (a post-hoc run).
    """
    path = Path(run_dir) / "history.csv"
    hist = pd.read_csv(path) if path.exists() else pd.DataFrame()
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


def collect(rows: tuple[TableRow, ...], where: dict[tuple[str, float, int], Path], seeds: list[int],
            imbalances: list[float], dataset: str = "cifar100") -> pd.DataFrame:
    """One DataFrame row per (imbalance, row, tta): mean, std, n and WB's value for each group."""
    cifar100 = dataset == "cifar100"  # WB's tables are CIFAR100-LT only
    records = []
    for imb in imbalances:
        for row in rows:
            done = [where[row.name, imb, seed] for seed in seeds
                    if (where[row.name, imb, seed] / "metrics.json").exists()]
            metrics = [read_json(d / "metrics.json") for d in done]
            best_values, best_tta = best_test_cells([best_test_epoch(d) for d in done])
            best_mean, best_std, best_n = _mean_std_count(best_values)
            wb_row = row.paper or row.name
            paper = PAPER_TABLE1.get(wb_row) if imb == 100 and cifar100 else None
            for tta in ("plain", "flip"):
                rec: dict = {"imbalance": imb, "row": row.name, "cb_loss": cb_label(row), "tta": tta,
                             "seeds": len(metrics), "best_test_all_mean": best_mean,
                             "best_test_all_std": best_std, "best_test_all_n": best_n,
                             "best_test_tta": best_tta}
                for i, g in enumerate(GROUPS):
                    mean, std, n = _mean_std_count([m[tta][g] for m in metrics])
                    ref = paper[i] if paper else (PAPER_TABLE2.get(wb_row, {}).get(int(imb))
                                                  if g == "all" and cifar100 else None)
                    rec.update({f"{g}_mean": mean, f"{g}_std": std, f"{g}_n": n, f"{g}_paper": ref,
                                f"{g}_diff": None if mean is None or ref is None else mean - ref})
                records.append(rec)
    return pd.DataFrame.from_records(records)


def _cell_text(rec: pd.Series, key: str, empty: str) -> str:
    """rec's {key}_mean ± {key}_std over seeds; `empty` when runs finished without a value, else "no run"."""
    if pd.isna(rec[f"{key}_mean"]):
        return empty if rec["seeds"] else "no run"
    return mean_std_text(rec[f"{key}_mean"], rec[f"{key}_std"])


def fmt_cell(rec: pd.Series, g: str) -> str:
    """A cell of ours: mean ± std over seeds, "n/a" for an empty group, "no run" when nothing finished."""
    return _cell_text(rec, g, "n/a" if rec[f"{g}_n"] == 0 else "no run")


def fmt_best(rec: pd.Series) -> str:
    """The optimistic cell: mean ± std over seeds; "(plain)" marks old histories, "–" a post-hoc row."""
    old = rec.get("best_test_tta") == "plain" and not pd.isna(rec["best_test_all_mean"])
    return _cell_text(rec, "best_test_all", "–") + (" (plain)" if old else "")


def fmt_number(x: object, signed: bool = False) -> str:
    """Two decimals (signed: with its sign), or a dash for a value that was not measured."""
    if x is None or pd.isna(x):
        return "–"
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def synthetic_note(where: dict) -> str:
    """A warning line when any finished run of the plan trained on synthetic files, else ''."""
    runs = [p / "metrics.json" for p in where.values() if (p / "metrics.json").exists()]
    return SYNTHETIC_WARNING + "\n" if any(read_json(m).get("synthetic_data") for m in runs) else ""


def md_rows(head: list[str], rows: list[list[str]], preset: str | None = None) -> list[str]:
    """Markdown table lines, preceded by a warning when the preset is not the paper's."""
    return [*preset_warning(preset), md_line(head), "|" + "---|" * len(head), *map(md_line, rows)]


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
        f"Evaluation: **{tta_words(tta)}** on "
        "the full balanced test set, last epoch, no test-set epoch selection. Ours: mean ± std over "
        f"seeds {', '.join(map(str, seeds))}. WB: the paper's Table 1 (they average flips and pick the "
        "best test epoch). \"n/a\": the group has no class; \"no run\": no finished run in this folder.",
        "", BEST_NOTE, "", CB_NOTE, "",
    ]
    body = [[rec["row"], rec["cb_loss"] or "–"] + [fmt_cell(rec, g) for g in GROUPS]
            + [fmt_number(rec[f"{g}_paper"]) for g in GROUPS]
            + [fmt_number(rec[f"{g}_diff"], signed=True) for g in GROUPS] + [fmt_best(rec)]
            for _, rec in sub.iterrows()]
    return "\n".join(lines + md_rows(head, body, preset)) + "\n"


def markdown_table2(df: pd.DataFrame, tta: str, preset: str) -> str:
    """Table 2 as markdown: "All" by imbalance factor, ours beside WB's."""
    imbs = sorted(df.imbalance.unique(), reverse=True)
    head = ["row"] + [f"IF {i:g} ours" for i in imbs] + [f"IF {i:g} WB" for i in imbs]
    body = []
    for name in PAPER_TABLE2:
        sub = df[(df.row == name) & (df.tta == tta)]
        if not sub.empty:
            body.append([name] + [fmt_cell(sub[sub.imbalance == i].iloc[0], "all") for i in imbs]
                        + [fmt_number(PAPER_TABLE2[name].get(int(i))) for i in imbs])
    lines = [f"# Table 2: CIFAR100-LT, All accuracy by imbalance factor (preset `{preset}`, {tta})", ""]
    return "\n".join(lines + md_rows(head, body)) + "\n"


def write_tables(rows: tuple[TableRow, ...], out: Path, where: dict, seeds: list[int],
                 imbalances: list[float], preset: str, dataset: str = "cifar100", tta: str = "flip",
                 figures: bool = True, suffix: str = "", header: str = "") -> dict[str, Path]:
    """table1{suffix}.csv / .md (and table2{suffix}.md for several imbalance factors) plus figures.

    suffix keeps a variant apart from the paper-valued table in the same folder (e.g. "-tuned");
    header is markdown put above the tables (what differs from the paper's recipe).
    """
    df = collect(rows, where, seeds, imbalances, dataset)
    main_imb = 100.0 if 100.0 in imbalances else imbalances[0]
    md = [markdown_table1(df, i, tta, preset, seeds, dataset)
          for i in [main_imb] + [i for i in imbalances if i != main_imb]]
    files = write_report(out, f"table1{suffix}", df, header + "\n".join(md), f"runs{suffix}.json", rows,
                         where, preset, seeds, imbalances)
    if len(imbalances) > 1:
        files[f"table2{suffix}.md"] = out / f"table2{suffix}.md"
        write_atomic(files[f"table2{suffix}.md"], header + markdown_table2(df, tta, preset))
    if figures:
        files.update(table_figures(rows, out, where, seeds[0], main_imb, preset, folder=f"figures{suffix}"))
    return files


def table_figures(rows: tuple[TableRow, ...], out: Path, where: dict, seed: int, imbalance: float,
                  preset: str, folder: str = "figures") -> dict[str, Path]:
    """The figures of docs/recipe.md §5 from the run directories of one seed, into out/folder."""
    from .. import plots  # builds Figures without pyplot: no backend switch, nothing left open

    fig_dir = out / folder
    fig_dir.mkdir(parents=True, exist_ok=True)
    done = {r.name: where[r.name, imbalance, seed] for r in rows
            if (where[r.name, imbalance, seed] / "metrics.json").exists()}
    if not done:
        return {}
    note = figure_note(preset, bool(synthetic_note(done)))
    names, dirs = list(done), list(done.values())
    stage1 = {r.name: r.stage1 for r in rows if r.name in done and not r.stage2}
    figs = {
        "weight_norms.png": ("Per-class weight norms", lambda: plots.plot_weight_norms(dirs, labels=names)),
        "marginal_likelihood.png": (
            "Marginal likelihood per class", lambda: plots.plot_marginal_likelihood(dirs, labels=names)),
        "group_accuracy.png": (
            "Accuracy by group (flip)", lambda: plots.plot_group_accuracy(dirs, labels=names, tta="flip")),
    }
    for n, key in stage1.items():
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
