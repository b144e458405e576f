"""What the teaching notebooks share: the data (real, else labelled synthetic), the preset, committed
reference runs, and tau-norm explored on cached test features (a slider, or a static sweep)."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

from . import plots
from .config import preset_config
from .data import dataset_info, load_cifar_lt, read_class_names, resolve_device
from .engine.cifar_files import download
from .engine.rundir import read_json
from .errors import DataError
from .metrics import group_accuracy, per_class_accuracy
from .regularizers import tau_normalize
from .synthetic import write_fake_cifar
from .train import load_stage1, stage1_data_root, test_features

SYNTHETIC_NOTE = (
    "NOTE: these are SYNTHETIC images written by ltr.synthetic (one colour per class plus noise), "
    "NOT CIFAR-100. They only show that the code runs; no number below is comparable to the paper. "
    "For real results put cifar-100-python/ into the data folder (or rerun this cell with a network "
    "connection: it downloads CIFAR-100 itself)."
)
DOWNLOAD_TIMEOUT_S = 60  # a network that swallows packets fails here instead of hanging the notebook


# ---------------------------------------------------------------- the data


def is_synthetic(root: str | os.PathLike, dataset: str = "cifar100") -> bool:
    """True when the dataset under root was written by ltr.synthetic (its class names are class0, ...)."""
    names = read_class_names(root, dataset)
    return all(name == f"class{i}" for i, name in enumerate(names))  # as LTData.synthetic


def _fetch(root: Path, dataset: str) -> str | None:
    """Download the dataset into root; None on success, else why the network failed."""
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        download(root, dataset)
    except DataError as exc:
        # Only a failed transfer falls back to synthetic images; a corrupt archive stays an error.
        if isinstance(exc.__cause__, OSError):
            return str(exc.__cause__)
        raise
    finally:
        socket.setdefaulttimeout(old)
    return None


def prepare_data(root: str | os.PathLike, preset: str, dataset: str = "cifar100") -> tuple[Path, bool]:
    """(data root, synthetic?): the real dataset in every preset, downloaded if missing; synthetic offline."""
    del preset  # every preset teaches on the real data; kept so that notebooks read the same
    root = Path(root)
    folder = dataset_info(dataset).folder
    if not (root / folder).is_dir():
        print(f"{folder} is not in {root}: downloading it (about 170 MB, once) ...")
        failure = _fetch(root, dataset)
        if failure is not None:
            # Synthetic files go to root/synthetic, never into root itself, so that the real dataset
            # can be put into root later without a clash.
            print(f"the download failed ({failure}): writing synthetic images instead")
            root = root / "synthetic"
            if not (root / folder).is_dir():
                write_fake_cifar(root, dataset)
    synthetic = is_synthetic(root, dataset)
    if synthetic:
        print(SYNTHETIC_NOTE)
    else:
        print(f"using {dataset} from {root}: the real images (the official files)")
    return root, synthetic


# ---------------------------------------------------------------- presets and reference runs


def preset_changes(preset: str) -> pd.DataFrame:
    """The fields where a preset departs from the paper's recipe, stage by stage (empty for paper)."""
    if preset == "paper":
        return pd.DataFrame(columns=["stage", "field", "paper"]).set_index(["stage", "field"])
    rows = []
    for stage in ("stage1", "stage2"):
        paper, ours = asdict(preset_config(stage, "paper")), asdict(preset_config(stage, preset))
        for key, value in ours.items():
            if value != paper[key]:
                rows.append({"stage": stage, "field": key, "paper": paper[key], preset: value})
    return pd.DataFrame(rows, columns=["stage", "field", "paper", preset]).set_index(["stage", "field"])


def _missing(ref: Path, what: str) -> None:
    print(f"No committed reference run in {ref} yet (no {what}): nothing to compare with. "
          "A reference is what `python -m ltr table1` writes, kept under exp/reference/.")


def reference_runs(ref: str | os.PathLike, seed: int | None = None) -> dict[str, Path]:
    """Table 1 row -> finished run directory of a committed reference, for one seed (default its first)."""
    ref = Path(ref)
    if not (ref / "runs.json").is_file():
        return {}
    info = read_json(ref / "runs.json")
    seed = info["seeds"][0] if seed is None else seed
    imbalance = info["imbalances"][0]
    out = {}
    for run in info["runs"]:
        if run["seed"] != seed or run["imbalance"] != imbalance:
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
    path = ref / "table1.csv"
    if not path.is_file():
        _missing(ref, "table1.csv")
        return None
    df = pd.read_csv(path)
    df = df[(df.tta == tta) & (df.imbalance == df.imbalance.iloc[0])].set_index("row")
    if rows is not None:
        df = df.loc[[r for r in rows if r in df.index]]
    info = read_json(ref / "runs.json") if (ref / "runs.json").is_file() else {}
    print(f"read from {path} (preset {info.get('preset', '?')!r}, seeds {info.get('seeds', '?')}, "
          f"{'flip-averaged' if tta == 'flip' else 'plain'}, last epoch); WB = the paper's Table 1")
    table = pd.DataFrame(index=df.index)
    for who, suffix in (("ref", "mean"), ("WB", "paper")):
        for g in ("many", "medium", "few", "all"):
            table[f"{who} {plots.GROUP_TITLES[g]}"] = df[f"{g}_{suffix}"].round(2)
    return table


