"""What the teaching notebooks share: the data (real, else labelled synthetic), the preset's changes, and
tau-norm explored on cached test features (a slider over TauNorm).

The committed reference runs' readers (ltr.experiments.reference) and the tau-norm / rescaling figures
(ltr.plots) are re-exported here, so that a notebook calls everything it needs as notebook_tools.X.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from .config import preset_config, run_name, stage2_name
from .data import class_groups, dataset_info, load_cifar_lt, read_class_names, resolve_device
from .engine.cifar_files import download
from .engine.rundir import read_json
from .errors import DataError, LtrError
from .experiments.reference import (  # noqa: F401 - re-exported: the notebooks call notebook_tools.X
    PAPER_REFERENCE_GLOB,
    logit_rescaling,
    paper_reference,
    paper_reference_said,
    reference_change,
    reference_runs,
    reference_table,
    reference_timing,
    show_feature_analysis,
    show_paper_reference,
    show_reference,
    show_reference_features,
    show_sweep,
)
from .experiments.report import PAPER_TABLE1  # noqa: F401 - re-exported: WB's Table 1, for the notebooks
from .features import test_features, view_features
from .metrics import group_accuracy, per_class_accuracy
from .plots import plot_fit_and_test, plot_logit_rescaling, plot_tau_norm, plot_tau_sweep  # noqa: F401
from .regularizers import tau_normalize
from .runs import GROUP_TITLES, GROUPS, load_run
from .synthetic import write_fake_cifar
from .train import load_stage1, stage1_data_root, stage2_from, train_stage1, train_stage2

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


def prepare_data(root: str | os.PathLike, preset: str, dataset: str = "cifar100",
                 verbose: bool = True) -> tuple[Path, bool]:
    """(data root, synthetic?): the real dataset in every preset, downloaded if missing; synthetic offline.

    verbose=False leaves out the line naming the real data (downloads and synthetic images are always said).
    """
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
    elif verbose:
        print(f"using {dataset} from {root}: the real images (the official files)")
    return root, synthetic


# ---------------------------------------------------------------- the session: one setup call

RUNS_MODES = ("reference", "train")
REFERENCE_PRESET = "cpu"  # the preset of the committed notebook runs
NOTEBOOK_RUNS = Path("exp") / "reference" / "cpu" / "notebooks"  # committed runs, relative to the repo


def is_committed(run_dir: str | os.PathLike) -> bool:
    """True for a run directory inside a committed reference (exp/reference/...): never write into it."""
    parts = Path(run_dir).resolve().parts
    return any(a == "exp" and b == "reference" for a, b in zip(parts, parts[1:], strict=False))


def find_repo(start: str | os.PathLike | None = None) -> Path:
    """The repository root: the checkout that holds the imported ltr package (with its exp/ and data/)."""
    here = Path(__file__).resolve().parents[1]
    if (here / "pyproject.toml").is_file():
        return here
    start = Path.cwd() if start is None else Path(start)
    for p in (start, *start.parents):
        if (p / "ltr" / "__init__.py").is_file():
            return p
    return here  # an installed ltr without a checkout: reference runs and data/ are then absent


@dataclass
class Session:
    """What one notebook works with, made by setup(): where runs live and how they are made."""

    repo: Path  # repository root (holds ltr/, data/, exp/)
    runs: str  # "reference": read the committed runs, train nothing; "train": train (or reuse) runs
    preset: str  # the recipe's scale: "paper" (WB, GPU), "cpu" (2-core laptop), "smoke" (checks only)
    precision: str  # arithmetic of training: auto | bf16 | fp16 | fp32
    data_root: Path  # folder holding cifar-100-python/ (root/synthetic when the images are synthetic)
    synthetic: bool  # True when data_root holds ltr.synthetic images, not CIFAR-100
    exp: Path  # runs folder: stage1/<run name>/ and stage2/<stage-1 run name>/<stage-2 name>/
    reference: Path  # exp/reference/cpu: the committed cpu-preset Table 1 (three seeds), sweeps, figures
    source: str  # who made the numbers, for titles, e.g. "cpu preset, committed runs"
    note: str  # suffix for figure titles: "" when comparable to WB, else "  [source: not comparable to WB]"
    comparable: bool  # True only for the paper preset on the real data: numbers comparable with WB's

    @property
    def training(self) -> bool:
        """True in train mode."""
        return self.runs == "train"

    def _missing(self, what: str, path: Path) -> LtrError:
        return LtrError(
            f"{what} is not among the committed reference runs ({path} has no metrics.json). "
            "Reference mode only reads committed runs; to train it, run the notebook with the "
            "environment variable LTR_RUNS=train (or setup(runs='train')).")

    def stage1(self, cfg: object) -> Path:
        """The stage-1 run directory of cfg: trained (or reused) in train mode, the committed one in
        reference mode (an error naming LTR_RUNS=train when it is not committed)."""
        out = self.exp / "stage1" / run_name(cfg)
        if self.training:
            train_stage1(cfg, out, root=self.data_root, precision=self.precision)
        elif not (out / "metrics.json").is_file():
            raise self._missing(f"stage-1 run {out.name}", out)
        return out

    def stage2_config(self, stage1_run: str | os.PathLike, **recipe: object) -> object:
        """The stage-2 config of this preset on top of a stage-1 run (ltr.stage2_from)."""
        return stage2_from(stage1_run, self.preset, **recipe)

    def stage2(self, stage1_run: str | os.PathLike, **recipe: object) -> Path:
        """The stage-2 run directory of a recipe on a stage-1 run: trained (or reused) in train mode, the
        committed one in reference mode. recipe: stage2_from's fields (loss="cb", posthoc="tau-norm", ...)."""
        cfg = self.stage2_config(stage1_run, **recipe)
        out = self.exp / "stage2" / Path(stage1_run).name / stage2_name(cfg)
        if self.training:
            train_stage2(cfg, out, root=self.data_root, precision=self.precision)
        elif not (out / "metrics.json").is_file():
            raise self._missing(f"stage-2 run {Path(stage1_run).name}/{out.name}", out)
        return out

    def tau_norm(self, stage1_run: str | os.PathLike) -> TauNorm:
        """TauNorm of a stage-1 run on this session's data; a committed run's features stay in memory."""
        return TauNorm.from_run(stage1_run, root=self.data_root,
                                cache=self.training and not is_committed(stage1_run))


