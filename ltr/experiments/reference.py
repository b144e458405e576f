"""Committed reference runs read back for the notebooks: tables beside WB's, sweeps, timings, figures.

A reference is what `python -m ltr table1` wrote (table1.csv, runs.json, the run directories), kept under
exp/reference/; exp/reference/<gpu>-paper/ is a GPU run of the paper preset. Every reader here says in one
line when what it needs is not committed, and returns None, so that a notebook cell never fails on it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from ..engine.rundir import read_json
from ..errors import DataError
from ..plots import plot_feature_analysis, plot_group_accuracy, plot_weight_norms
from ..runs import GROUP_TITLES, feature_table, has_feature_analysis
from .report import GROUPS

NO_RUNS = "runs.json with finished run directories"


def _say_no_reference(ref: Path, what: str) -> None:
    print(f"No committed reference run in {ref} yet (no {what}): nothing to compare with. "
          "A reference is what `python -m ltr table1` writes, kept under exp/reference/.")


def _table1(ref: Path, tta: str) -> pd.DataFrame | None:
    """A reference's table1.csv at its first imbalance factor and this tta, by row; None (said) if absent."""
    if not (ref / "table1.csv").is_file():
        _say_no_reference(ref, "table1.csv")
        return None
    df = pd.read_csv(ref / "table1.csv")
    return df[(df.tta == tta) & (df.imbalance == df.imbalance.iloc[0])].set_index("row")


def reference_runs(ref: str | os.PathLike, seed: int | None = None) -> dict[str, Path]:
    """Table 1 row -> finished run directory of a committed reference, for one seed (default its first)."""
    ref = Path(ref)
    if not (ref / "runs.json").is_file():
        return {}
    info = read_json(ref / "runs.json")
    seed = info["seeds"][0] if seed is None else seed
    out = {}
    for run in info["runs"]:
        if run["seed"] != seed or run["imbalance"] != info["imbalances"][0]:
            continue
        # runs.json records where the runs were made; the reference keeps their layout from stage1/
        # or stage2/ down, so the same tail of the path finds them here.
        parts = Path(run["dir"]).parts
        start = max(i for i, p in enumerate(parts) if p in ("stage1", "stage2"))
        run_dir = ref.joinpath(*parts[start:])
        if (run_dir / "metrics.json").is_file():
            out[run["row"]] = run_dir
    return out


def reference_table(ref: str | os.PathLike, rows: Sequence[str] | None = None,
                    tta: str = "flip") -> pd.DataFrame | None:
    """Many/Medium/Few/All of a committed reference's table1.csv beside WB's, or None (said) when absent."""
    ref = Path(ref)
    if (df := _table1(ref, tta)) is None:
        return None
    if rows is not None:
        df = df.loc[[r for r in rows if r in df.index]]
    info = read_json(ref / "runs.json") if (ref / "runs.json").is_file() else {}
    print(f"read from {ref / 'table1.csv'} (preset {info.get('preset', '?')!r}, seeds "
          f"{info.get('seeds', '?')}, {'flip-averaged' if tta == 'flip' else 'plain'}, last epoch); "
          "WB = the paper's Table 1")
    return pd.DataFrame({f"{who} {GROUP_TITLES[g]}": df[f"{g}_{suffix}"].round(2)
                         for who, suffix in (("ref", "mean"), ("WB", "paper")) for g in GROUPS},
                        index=df.index)


def reference_change(ref: str | os.PathLike, before: str, after: str, tta: str = "flip") -> str | None:
    """One line: how each group moves from row `before` to row `after`, in a reference and in WB's table."""
    ref = Path(ref)
    if (df := _table1(ref, tta)) is None:
        return None
    if before not in df.index or after not in df.index or pd.isna(df.loc[after, "all_mean"]):
        print(f"{ref / 'table1.csv'} has no finished rows {before!r} and {after!r}")
        return None

    def moves(suffix: str) -> str:
        pairs = [(g, df.loc[before, f"{g}_{suffix}"], df.loc[after, f"{g}_{suffix}"]) for g in GROUPS]
        return ", ".join(f"{GROUP_TITLES[g]} {'n/a' if pd.isna(a) or pd.isna(b) else f'{b - a:+.1f}'}"
                         for g, a, b in pairs)

    line = (f"{ref / 'table1.csv'}: from {before!r} to {after!r} (points, {tta}): reference run "
            f"{moves('mean')};  WB's Table 1 {moves('paper')}")
    print(line)
    return line