def reference_change(ref: str | os.PathLike, before: str, after: str, tta: str = "flip") -> str | None:
    """One line: how each group moves from row `before` to row `after`, in a reference and in WB's table."""
    ref = Path(ref)
    if not (ref / "table1.csv").is_file():
        _missing(ref, "table1.csv")
        return None
    df = pd.read_csv(ref / "table1.csv")
    df = df[(df.tta == tta) & (df.imbalance == df.imbalance.iloc[0])].set_index("row")
    if before not in df.index or after not in df.index or pd.isna(df.loc[after, "all_mean"]):
        print(f"{ref / 'table1.csv'} has no finished rows {before!r} and {after!r}")
        return None

    def moves(suffix: str) -> str:
        parts = []
        for g in ("many", "medium", "few", "all"):
            a, b = df.loc[before, f"{g}_{suffix}"], df.loc[after, f"{g}_{suffix}"]
            parts.append(f"{plots.GROUP_TITLES[g]} {'n/a' if pd.isna(a) or pd.isna(b) else f'{b - a:+.1f}'}")
        return ", ".join(parts)

    line = (f"{ref / 'table1.csv'}: from {before!r} to {after!r} (points, {tta}): reference run "
            f"{moves('mean')};  WB's Table 1 {moves('paper')}")
    print(line)
    return line


def show_reference(ref: str | os.PathLike, rows: Sequence[str],
                   changes: Sequence[tuple[str, str]] = ()) -> None:
    """Display a reference's rows (reference_table) and print how each (before, after) pair moves."""
    table = reference_table(ref, rows)
    if table is None:
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

    info = read_json(sdir / "sweep.json")
    md = (sdir / "sweep.md").read_text()
    # The summary lines (chosen, WB's value, the gap) without the per-value table below them.
    summary = [line for line in md.splitlines() if line.startswith(("- ", "**", "# "))]
    display(Markdown(f"**{what}** (`{sdir}`)\n\n" + "\n".join(
        line.replace("# Sweep:", "Sweep:") for line in summary)))
    if (sdir / "sweep.png").is_file():
        display(Image(filename=str(sdir / "sweep.png")))
    return info


def reference_timing(ref: str | os.PathLike, rows: Sequence[str], preset: str) -> dict[int, float] | None:
    """Training minutes a reference spent on these rows' runs, per seed (from their metrics.json), printed."""
    ref = Path(ref)
    if not reference_runs(ref):
        _missing(ref, "runs.json with finished run directories")
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
        done = [runs[r] for r in rows if r in runs]
        if not done:
            continue
        seconds = [float(read_json(d / "metrics.json").get("train_seconds") or 0.0) for d in done]
        minutes[seed] = sum(seconds) / 60
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
    """The paper-scale reference's rows beside WB's and one figure drawn from its run directories.

    figure: weight_norms (per-class classifier norms) or group_accuracy (flip). Without a committed
    paper-preset reference it says so in one line and returns None.
    """
    ref = paper_reference(repo)
    if ref is None:
        print("No paper-scale (GPU) reference is committed yet (exp/reference/<gpu>-paper/): "
              "scripts/gpu_reference.sh makes one.")
        return None
    table = reference_table(ref, rows)
    runs = reference_runs(ref)
    done = {r: runs[r] for r in rows if r in runs}
    if table is None or not done:
        return None
    from IPython.display import display

    display(table)
    env = read_json(ref / "environment.json") if (ref / "environment.json").is_file() else {}
    where = f" ({env['gpu']})" if env.get("gpu") else ""
    if figure == "weight_norms":
        fig = plots.plot_weight_norms(list(done.values()), labels=list(done))
    elif figure == "group_accuracy":
        fig = plots.plot_group_accuracy(list(done.values()), labels=list(done), tta="flip")
    else:
        raise ValueError(f"figure must be weight_norms or group_accuracy, got {figure!r}")
    fig.suptitle(f"paper-scale reference {ref.name}{where}, preset paper")
    return fig


# ---------------------------------------------------------------- tau-norm on cached features