def _choose(arg: str | None, env: str, default: str, allowed: Sequence[str] | None = None) -> str:
    value = arg if arg is not None else (os.environ.get(env) or default)
    if allowed is not None and value not in allowed:
        raise LtrError(f"{env} (or the argument) must be one of {', '.join(allowed)}, got {value!r}")
    return value


def setup(preset: str | None = None, runs: str | None = None) -> Session:
    """Everything a notebook needs before section 1, in one call that prints one summary line.

    runs: argument, else the environment variable LTR_RUNS, else "reference" without a CUDA GPU and
    "train" with one. preset: argument, else LTR_PRESET, else "paper" with a CUDA GPU, "cpu" without
    (reference mode always reads the cpu preset's committed runs). Also read: LTR_PRECISION (auto),
    LTR_DATA_ROOT (repo/data), in train mode LTR_EXP (repo/exp), and in reference mode
    LTR_REFERENCE_RUNS (repo/exp/reference/cpu/notebooks: another folder of finished runs, same layout).
    """
    cuda = torch.cuda.is_available()
    runs = _choose(runs, "LTR_RUNS", "train" if cuda else "reference", RUNS_MODES)
    reference_mode = runs == "reference"
    preset = _choose(preset, "LTR_PRESET", REFERENCE_PRESET if reference_mode or not cuda else "paper")
    if reference_mode and preset != REFERENCE_PRESET:
        raise LtrError(f"the committed runs are of the {REFERENCE_PRESET!r} preset, not {preset!r}: "
                       f"set LTR_RUNS=train to train the {preset!r} preset")
    repo = find_repo()
    precision = os.environ.get("LTR_PRECISION", "auto")
    data_root, synthetic = prepare_data(os.environ.get("LTR_DATA_ROOT") or repo / "data", preset,
                                        verbose=False)
    if reference_mode:
        exp = Path(os.environ.get("LTR_REFERENCE_RUNS") or repo / NOTEBOOK_RUNS)
        if synthetic:
            print("Reference mode reads runs trained on the real CIFAR-100; the cells that recompute "
                  "features or accuracies here use the synthetic images and mean nothing.")
    else:
        exp = Path(os.environ.get("LTR_EXP") or repo / "exp")
        if synthetic:
            exp = exp / "synthetic"  # runs on synthetic images never mix with runs on CIFAR-100
    comparable = preset == "paper" and not synthetic
    source = f"{preset} preset" + (", committed runs" if reference_mode else "") + (
        " on SYNTHETIC images" if synthetic else "")
    session = Session(repo=repo, runs=runs, preset=preset, precision=precision, data_root=Path(data_root),
                      synthetic=synthetic, exp=exp, reference=repo / "exp" / "reference" / "cpu",
                      source=source, note="" if comparable else f"  [{source}: not comparable to WB]",
                      comparable=comparable)
    from . import __version__

    how = ("reading the committed runs, training nothing (LTR_RUNS=train trains)" if reference_mode
           else "training (or reusing) runs")
    data = "SYNTHETIC images" if synthetic else "CIFAR-100"
    print(f"ltr {__version__} · runs={runs}: {how} · preset {preset!r} · precision {precision} · "
          f"{data} from {_short(Path(data_root), repo)} · runs in {_short(exp, repo)}")
    return session


