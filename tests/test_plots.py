"""Figures from run directories: each function returns a Figure, writes a PNG, survives empty groups."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from ltr import plots
from ltr.config import Stage2Config, preset_config
from ltr.data import LtrError
from ltr.experiments.report import PAPER_TABLE1
from ltr.experiments.tables import TABLE1_ROWS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(smoke_runs: dict[str, Path]) -> dict[str, Path]:
    """One smoke stage-1 run, one retrained stage-2 run (CB & WD & MaxNorm) and one post-hoc run."""
    return {"s1": smoke_runs["s1"], "s2": smoke_runs["cb-wd-max"], "tau": smoke_runs["tau"]}


@pytest.fixture(scope="module")
def few_empty(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the stage-1 run whose Few group is empty (as at IF=10 on CIFAR-100)."""
    dst = tmp_path_factory.mktemp("few_empty") / "run"
    shutil.copytree(runs["s1"], dst)
    m = json.loads((dst / "metrics.json").read_text())
    m["counts"] = [max(n, 20) for n in m["counts"]]
    for tta in ("plain", "flip"):
        m[tta]["few"] = None
    (dst / "metrics.json").write_text(json.dumps(m))
    return dst


def _png_ok(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG


def test_load_run(runs: dict[str, Path], tmp_path: Path) -> None:
    r = plots.load_run(runs["s1"])
    assert r["stage"] == "stage1" and r["name"] == "stage1"
    assert len(r["metrics"]["weight_norms"]) == 100
    assert list(r["history"]["epoch"]) == [1]
    assert "wn_99" in r["history"].columns
    assert plots.load_run(runs["tau"])["history"] is None  # post-hoc: nothing trained
    (tmp_path / "config.json").write_text(json.dumps({"stage": "stage1", "config": {}}))
    with pytest.raises(LtrError, match="not finished"):
        plots.load_run(tmp_path)
    with pytest.raises(LtrError, match="not a run directory"):
        plots.load_run(tmp_path / "missing")


def test_count_profile(tmp_path: Path) -> None:
    fig = plots.plot_count_profile((100, 50, 10), save=tmp_path / "sub" / "profile.png")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    assert ax.get_yscale() == "log"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "10,847" in labels[0] and "35/35/30" in labels[0]  # SPEC 1.2 totals and groups
    assert "19,573" in labels[2] and "69/31/0" in labels[2]
    _png_ok(tmp_path / "sub" / "profile.png")


def test_weight_norms(runs: dict[str, Path], tmp_path: Path) -> None:
    fig = plots.plot_weight_norms([runs["s1"], runs["s2"], runs["tau"]], save=tmp_path / "wn.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    assert len(ax.lines[0].get_ydata()) == 100
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["WD=0.005", "+ CB & WD & MaxNorm", "+ tau-norm (tau=1.9)"]
    _png_ok(tmp_path / "wn.png")
    fig = plots.plot_weight_norms({"mine": runs["s1"]}, title="synthetic data")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["mine"]
    assert fig._suptitle.get_text() == "synthetic data"


def test_marginal_likelihood(runs: dict[str, Path], tmp_path: Path) -> None:
    fig = plots.plot_marginal_likelihood([runs["s1"], runs["s2"]], labels=["a", "b"],
                                         save=tmp_path / "ml.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # two runs and the uniform 1/C line
    assert sum(ax.lines[0].get_ydata()) == pytest.approx(1.0, abs=1e-3)
    _png_ok(tmp_path / "ml.png")
    with pytest.raises(LtrError, match="labels"):
        plots.plot_marginal_likelihood([runs["s1"]], labels=["a", "b"])


def test_norm_evolution(runs: dict[str, Path], tmp_path: Path) -> None:
    fig = plots.plot_norm_evolution(runs["s1"], save=tmp_path / "evo.png")
    ax = fig.axes[0]
    assert len(ax.lines) == 3  # Many, Medium, Few group means
    assert list(ax.lines[0].get_xdata()) == [1]
    _png_ok(tmp_path / "evo.png")
    # A stage-2 run starts from its stage-1 classifier (epoch 0).
    ax = plots.plot_norm_evolution(runs["s2"]).axes[0]
    assert list(ax.lines[0].get_xdata()) == [0, 1]
    with pytest.raises(LtrError, match="post-hoc"):
        plots.plot_norm_evolution(runs["tau"])


def test_per_class_accuracy(runs: dict[str, Path], few_empty: Path, tmp_path: Path) -> None:
    fig = plots.plot_per_class_accuracy(runs["s1"], tta="flip", save=tmp_path / "pca.png")
    ax = fig.axes[0]
    assert len(ax.containers) == 1 and len(ax.containers[0]) == 100
    assert len(ax.lines) == 3  # one mean line per group
    _png_ok(tmp_path / "pca.png")
    ax = plots.plot_per_class_accuracy(few_empty).axes[0]
    assert len(ax.lines) == 2
    with pytest.raises(LtrError, match="tta"):
        plots.plot_per_class_accuracy(runs["s1"], tta="mirror")


def test_group_accuracy(runs: dict[str, Path], few_empty: Path, tmp_path: Path) -> None:
    fig = plots.plot_group_accuracy(
        {"stage 1": runs["s1"], "stage 2": runs["s2"], "tau": runs["tau"]}, save=tmp_path / "g.png"
    )
    ax = fig.axes[0]
    assert len(ax.containers) == 3
    assert all(len(c) == 4 for c in ax.containers)
    m = json.loads((runs["s2"] / "metrics.json").read_text())["plain"]
    heights = [b.get_height() for b in ax.containers[1]]
    assert heights == pytest.approx([m["many"], m["medium"], m["few"], m["all"]])
    _png_ok(tmp_path / "g.png")
    fig = plots.plot_group_accuracy([runs["s1"], few_empty], labels=["full", "no few"], tta="flip")
    ax = fig.axes[0]
    assert [len(c) for c in ax.containers] == [4, 3]
    assert "n/a" in [t.get_text() for t in ax.texts]


def test_results_table(runs: dict[str, Path], few_empty: Path) -> None:
    four = {"s1": runs["s1"], "s2": runs["s2"], "tau": runs["tau"], "x": few_empty}
    plain = plots.results_table(four)
    assert list(plain.columns) == ["epochs", "Many", "Medium", "Few", "All"]  # no paper: no WB columns
    table = plots.results_table(four, paper=PAPER_TABLE1)
    assert list(table.index) == ["s1", "s2", "tau", "x"]
    # Smoke runs follow the recipe of WB's rows; the WB columns are the paper's numbers.
    assert table.loc["s1", "WB row"] == "WD tuned (w/ CE)"
    assert table.loc["s1", "WB All"] == PAPER_TABLE1["WD tuned (w/ CE)"][3]
    assert table.loc["s2", "WB row"] == "+ CB & WD & Max"
    assert table.loc["tau", "WB row"] == "+ tau-norm"
    assert table.loc["x", "Few"] == "n/a"
    flip = json.loads((runs["s1"] / "metrics.json").read_text())["flip"]["all"]
    assert table.loc["s1", "All"] == round(flip, 2)


def _fake(stage: str, config: dict, stage1: dict | None = None) -> dict:
    return {"run_dir": Path("x"), "name": "x", "stage": stage, "config": config, "stage1": stage1,
            "metrics": {}, "history": None}


def test_table1_rows_and_labels() -> None:
    naive = {"dataset": "cifar100", "imbalance": 100.0, "wd": 0.0}
    tuned = {**naive, "wd": 5e-3}
    assert plots.table1_row(_fake("stage1", naive)) == "WD=0 (w/ CE)"
    assert plots.table1_row(_fake("stage1", {**tuned, "imbalance": 50.0})) is None
    assert plots.table1_row(_fake("stage1", {**naive, "wd": 1e-3})) is None
    # The cpu preset's own tuned weight decay counts as "tuned" on the cpu recipe, and only there.
    cpu = {**naive, **asdict(preset_config("stage1", "cpu"))}
    assert plots.table1_row(_fake("stage1", cpu)) == "WD tuned (w/ CE)"
    assert plots.table1_row(_fake("stage2", {"posthoc": "l2norm"}, cpu)) == "+ L2norm"
    assert plots.table1_row(_fake("stage1", {**cpu, "epochs": 200})) is None
    assert plots.table1_row(_fake("stage2", {"posthoc": "tau-norm", "tau": 1.9}, naive)) == "WD=0 + tau-norm"
    assert plots.table1_row(_fake("stage2", {"posthoc": "tau-norm", "tau": 1.5}, tuned)) is None
    assert plots.table1_row(_fake("stage2", {"posthoc": "l2norm"}, tuned)) == "+ L2norm"
    cases = {
        ("ce", 0.1, None, False): "+ CE & WD",
        ("ce", 0.0, None, True): "+ CE & L2norm",
        ("cb", 0.0, None, False): "+ CB",
        ("cb", 0.1, None, False): "+ CB & WD",
        ("cb", 0.0, 0.1, False): "+ CB & Max",
        ("cb", 0.1, 0.1, False): "+ CB & WD & Max",
        ("cb", 0.1, 0.2, False): None,
    }
    for (loss, wd, mx, unit), row in cases.items():
        cfg = {"loss": loss, "wd": wd, "maxnorm": mx, "unit_norm": unit, "trainable": "fc"}
        assert plots.table1_row(_fake("stage2", cfg, tuned)) == row
    # Our weighted cross-entropy is not the loss of WB's CB rows: no WB row, and labelled as ours.
    ours = {"loss": "cb", "wd": 0.1, "maxnorm": 0.1, "unit_norm": False, "trainable": "fc",
            "cb_variant": "standard"}
    assert plots.table1_row(_fake("stage2", ours, tuned)) is None
    assert plots.run_label(_fake("stage2", ours, tuned)) == "+ CB (weighted CE) & WD & MaxNorm"
    last2 = {"loss": "cb", "wd": 0.1, "maxnorm": 0.1, "trainable": "last2"}
    assert plots.table1_row(_fake("stage2", last2, tuned)) == "last two layers + CB & WD & Max"
    assert plots.run_label(_fake("stage2", last2, naive)) == "WD=0 last two layers + CB & WD & MaxNorm"
    assert plots.run_label(_fake("stage1", naive)) == "WD=0 (naive)"


def test_table1_row_matches_the_table_runner() -> None:
    """Every row that tables runs is recognised by its recipe, under the name of the paper's row."""
    for row in TABLE1_ROWS:
        s1 = {"dataset": "cifar100", "imbalance": 100.0, "method": "ce",
              "wd": 0.0 if row.stage1 == "naive" else 5e-3}
        run = _fake("stage1", s1) if not row.stage2 else _fake(
            "stage2", {**asdict(Stage2Config()), **row.stage2}, s1)
        assert plots.table1_row(run) == row.name
        assert row.name in PAPER_TABLE1


def test_run_figures(runs: dict[str, Path], tmp_path: Path) -> None:
    for key, expect in (("s1", 6), ("s2", 5), ("tau", 4)):
        paths = plots.run_figures(runs[key])
        assert len(paths) == expect
        for p in paths:
            _png_ok(p)
        names = {p.name for p in paths}
        assert {"weight_norms.png", "per_class_acc.png", "marginal_likelihood.png"} <= names
        assert ("weight_norm_evolution.png" in names) == (key != "tau")
        assert ("feature_analysis.png" in names) == (key == "s1")  # stage 1 only
    assert plots.run_figures(tmp_path) == []  # unfinished or empty: nothing to plot


def test_figure_shows_in_notebooks() -> None:
    fig = plots.plot_count_profile((100,))
    assert fig._repr_png_()[:8] == PNG


def _without_features(run: Path, dst: Path) -> Path:
    """A copy of a run as made before ltr recorded the feature analysis."""
    shutil.copytree(run, dst)
    m = json.loads((dst / "metrics.json").read_text())
    m.pop("features")
    (dst / "metrics.json").write_text(json.dumps(m))
    hist = (dst / "history.csv").read_text().splitlines()
    cols = hist[0].split(",")
    keep = [i for i, c in enumerate(cols) if c != "test_fdr"]
    (dst / "history.csv").write_text("\n".join(",".join(line.split(",")[i] for i in keep) for line in hist))
    return dst


def test_feature_analysis(runs: dict[str, Path], tmp_path: Path) -> None:
    old = _without_features(runs["s1"], tmp_path / "old")
    table = plots.feature_table({"wd": runs["s1"], "old": old})
    m = json.loads((runs["s1"] / "metrics.json").read_text())["features"]
    assert table.loc["wd", "FDR test"] == pytest.approx(m["test"]["fdr"], abs=1e-4)
    assert table.loc["wd", "cone different test"] == pytest.approx(m["test"]["cone"]["different"], abs=1e-4)
    assert table.loc["old"].isna().all()
    fig = plots.plot_feature_analysis({"naive": runs["s1"], "wd": runs["s1"], "old": old},
                                      save=tmp_path / "f.png")
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    _png_ok(tmp_path / "f.png")
    assert "SYNTHETIC" in fig._suptitle.get_text()  # runs on synthetic files say so
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["naive", "wd", "old (no FDR over epochs recorded)"]
    assert not plots.has_feature_analysis(old)
    with pytest.raises(LtrError, match="before ltr measured it"):
        plots.plot_feature_analysis(old)