@dataclass
class TauNorm:
    """Tau-norm of a stage-1 classifier on its cached test features: each tau is one matrix product."""

    weight: torch.Tensor  # fc.weight of the stage-1 model (classes x features)
    bias: torch.Tensor  # fc.bias, kept as it is (tau-norm rescales the rows only)
    feats: dict[str, torch.Tensor]  # pooled test features, "plain" and "mirror"
    labels: torch.Tensor  # test labels
    counts: list[int]  # training images per class (for Many / Medium / Few)
    splits: dict[str, torch.Tensor]  # "val" and "heldout" rows of the test set

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, root: str | os.PathLike | None = None,
                 device: str | torch.device = "auto") -> TauNorm:
        """From a finished stage-1 run; its test features are computed once and cached in the run dir."""
        dev = resolve_device(device)
        model, cfg = load_stage1(run_dir, device=dev)
        data = load_cifar_lt(root if root is not None else stage1_data_root(run_dir), cfg.dataset,
                             cfg.imbalance)
        feats = test_features(run_dir, model, torch.as_tensor(data.test_x, device=dev))
        return cls(
            weight=model.fc.weight.detach().float(),
            bias=model.fc.bias.detach().float(),
            feats={k: v.to(dev).float() for k, v in feats.items()},
            labels=torch.as_tensor(data.test_y, device=dev),
            counts=list(data.counts),
            splits={"val": torch.as_tensor(data.val_idx, device=dev),
                    "heldout": torch.as_tensor(data.heldout_idx, device=dev)},
        )

    @torch.no_grad()
    def __call__(self, tau: float, tta: str = "flip", split: str = "test") -> dict:
        """Norms of the rescaled rows and Many/Medium/Few/All accuracy (percent) at this tau."""
        weight = self.weight.clone()
        tau_normalize(weight, tau)  # the same function as the post-hoc stage-2 run
        logits = F.linear(self.feats["plain"], weight, self.bias)
        if tta == "flip":
            logits = 0.5 * (logits + F.linear(self.feats["mirror"], weight, self.bias))
        labels = self.labels
        if split != "test":
            idx = self.splits[split]
            logits, labels = logits[idx], labels[idx]
        per_class = per_class_accuracy(logits.argmax(1), labels, len(self.counts)).cpu()
        return {"tau": float(tau), "norms": weight.norm(dim=1).cpu().numpy(),
                "accuracy": group_accuracy(per_class, self.counts)}

    def sweep(self, taus: Sequence[float], tta: str = "flip", split: str = "test") -> dict[float, dict]:
        """{tau: result} for several taus."""
        return {float(t): self(t, tta, split) for t in taus}


def _log_axis(ax: Axes, ylim: tuple[float, float] | None = None) -> None:
    """A log y axis labelled with plain numbers (norms span about one decade)."""
    ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_tau_norm(result: Mapping, counts: Sequence[int], base: Mapping | None = None,
                  title: str | None = None, ylim: tuple[float, float] | None = None) -> Figure:
    """One tau: per-class norms of the rescaled classifier and Many/Medium/Few/All, beside base (tau 0)."""
    fig = plots._figure((10.5, 3.6))
    ax, bars = fig.subplots(1, 2, width_ratios=[1.7, 1.0])
    plots._class_bands(ax, counts)
    if base is not None:
        ax.plot(base["norms"], color="0.6", lw=1.2, label=f"tau = {base['tau']:g} (stage 1)")
    ax.plot(result["norms"], color="tab:purple", lw=1.6, label=f"tau = {result['tau']:.2f}")
    _log_axis(ax, ylim)
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
    bars.set_xticks(x, [plots.GROUP_TITLES[k] for k in keys])
    bars.set_ylim(0, 100)
    bars.set_ylabel("test accuracy, %")
    bars.legend(fontsize=8, loc="upper right")
    return plots._finish(fig, title, None)


def plot_tau_sweep(results: Mapping[float, Mapping], marks: Sequence[float] = (0.0, 1.0, 1.9, 3.0),
                   title: str | None = None) -> Figure:
    """Many/Medium/Few/All against tau, and the per-class norms at a few marked taus (the static view)."""
    taus = sorted(results)
    fig = plots._figure((10.5, 3.6))
    acc, norms = fig.subplots(1, 2)
    for g in ("many", "medium", "few", "all"):
        ys = [results[t]["accuracy"].get(g) for t in taus]
        if all(y is None for y in ys):
            continue
        acc.plot(taus, [math.nan if y is None else y for y in ys], lw=2,
                 color=plots.GROUP_COLOURS.get(g, "black"), ls="-" if g != "all" else "--",
                 label=plots.GROUP_TITLES[g])
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
    _log_axis(norms)
    norms.set_xlabel("class (head on the left, tail on the right)")
    norms.set_ylabel("||w_c|| after tau-norm (log)")
    norms.legend(fontsize=8)
    norms.set_title("per-class norms at a few tau", fontsize=9)
    return plots._finish(fig, title, None)