def _short(path: Path, repo: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(repo.resolve()))
    except ValueError:
        return str(path)


# ---------------------------------------------------------------- presets


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
                 device: str | torch.device = "auto", cache: bool | None = None) -> TauNorm:
        """From a finished stage-1 run; its test features are computed once and cached in the run dir.

        cache=False computes them in memory and writes nothing; None (default) caches except in a
        committed run (under exp/reference/), which stays as committed.
        """
        if cache is None:
            cache = not is_committed(run_dir)
        dev = resolve_device(device)
        model, cfg = load_stage1(run_dir, device=dev)
        data = load_cifar_lt(root if root is not None else stage1_data_root(run_dir), cfg.dataset,
                             cfg.imbalance)
        test_x = torch.as_tensor(data.test_x, device=dev)
        feats = test_features(run_dir, model, test_x) if cache else view_features(model, test_x)
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


# ---------------------------------------------------------------- what a notebook trains, and its time

OFFICIAL_LOGS = {"WD=0": "stage1-wd0.csv", "WD=5e-3": "stage1-wd5e-3.csv"}  # exp/official/: WB's own logs


def committed_run(session: Session, name: str, table1_first: bool = False) -> Path | None:
    """A committed finished stage-1 run of this name: the notebooks' runs first, then the cpu reference's
    Table 1 runs (table1_first: the other way round, e.g. to time runs all made on one machine)."""
    folders = [session.repo / NOTEBOOK_RUNS / "stage1", session.reference / "stage1"]
    for folder in reversed(folders) if table1_first else folders:
        if (folder / name / "metrics.json").is_file():
            return folder / name
    return None


def _minutes(run: Path) -> float | None:
    """Training minutes a finished run recorded (metrics.json train_seconds, else history.csv seconds)."""
    seconds = read_json(run / "metrics.json").get("train_seconds")
    if seconds is None and (run / "history.csv").is_file():
        seconds = float(pd.read_csv(run / "history.csv")["seconds"].sum())
    return None if seconds is None else float(seconds) / 60


