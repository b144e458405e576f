"""What the notebooks share: the data they pick, committed reference runs, tau-norm on cached features."""

from __future__ import annotations

import pickle
import sys
import urllib.error
from dataclasses import asdict
from pathlib import Path

import pytest
from matplotlib.figure import Figure

from ltr import notebook_tools
from ltr.config import PRESETS, preset_config, run_name
from ltr.data import DataError, LtrError
from ltr.engine.rundir import read_json, write_json
from ltr.experiments.report import PAPER_TABLE1, collect
from ltr.experiments.tables import TABLE1_ROWS
from ltr.features import FEATURES_FILE
from ltr.notebook_tools import TauNorm
from ltr.plots import figure_png
from ltr.synthetic import write_fake_cifar

PNG = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- the data


def _fake_download(fetched: list[str]):
    def download(root: Path, dataset: str) -> Path:
        fetched.append(dataset)
        write_fake_cifar(root, dataset, train_per_class=2, test_per_class=1)
        names = [f"name{i}".encode() for i in range(100)]  # real-looking class names: not synthetic
        (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"fine_label_names": names}))
        return root / "cifar-100-python"

    return download


def test_prepare_data_uses_the_real_data_in_every_preset(
        small_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    # Data present: used as it is, and announced as synthetic when it is.
    assert notebook_tools.prepare_data(small_root, "smoke") == (small_root, True)
    assert "SYNTHETIC" in capsys.readouterr().out
    # Missing: downloaded, whatever the preset, and announced as the real images.
    fetched: list[str] = []
    monkeypatch.setattr(notebook_tools, "download", _fake_download(fetched))
    for preset in ("smoke", "cpu", "paper"):
        root = tmp_path / preset
        assert notebook_tools.prepare_data(root, preset) == (root, False)
        out = capsys.readouterr().out
        assert f"using cifar100 from {root}" in out and "synthetic" not in out.lower()
    assert fetched == ["cifar100"] * 3


def test_prepare_data_falls_back_to_synthetic_only_without_network(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def offline(root: Path, dataset: str) -> Path:
        try:
            raise urllib.error.URLError("no route to host")
        except OSError as exc:
            raise DataError("could not download") from exc

    monkeypatch.setattr(notebook_tools, "download", offline)
    root, synthetic = notebook_tools.prepare_data(tmp_path / "data", "cpu")
    assert root == tmp_path / "data" / "synthetic" and synthetic
    assert (root / "cifar-100-python" / "train").is_file()
    assert not (tmp_path / "data" / "cifar-100-python").exists()  # the real data can still go there
    out = capsys.readouterr().out
    assert "no route to host" in out and "SYNTHETIC images" in out

    def corrupt(root: Path, dataset: str) -> Path:
        raise DataError("md5 mismatch")  # a bad archive is an error, not a reason to fake the data

    monkeypatch.setattr(notebook_tools, "download", corrupt)
    with pytest.raises(DataError, match="md5"):
        notebook_tools.prepare_data(tmp_path / "other", "cpu")


def test_preset_changes() -> None:
    cpu = notebook_tools.preset_changes("cpu")
    changed = cpu.loc["stage1"]["cpu"].to_dict()
    assert changed == {k: v for k, v in PRESETS["cpu"]["stage1"].items() if k != "batch_size"}
    assert changed["model"] == "resnet8"
    assert cpu.loc["stage1", "wd"]["paper"] == 5e-3
    assert "stage2" not in cpu.index.get_level_values(0)  # stage 2 as the paper
    assert notebook_tools.preset_changes("paper").empty


# ---------------------------------------------------------------- committed reference runs


@pytest.fixture()
def reference(tmp_path: Path) -> Path:
    """A reference folder as `table1` leaves it (no checkpoints), made elsewhere and copied here."""
    ref = tmp_path / "exp" / "reference" / "cpu"
    made_in = Path("/somewhere/exp/table1-cpu")
    rows = [r for r in TABLE1_ROWS if r.name in ("WD=0 (w/ CE)", "WD tuned (w/ CE)", "+ tau-norm")]
    where, runs = {}, []
    for i, row in enumerate(rows):
        cfg = preset_config("stage1", "cpu", wd=0.0 if row.stage1 == "naive" else None)
        rel = Path("stage1") / run_name(cfg)
        if row.stage2:
            rel = Path("stage2") / run_name(cfg) / "tau-norm1.9"
        accs = {g: 10.0 * (i + 1) + k for k, g in enumerate(("many", "medium", "few", "all"))}
        (ref / rel).mkdir(parents=True)
        write_json(ref / rel / "config.json", {"stage": "stage1", "config": asdict(cfg),
                                               "runtime": {"device": "cpu", "torch": "2.14.1",
                                                           "created": "2026-11-24T06:00:00+0000"}})
        write_json(ref / rel / "metrics.json", {"plain": accs, "flip": accs,
                                                "train_seconds": 0.0 if row.stage2 else 300.0 * (i + 1)})
        where[row.name, 100.0, 0] = ref / rel
        runs.append({"row": row.name, "imbalance": 100.0, "seed": 0, "dir": str(made_in / rel)})
    (ref / "table1.csv").write_text(collect(tuple(rows), where, [0], [100.0]).to_csv(index=False))
    write_json(ref / "runs.json", {"preset": "cpu", "seeds": [0], "imbalances": [100.0], "runs": runs})
    return ref


def test_reference_runs_table_and_change(reference: Path, capsys: pytest.CaptureFixture) -> None:
    runs = notebook_tools.reference_runs(reference)
    assert set(runs) == {"WD=0 (w/ CE)", "WD tuned (w/ CE)", "+ tau-norm"}
    assert all(p.is_relative_to(reference) and (p / "metrics.json").is_file() for p in runs.values())
    table = notebook_tools.reference_table(reference, ["WD tuned (w/ CE)", "WD=0 (w/ CE)", "missing row"])
    assert list(table.index) == ["WD tuned (w/ CE)", "WD=0 (w/ CE)"]
    assert table.loc["WD tuned (w/ CE)", "ref All"] == 23.0
    assert table.loc["WD tuned (w/ CE)", "WB Few"] == PAPER_TABLE1["WD tuned (w/ CE)"][2]
    assert str(reference / "table1.csv") in capsys.readouterr().out  # the cell names its source
    line = notebook_tools.reference_change(reference, "WD=0 (w/ CE)", "WD tuned (w/ CE)")
    wb = PAPER_TABLE1["WD tuned (w/ CE)"][2] - PAPER_TABLE1["WD=0 (w/ CE)"][2]
    assert str(reference / "table1.csv") in line and "Few +10.0" in line and f"Few {wb:+.1f}" in line


def test_show_reference(reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture) -> None:
    import IPython.display

    shown: list = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    notebook_tools.show_reference(reference, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"],
                                  changes=[("WD=0 (w/ CE)", "WD tuned (w/ CE)")])
    assert len(shown) == 1 and list(shown[0].index) == ["WD=0 (w/ CE)", "WD tuned (w/ CE)"]
    assert "Few +10.0" in capsys.readouterr().out
    notebook_tools.show_reference(tmp_path / "none", ["WD=0 (w/ CE)"], changes=[("a", "b")])
    assert len(shown) == 1  # nothing displayed when the reference is absent ...
    assert capsys.readouterr().out.count("No committed reference run") == 1  # ... and that is said once


def test_feature_analysis_of_references_is_said_when_absent(reference: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    # The reference's runs predate the feature analysis: one line says so, nothing is drawn.
    rows = ["WD=0 (w/ CE)", "WD tuned (w/ CE)"]
    assert notebook_tools.show_reference_features(reference, rows, "ref") is None
    assert "do not record the Fisher ratio" in capsys.readouterr().out
    assert notebook_tools.paper_reference_said(tmp_path) is None
    assert "No paper-scale reference" in capsys.readouterr().out
    assert notebook_tools.show_reference_features(None, ["WD=0 (w/ CE)"], "paper") is None
    assert capsys.readouterr().out == ""


def test_reference_timing(reference: Path, capsys: pytest.CaptureFixture) -> None:
    rows = ["WD=0 (w/ CE)", "WD tuned (w/ CE)"]
    assert notebook_tools.reference_timing(reference, rows, "cpu") == {0: 15.0}
    out = capsys.readouterr().out
    assert "seed 0: 15.0 min" in out and "README.md" in out
    assert notebook_tools.reference_timing(reference, rows, "smoke") is None
    assert "no time for preset 'smoke'" in capsys.readouterr().out


def test_absent_reference_is_said(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref = tmp_path / "exp" / "reference" / "cpu"
    assert notebook_tools.reference_runs(ref) == {}  # a lookup: empty, silently
    assert notebook_tools.reference_table(ref) is None
    assert notebook_tools.reference_change(ref, "a", "b") is None
    assert notebook_tools.reference_timing(ref, ["a"], "cpu") is None
    out = capsys.readouterr().out
    assert out.count("No committed reference run") == 3 and str(ref) in out


# ---------------------------------------------------------------- tau-norm on cached features


@pytest.fixture(scope="module")
def stage1_run(smoke_runs: dict[str, Path]) -> dict[str, Path]:
    """A one-epoch smoke stage-1 run and its post-hoc tau-norm and L2-norm runs."""
    return {key: smoke_runs[key] for key in ("s1", "tau", "l2")}


def test_tau_norm_equals_the_posthoc_runs(stage1_run: dict[str, Path], small_root: Path) -> None:
    cached = stage1_run["s1"] / FEATURES_FILE
    assert cached.is_file()  # stage 1 cached its test features; the post-hoc runs read them
    before = cached.stat().st_mtime_ns
    tn = TauNorm.from_run(stage1_run["s1"], root=small_root, device="cpu")
    assert cached.stat().st_mtime_ns == before  # read, not recomputed
    for key, tau in (("tau", 1.9), ("l2", 1.0)):
        metrics = read_json(stage1_run[key] / "metrics.json")
        for tta in ("plain", "flip"):
            assert tn(tau, tta)["accuracy"] == metrics[tta]
        assert tn(tau, "flip", split="val")["accuracy"] == metrics["val"]["flip"]
        assert tn(tau)["norms"] == pytest.approx(metrics["weight_norms"], rel=1e-5)
    stage1 = read_json(stage1_run["s1"] / "metrics.json")
    assert tn(0.0)["accuracy"] == pytest.approx(stage1["flip"], abs=1e-9)  # tau 0: the stage-1 model
    assert tn(0.0)["norms"] == pytest.approx(stage1["weight_norms"], rel=1e-5)
    sweep = tn.sweep([0.0, 1.5, 3.0])
    assert list(sweep) == [0.0, 1.5, 3.0] and sweep[1.5]["tau"] == 1.5


def test_tau_figures_and_slider(stage1_run: dict[str, Path], small_root: Path,
                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    tn = TauNorm.from_run(stage1_run["s1"], root=small_root, device="cpu")
    one = notebook_tools.plot_tau_norm(tn(1.9), tn.counts, tn(0.0), title="t")
    sweep = notebook_tools.plot_tau_sweep(tn.sweep([0.0, 0.5, 1.0, 1.9, 3.0]))
    for fig in (one, sweep):
        assert isinstance(fig, Figure) and figure_png(fig)[:8] == PNG
    ipywidgets = pytest.importorskip("ipywidgets")
    box = notebook_tools.tau_slider(tn)
    slider = box.children[0]
    assert isinstance(slider, ipywidgets.FloatSlider)
    assert (slider.min, slider.max, slider.value) == (0, 3, 1.9)
    slider.value = 0.5  # redraws without error
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as where it is not installed
    assert notebook_tools.tau_slider(tn) is None
    assert "static sweep" in capsys.readouterr().out


def test_tau_norm_needs_a_finished_stage1_run(tmp_path: Path) -> None:
    with pytest.raises(LtrError, match="not a stage-1 run directory"):
        TauNorm.from_run(tmp_path)


def test_paper_reference_shown_when_committed_and_said_when_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """exp/reference/<gpu>-paper/: its rows beside WB's and a figure from its runs; one line without it."""
    import IPython.display

    from ltr.data import long_tail_counts

    rows = ["WD=0 (w/ CE)", "WD tuned (w/ CE)"]
    assert notebook_tools.show_paper_reference(tmp_path, rows) is None
    assert capsys.readouterr().out.count("\n") == 1  # said in one line
    ref = tmp_path / "exp" / "reference" / "h200-paper"
    counts = long_tail_counts(100, 100, 100)  # the synthetic tiny files' profile
    where, runs = {}, []
    for i, row in enumerate(r for r in TABLE1_ROWS if r.name in rows):
        cfg = preset_config("stage1", "paper", wd=0.0 if row.stage1 == "naive" else None)
        rel = Path("stage1") / run_name(cfg)
        accs = {g: 5.0 * (i + 1) for g in ("many", "medium", "few", "all")}
        (ref / rel).mkdir(parents=True)
        write_json(ref / rel / "config.json", {"stage": "stage1", "config": asdict(cfg), "runtime": {}})
        write_json(ref / rel / "metrics.json", {
            "plain": accs, "flip": accs, "counts": counts, "synthetic_data": True,
            "weight_norms": [1.0 + i + c / 100 for c in counts], "per_class_acc": [accs["all"]] * 100})
        where[row.name, 100.0, 0] = ref / rel
        runs.append({"row": row.name, "imbalance": 100.0, "seed": 0, "dir": f"/gpu/exp/{rel}"})
    (ref / "table1.csv").write_text(collect(tuple(TABLE1_ROWS[:3]), where | {
        ("WD=0 + tau-norm", 100.0, 0): ref / "none"}, [0], [100.0]).to_csv(index=False))
    write_json(ref / "runs.json", {"preset": "paper", "seeds": [0], "imbalances": [100.0], "runs": runs})
    write_json(ref / "environment.json", {"gpu": "NVIDIA H200"})
    assert notebook_tools.paper_reference(tmp_path) == ref
    shown: list = []
    monkeypatch.setattr(IPython.display, "display", shown.append)
    for kind in ("weight_norms", "group_accuracy"):
        fig = notebook_tools.show_paper_reference(tmp_path, rows, figure=kind)
        assert "h200-paper (NVIDIA H200)" in fig._suptitle.get_text()
        assert len(fig.axes[0].get_lines()) + len(fig.axes[0].patches) > 0
    assert list(shown[0].index) == rows and shown[0].loc["WD tuned (w/ CE)", "ref All"] == 10.0