def tau_slider(tau_norm: TauNorm, value: float = 1.9, tta: str = "flip", title: str | None = None) -> object:
    """An ipywidgets slider (tau 0 to 3) that redraws plot_tau_norm; None, said, without ipywidgets."""
    try:
        import ipywidgets as widgets
        from IPython.display import display
    except ImportError:
        print("ipywidgets is not installed: the static sweep above shows the same numbers")
        return None
    base = tau_norm(0.0, tta)
    # One y range for every tau (each norm moves monotonically in tau), so that dragging shows the motion.
    ends = np.concatenate([base["norms"], tau_norm(3.0, tta)["norms"]])
    ylim = (float(ends.min()) * 0.8, float(ends.max()) * 1.25)
    slider = widgets.FloatSlider(value=value, min=0.0, max=3.0, step=0.05, description="tau",
                                 continuous_update=True, readout_format=".2f")

    def draw(tau: float) -> None:
        display(plot_tau_norm(tau_norm(tau, tta), tau_norm.counts, base, title, ylim))

    return widgets.VBox([slider, widgets.interactive_output(draw, {"tau": slider})])


# ---------------------------------------------------------------- why weight decay helps (Hasegawa & Sato)


def show_feature_analysis(runs: Mapping[str, str | os.PathLike], what: str) -> pd.DataFrame | None:
    """Display plots.plot_feature_analysis and plots.feature_table of {label: run}, or say why not."""
    done = {label: Path(d) for label, d in runs.items() if (Path(d) / "metrics.json").is_file()}
    if not done:
        print(f"{what}: no finished run to analyse")
        return None
    if not plots.has_feature_analysis(done):
        print(f"{what}: these runs do not record the Fisher ratio or the cone effect (made before ltr "
              "measured them); rerun them to see the figure")
        return None
    from IPython.display import display

    display(plots.plot_feature_analysis(done, title=what))
    table = plots.feature_table(done)
    display(table)
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
    runs = reference_runs(ref)
    if not runs:
        _missing(Path(ref), "runs.json with finished run directories")
        return None
    return show_feature_analysis({r: runs[r] for r in rows if r in runs}, f"{what} ({ref})")


def _fc_state(state: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
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
    for p in paths:
        if not p.is_file():
            raise DataError(f"{p} is missing: the rescaling reads the classifier from the checkpoints")
    (w0, b0), (w1, b1) = (_fc_state(torch.load(p, map_location="cpu", weights_only=True)["model"])
                          for p in paths)
    counts = np.asarray(read_json(Path(stage1_run) / "metrics.json")["counts"], dtype=float)
    n0, n1 = w0.norm(dim=1), w1.norm(dim=1)
    df = pd.DataFrame({
        "images": counts.astype(int), "norm_before": n0.numpy(), "norm_after": n1.numpy(),
        "scale": (n1 / n0.clamp_min(1e-12)).numpy(), "cosine": F.cosine_similarity(w0, w1, dim=1).numpy(),
        "bias_before": b0.numpy(), "bias_after": b1.numpy(),
    })
    df.index.name = "class"
    log_prior = np.log(counts / counts.sum())
    slope = np.polyfit(log_prior, np.log(df["scale"].clip(lower=1e-12)), 1)[0]
    df.attrs["tau_fit"] = float(-slope)
    return df


def plot_logit_rescaling(df: pd.DataFrame, title: str | None = None) -> Figure:
    """logit_rescaling as figures: norms before / after, the per-class scale (with prior^-tau_fit), biases."""
    counts = df["images"].tolist()
    classes = np.arange(len(df))
    fig = plots._figure((13.0, 3.6))
    axes = fig.subplots(1, 3)
    for ax in axes:
        plots._class_bands(ax, counts)
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
    _log_axis(scale)
    scale.set_ylabel("per-class logit scale (log)")
    scale.legend(fontsize=8, loc="lower right")
    scale.set_title(f"rescaling; rows keep direction: cosine min {df['cosine'].min():.3f}", fontsize=9)
    bias.plot(classes, df["bias_before"], color="0.5", lw=1.4, label="before")
    bias.plot(classes, df["bias_after"], color="tab:purple", lw=1.4, label="after")
    bias.axhline(0, color="0.3", lw=0.8)
    bias.set_ylabel("b_c")
    bias.legend(fontsize=8, loc="lower left")
    bias.set_title("classifier bias", fontsize=9)
    return plots._finish(fig, title, None)