def machine_note(run: Path) -> str:
    """Where a committed run was measured: the 'Machine' line of the README of the folder holding its
    stage1/ (or stage2/) tree, and whether that README or its wall_times.txt says the machine was loaded."""
    folder = run.parent.parent if run.parent.name == "stage1" else run.parent.parent.parent
    readme = folder / "README.md"
    if not readme.is_file():
        return f"the machine is not recorded ({folder} has no README.md)"
    text = readme.read_text(encoding="utf-8")
    flat = re.sub(r"\s+", " ", text.replace("**", ""))
    sentences = re.split(r"(?<=\.)\s+(?=[A-Z0-9-])", flat)
    line = next((x for key in ("Machine:", "GiB") for x in sentences if key in x), "").strip("-* ")
    walls = folder / "wall_times.txt"
    head = walls.read_text(encoding="utf-8").splitlines()[0] if walls.is_file() else ""
    said = (head + "\n" + text).lower()
    loaded = re.search(r"\bloaded\b", said) is not None and "not loaded" not in said
    where = f"{line[:160]} ({readme})" if line else str(readme)
    return where + ("; the machine was loaded, so a quiet one is faster" if loaded else "")


def training_plan(session: Session, configs: Mapping[str, object]) -> pd.DataFrame:
    """What the next cells train (train mode) or read (reference mode), with the minutes each committed
    run of the same name took to train; printed, and returned as a table."""
    rows = []
    for label, cfg in configs.items():
        name = run_name(cfg)
        done = (session.exp / "stage1" / name / "metrics.json").is_file()
        ref = committed_run(session, name)
        rows.append({"model": label, "run": name, "finished here": done,
                     "committed run took (min)": round(_minutes(ref), 1) if ref else None})
    table = pd.DataFrame(rows).set_index("model")
    if session.training:
        todo = table[~table["finished here"]]
        print(f"Train mode: the next cells train {len(todo)} stage-1 model(s) under {session.exp / 'stage1'} "
              "(a finished run is reused, not retrained).")
    else:
        print(f"Reference mode: nothing is trained; the runs are read from {session.exp / 'stage1'}.")
    timed = [committed_run(session, run_name(c)) for c in configs.values()]
    timed = [r for r in timed if r is not None]
    if timed:
        print(f"Training time of the committed runs of the same recipe, measured on: "
              f"{machine_note(timed[0])}")
    return table


# ---------------------------------------------------------------- WB's own logs beside our runs