def show_reference(ref: str | os.PathLike, rows: Sequence[str],
                   changes: Sequence[tuple[str, str]] = ()) -> None:
    """Display a reference's rows (reference_table) and print how each (before, after) pair moves."""
    if (table := reference_table(ref, rows)) is None:
        return
    from IPython.display import display

    display(table)
    for before, after in changes:
        reference_change(ref, before, after)


def show_sweep(sweep_dir: str | os.PathLike, what: str = "this sweep") -> dict | None:
    """Display a sweep's (sweep) choice, held-out lines and figure; its sweep.json, or None (said)."""
    sdir = Path(sweep_dir)
    if not (sdir / "sweep.json").is_file():
        print(f"No sweep in {sdir} (no sweep.json): `python -m ltr sweep ...` writes one.")
        return None
    from IPython.display import Image, Markdown, display

    # The summary lines (chosen, WB's value, the gap) without the per-value table below them.
    summary = [line for line in (sdir / "sweep.md").read_text().splitlines()
               if line.startswith(("- ", "**", "# "))]
    display(Markdown(f"**{what}** (`{sdir}`)\n\n" + "\n".join(
        line.replace("# Sweep:", "Sweep:") for line in summary)))
    if (sdir / "sweep.png").is_file():
        display(Image(filename=str(sdir / "sweep.png")))
    return read_json(sdir / "sweep.json")


def reference_timing(ref: str | os.PathLike, rows: Sequence[str], preset: str) -> dict[int, float] | None:
    """Training minutes a reference spent on these rows' runs, per seed (from their metrics.json), printed."""
    ref = Path(ref)
    if not reference_runs(ref):
        _say_no_reference(ref, NO_RUNS)
        return None
    info = read_json(ref / "runs.json")
    if info.get("preset") != preset:
        print(f"{ref} was made with the {info.get('preset')!r} preset: "
              f"it measured no time for preset {preset!r}")
        return None
    minutes: dict[int, float] = {}
    runtime: dict = {}
    for seed in info["seeds"]:
        runs = reference_runs(ref, seed)
        if not (done := [runs[r] for r in rows if r in runs]):
            continue
        minutes[seed] = sum(float(read_json(d / "metrics.json").get("train_seconds") or 0) for d in done) / 60
        runtime = read_json(done[0] / "config.json").get("runtime", {})
    per_seed = ", ".join(f"seed {s}: {m:.1f} min" for s, m in minutes.items())
    print(f"training time of these {len(rows)} runs in {ref} ({per_seed}; device {runtime.get('device')}, "
          f"torch {runtime.get('torch')}). How each seed was run, and on which machine: {ref / 'README.md'}")
    return minutes


PAPER_REFERENCE_GLOB = "*-paper"  # exp/reference/<gpu>-paper/: a GPU run of the paper preset


def paper_reference(repo: str | os.PathLike) -> Path | None:
    """The committed paper-preset reference (exp/reference/<gpu>-paper/ holding a table1.csv), or None."""
    found = sorted(d for d in (Path(repo) / "exp" / "reference").glob(PAPER_REFERENCE_GLOB)
                   if (d / "table1.csv").is_file())
    return found[-1] if found else None


def show_paper_reference(repo: str | os.PathLike, rows: Sequence[str],
                         figure: str = "weight_norms") -> Figure | None:
    """The paper-scale reference's rows beside WB's and one figure (weight_norms or group_accuracy, flip)
    from its run directories; without a committed paper-preset reference it says so and returns None."""
    if (ref := paper_reference_said(repo)) is None:
        return None
    table, runs = reference_table(ref, rows), reference_runs(ref)
    done = {r: runs[r] for r in rows if r in runs}
    if table is None or not done:
        return None
    from IPython.display import display

    display(table)
    env = read_json(ref / "environment.json") if (ref / "environment.json").is_file() else {}
    where = f" ({env['gpu']})" if env.get("gpu") else ""
    if figure not in ("weight_norms", "group_accuracy"):
        raise ValueError(f"figure must be weight_norms or group_accuracy, got {figure!r}")
    fig = (plot_weight_norms(list(done.values()), labels=list(done)) if figure == "weight_norms"
           else plot_group_accuracy(list(done.values()), labels=list(done), tta="flip"))
    fig.suptitle(f"paper-scale reference {ref.name}{where}, preset paper")
    return fig