def official_logs(repo: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """WB's per-epoch stage-1 logs (exp/official/*.csv; ResNet-34, 320 epochs): {label: DataFrame}."""
    folder = Path(repo) / "exp" / "official"
    return {label: pd.read_csv(folder / name) for label, name in OFFICIAL_LOGS.items()
            if (folder / name).is_file()}


def official_crossover(logs: Mapping[str, pd.DataFrame], train_acc: float | None = None) -> dict:
    """Where WB's weight-decay run overtakes the naive one in their logs, read from the logs.

    ahead_from: the first epoch after which weight decay's test accuracy stays above the naive one's;
    with train_acc, at_fit: the first epoch at which the weight-decay run reached that training accuracy.
    """
    m = logs["WD=0"].merge(logs["WD=5e-3"], on="epoch", suffixes=("_naive", "_wd"))
    behind = m[m["test_acc_wd"] <= m["test_acc_naive"]]
    ahead_from = int(behind["epoch"].max()) + 1 if len(behind) else int(m["epoch"].min())
    cols = ["epoch", "train_acc_naive", "train_acc_wd", "test_acc_naive", "test_acc_wd"]
    out = {"epochs": int(m["epoch"].max()), "last": m[cols].iloc[-1].to_dict(),
           "ahead_from": m[m["epoch"] == ahead_from][cols].iloc[0].to_dict()}
    if train_acc is not None:
        reached = m[m["train_acc_wd"] >= train_acc]
        if len(reached):
            out["at_fit"] = reached[cols].iloc[0].to_dict()
    return out


def fit_and_test(session: Session, runs: Mapping[str, str | os.PathLike]) -> Figure | None:
    """WB's two official stage-1 runs beside ours: training and test accuracy per epoch."""
    logs = official_logs(session.repo)
    if len(logs) < len(OFFICIAL_LOGS):
        print(f"WB's logs are not in {session.repo / 'exp' / 'official'}: nothing to draw")
        return None
    ours = {label: load_run(run)["history"] for label, run in runs.items()}
    first = next(iter(runs.values()))
    model, epochs = load_run(first)["config"].get("model"), int(max(h["epoch"].max() for h in ours.values()))
    return plot_fit_and_test({
        f"WB's official logs (ResNet-34, {int(logs['WD=0']['epoch'].max())} epochs)": logs,
        f"our runs ({model}, {epochs} epochs, {session.source})": ours,
    }, title="training (dashed) and test (solid) accuracy over the schedule" + session.note)


# ---------------------------------------------------------------- "At this scale": WB's claims, from files


def _table(path: Path, tta: str = "flip") -> pd.DataFrame:
    df = pd.read_csv(path)
    return df[(df.tta == tta) & (df.imbalance == df.imbalance.iloc[0])].set_index("row")


SCALE_ROWS = ("WD=0 (w/ CE)", "WD tuned (w/ CE)", "+ CB", "+ CB (weighted CE)", "+ CB & WD & Max")


def scale_table(reference: str | os.PathLike, rows: Sequence[str] = SCALE_ROWS) -> pd.DataFrame:
    """Rows of the cpu reference (table1.csv, flip, mean over its seeds) and of its validation-tuned table
    (table1-tuned.csv, seed 0) beside WB's Table 1 (PAPER_TABLE1), Many / Medium / Few / All."""
    ref = Path(reference)
    ours = _table(ref / "table1.csv")
    tuned = _table(ref / "table1-tuned.csv") if (ref / "table1-tuned.csv").is_file() else None
    out = pd.DataFrame(index=pd.Index(list(rows), name="row"))
    for g in (*GROUPS, "all"):
        out[f"cpu {GROUP_TITLES[g]}"] = [ours.loc[r, f"{g}_mean"] if r in ours.index else np.nan
                                         for r in rows]
    if tuned is not None:
        for g in ("few", "all"):
            # the tuned table trained its CB rows with the weighted CE: "+ CB (weighted CE)" is its "+ CB"
            out[f"cpu tuned {GROUP_TITLES[g]}"] = [
                tuned.loc[r.replace(" (weighted CE)", ""), f"{g}_mean"]
                if r != "+ CB" and r.replace(" (weighted CE)", "") in tuned.index else np.nan for r in rows]
    for i, g in enumerate((*GROUPS, "all")):
        out[f"WB {GROUP_TITLES[g]}"] = [PAPER_TABLE1.get(r.replace(" (weighted CE)", ""), (np.nan,) * 4)[i]
                                        for r in rows]
    return out.round(2)


def group_norms(run: str | os.PathLike) -> dict[str, float]:
    """Mean classifier-row norm of each group of a finished run, and "many/few", their ratio."""
    m = read_json(Path(run) / "metrics.json")
    norms = np.asarray(m["weight_norms"], dtype=float)
    out = {g: float(norms[idx].mean()) for g, idx in class_groups(m["counts"]).items() if idx}
    out["many/few"] = out["many"] / out["few"]
    return out


def norm_table(runs: Mapping[str, str | os.PathLike]) -> pd.DataFrame:
    """{label: run} -> the mean row norm of each group and the Many / Few ratio, one row a run."""
    return pd.DataFrame({label: group_norms(run) for label, run in runs.items()}).T.round(3)


def at_this_scale(session: Session, naive: str | os.PathLike, wd: str | os.PathLike) -> pd.DataFrame:
    """Which of WB's stage-1 claims show at this scale, which do not, and why, every number from a file.

    One line a claim: WB's change (PAPER_TABLE1), ours (table1.csv, mean over seeds), and the evidence
    (training accuracy in history.csv, the crossover in WB's logs, the norm ratio in metrics.json)."""
    from IPython.display import display

    ref = session.reference
    table = scale_table(ref)
    seeds = read_json(ref / "runs.json").get("seeds", "?") if (ref / "runs.json").is_file() else "?"
    print(f"cpu: {ref / 'table1.csv'} (flip, last epoch, mean over seeds {seeds}); cpu tuned: "
          f"{ref / 'table1-tuned.csv'} (values chosen on validation, seed 0, CB rows with weighted CE); "
          "WB: the paper's Table 1")
    display(table)
    n, w = "WD=0 (w/ CE)", "WD tuned (w/ CE)"

    def gain(col: str, a: str = n, b: str = w) -> float:
        return float(table.loc[b, col] - table.loc[a, col])

    whose = "the two runs above"
    if session.preset != REFERENCE_PRESET or session.synthetic:
        names = [run_name(preset_config("stage1", REFERENCE_PRESET, wd=v))
                 for v in (0.0, preset_config("stage1", REFERENCE_PRESET).wd)]
        found = [committed_run(session, nm) for nm in names]
        if None in found:
            print(f"no committed {REFERENCE_PRESET}-preset runs {names}: the claims need them")
            return table
        naive, wd = found
        whose = f"the committed {REFERENCE_PRESET} runs"
        print(f"(this session's runs are not at the {REFERENCE_PRESET} scale: training accuracy and norms "
              f"below are read from the committed runs {naive.parent})")
    a, b = group_norms(naive), group_norms(wd)
    shorter = all(b[g] < a[g] for g in GROUPS if g in a)
    fit = {label: float(load_run(run)["history"]["train_acc"].iloc[-1]) for label, run in
           (("naive", naive), ("wd", wd))}
    logs = official_logs(session.repo)
    complete = len(logs) == len(OFFICIAL_LOGS)
    cross = official_crossover(logs, train_acc=max(fit.values())) if complete else None
    lines = [
        f"1. Weight decay beats the naive model on All. WB: {gain('WB All'):+.2f}. Here: "
        f"{gain('cpu All'):+.2f}. " + ("Shows." if gain("cpu All") > 0 else "Does not show."),
        f"2. Weight decay helps Few. WB: {gain('WB Few'):+.2f} (small even in the paper). Here: "
        f"{gain('cpu Few'):+.2f}. " + ("Shows." if gain("cpu Few") > 0 else "Does not show."),
        f"3. Weight decay balances the norms. In {whose} the mean row norm "
        + ("falls in every group " if shorter else "does not fall in every group ")
        + f"(Many {a['many']:.2f} to {b['many']:.2f}, Few {a['few']:.2f} to {b['few']:.2f}), "
        "but the Many/Few "
        f"ratio goes from {a['many/few']:.2f} to {b['many/few']:.2f}: "
        + ("more balanced." if b["many/few"] < a["many/few"] else "shorter, not more balanced."),
        f"4. A class-balanced stage 2 helps. WB's '+ CB': {gain('WB All', w, '+ CB'):+.2f} All. Here with "
        f"WB's loss {gain('cpu All', w, '+ CB'):+.2f}, with a weighted cross-entropy "
        f"{gain('cpu All', w, '+ CB (weighted CE)'):+.2f} "
        f"(Few {gain('cpu Few', w, '+ CB (weighted CE)'):+.2f}): "
        f"the best row at this scale, {table.loc['+ CB (weighted CE)', 'cpu All']:.2f} All (notebook 2).",
    ]
    tuned_path = ref / "table1-tuned.csv"
    if tuned_path.is_file():
        tuned, ours = _table(tuned_path), _table(ref / "table1.csv")
        best, tbest = ours["all_mean"].idxmax(), tuned["all_mean"].idxmax()
        wbest = max(PAPER_TABLE1, key=lambda r: PAPER_TABLE1[r][3])
        lines.append(
            f"5. Best rows. With WB's values (table1.csv): {best!r}, All {ours.loc[best, 'all_mean']:.2f}. "
            f"With every value chosen on validation ({tuned_path.name}, seed 0): {tbest!r}, All "
            f"{tuned.loc[tbest, 'all_mean']:.2f}. WB: {wbest!r}, All {PAPER_TABLE1[wbest][3]:.2f}.")
    why = (f"Why: {whose} end at {fit['naive']:.1f}% (naive) and {fit['wd']:.1f}% (weight decay) training "
           "accuracy (history.csv, last epoch).")
    if cross is not None:
        a, f = cross["ahead_from"], cross.get("at_fit")
        if f is not None:
            why += (f" In WB's logs the weight-decay run reached that training accuracy at epoch "
                    f"{int(f['epoch'])} of {cross['epochs']}, where it was behind on test accuracy "
                    f"({f['test_acc_wd']:.2f} vs {f['test_acc_naive']:.2f}).")
        why += (f" It stays ahead only from epoch {int(a['epoch'])} on (training accuracy "
                f"{a['train_acc_wd']:.2f}) and ends at {cross['last']['test_acc_wd']:.2f} against "
                f"{cross['last']['test_acc_naive']:.2f}: weight decay pays once the model fits its training "
                "set, which ours never does.")
    for line in [*lines, why]:
        print(line)
    return table


# ---------------------------------------------------------------- the weight-decay sweep, by mode


def stage1_wd_sweep(session: Session) -> dict | None:
    """Section 8 of notebook 1: train mode trains the preset's grid (saying up front what and how long)
    and shows it; both modes then show the committed sweep of the cpu preset."""
    from .experiments.sweep import run_sweep
    from .experiments.tuning import sweep_grid

    committed = session.reference / "sweep-stage1-wd"
    if session.training:
        grid = sweep_grid("stage1-wd", session.preset)
        print("weight decays of this preset's grid:", grid)
        names = [run_name(preset_config("stage1", session.preset, wd=v)) for v in grid]
        todo = [nm for nm in names if not (session.exp / "stage1" / nm / "metrics.json").is_file()]
        took = [m for m in (_minutes(r) for r in (committed_run(session, nm) for nm in todo) if r) if m]
        print(f"It trains {len(todo)} model(s) not finished yet" + (
            f"; the committed runs of the same recipes took {sum(took):.0f} min in all "
            f"({machine_note(committed_run(session, todo[0]))})" if took and len(took) == len(todo) else "."))
        info = run_sweep("stage1-wd", root=session.data_root, out=session.exp, preset=session.preset,
                         precision=session.precision)
        show_sweep(info["sweep.json"].parent, "your sweep" + session.note)
    else:
        print("Reference mode: the sweep is not trained; the committed one is shown "
              "(LTR_RUNS=train trains it).")
    return show_sweep(committed, "committed sweep, cpu preset")


# ---------------------------------------------------------------- Try it: what each exercise costs


def try_it_costs(session: Session, items: Mapping[str, Sequence[float]], preset: str = REFERENCE_PRESET
                 ) -> pd.DataFrame:
    """{exercise: stage-1 weight decays it trains} -> minutes the committed runs of the preset's recipe with
    those weight decays took to train (0 for nothing to train), cheapest first, with the machine named.
    The Table 1 reference's runs are preferred, so that every time comes from the same machine."""
    rows, timed = [], None
    for item, wds in items.items():
        runs = [committed_run(session, run_name(preset_config("stage1", preset, wd=v)), table1_first=True)
                for v in wds]
        timed = timed or next((r for r in runs if r is not None), None)
        minutes = [_minutes(r) for r in runs if r is not None]
        rows.append({"exercise": item, "models to train": len(wds),
                     "measured minutes": round(sum(m or 0.0 for m in minutes), 1) if len(minutes) == len(wds)
                     else np.nan})
    table = pd.DataFrame(rows).set_index("exercise").sort_values(["models to train", "measured minutes"])
    if timed is not None:
        print(f"minutes to train the committed {preset}-preset runs, measured on: {machine_note(timed)}")
    return table