# Why weight decay helps (Hasegawa & Sato).


def show_feature_analysis(runs: Mapping[str, str | os.PathLike], what: str) -> pd.DataFrame | None:
    """Display plot_feature_analysis and feature_table of {label: run}, or say why not."""
    done = {label: Path(d) for label, d in runs.items() if (Path(d) / "metrics.json").is_file()}
    if not done:
        print(f"{what}: no finished run to analyse")
        return None
    if not has_feature_analysis(done):
        print(f"{what}: these runs do not record the Fisher ratio or the cone effect (made before ltr "
              "measured them); rerun them to see the figure")
        return None
    from IPython.display import display

    display(plot_feature_analysis(done, title=what))
    display(table := feature_table(done))
    return table


def paper_reference_said(repo: str | os.PathLike) -> Path | None:
    """paper_reference(repo), saying in one line when none is committed."""
    ref = paper_reference(repo)
    if ref is None:
        print("No paper-scale reference is committed yet (exp/reference/<gpu>-paper/): the figure needs a "
              "`paper` preset Table 1 run on a GPU (scripts/gpu_reference.sh).")
    return ref


def show_reference_features(ref: str | os.PathLike | None, rows: Sequence[str],
                            what: str) -> pd.DataFrame | None:
    """show_feature_analysis on a committed reference's runs of these Table 1 rows (first seed)."""
    if ref is None:
        return None
    if not (runs := reference_runs(ref)):
        _say_no_reference(Path(ref), NO_RUNS)
        return None
    return show_feature_analysis({r: runs[r] for r in rows if r in runs}, f"{what} ({ref})")


# Stage 2 read as a logit rescaling.


def _predicting_classifier(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the classifier that predicts, LWS's per-class scale folded in, float64."""
    w, b = state["fc.weight"].double(), state["fc.bias"].double()
    if "fc.scale" in state:
        s = state["fc.scale"].double()
        w, b = w * s[:, None], b * s
    return w, b


def logit_rescaling(stage1_run: str | os.PathLike, stage2_run: str | os.PathLike) -> pd.DataFrame:
    """Stage 2 read as a per-class rescaling of the logits: one row per class, before and after.

    Columns: training images, the classifier row norm before (stage 1) and after (stage 2), their ratio
    `scale`, the cosine between the two rows (1 = same direction, the row was only rescaled), and the bias
    before and after. attrs["tau_fit"]: the tau for which scale is closest to prior_c ** -tau (least
    squares of log scale on log prior, up to a common factor): the multiplicative logit adjustment that
    this stage 2 resembles. Needs the checkpoints (a committed reference keeps none).
    """
    paths = [Path(stage1_run) / "ckpt.pt", Path(stage2_run) / "ckpt.pt"]
    if missing := [p for p in paths if not p.is_file()]:
        raise DataError(f"{missing[0]} is missing: the rescaling reads the classifier from the checkpoints")
    (w0, b0), (w1, b1) = (
        _predicting_classifier(torch.load(p, map_location="cpu", weights_only=True)["model"]) for p in paths)
    counts = np.asarray(read_json(Path(stage1_run) / "metrics.json")["counts"], dtype=float)
    n0, n1 = w0.norm(dim=1), w1.norm(dim=1)
    df = pd.DataFrame({
        "images": counts.astype(int), "norm_before": n0.numpy(), "norm_after": n1.numpy(),
        "scale": (n1 / n0.clamp_min(1e-12)).numpy(), "cosine": F.cosine_similarity(w0, w1, dim=1).numpy(),
        "bias_before": b0.numpy(), "bias_after": b1.numpy(),
    })
    df.index.name = "class"
    slope = np.polyfit(np.log(counts / counts.sum()), np.log(df["scale"].clip(lower=1e-12)), 1)[0]
    df.attrs["tau_fit"] = float(-slope)
    return df
