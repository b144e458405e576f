"""ltr sweep: choice on validation only, reuse of finished points, resume, bad values, Optuna, --tuned."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

import ltr.experiments.tables
from ltr.cli import main
from ltr.data import LtrError
from ltr.engine.rundir import read_json
from ltr.experiments.sweep import check_values, choose, plan_points, run_sweep, summarize, write_outputs
from ltr.experiments.tables import TABLE1_ROWS, plan
from ltr.experiments.tuning import KINDS, sweep_grid
from ltr.synthetic import write_fake_cifar

FAST = dict(device="cpu", progress=False)


def _mtimes(out: Path, name: str = "metrics.json") -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob(name)}


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """CIFAR-100 layout with 25 test images a class: 20 for validation, 5 held out."""
    root = tmp_path_factory.mktemp("sweep_data")
    write_fake_cifar(root, "cifar100", train_per_class=100, test_per_class=25)
    return root


@pytest.fixture(scope="module")
def swept(sweep_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke preset's default stage-1 weight-decay and tau grids, through the CLI."""
    out = tmp_path_factory.mktemp("sweep") / "t"
    for kind in ("stage1-wd", "tau"):
        assert main(["sweep", kind, "--root", str(sweep_root), "--preset", "smoke", "--out", str(out),
                     "--device", "cpu", "--quiet"]) == 0
    return out


@pytest.mark.parametrize("kind", ["stage1-wd", "tau"])
def test_smoke_sweep_writes_table_and_figure(swept: Path, kind: str) -> None:
    k = KINDS[kind]
    sdir = swept / f"sweep-{kind}"
    points = pd.read_csv(sdir / "sweep.csv")
    assert sorted(points.value) == sorted(sweep_grid(k.name, "smoke")) and (points.seed == 0).all()
    assert all(Path(r, "metrics.json").exists() for r in points.run)
    info = read_json(sdir / "sweep.json")
    best = points.loc[points.val_all == points.val_all.max(), "value"].min()
    assert math.isclose(info["chosen"], best)
    assert info["paper"] == k.paper and info["heldout_paper"] is not None
    md = (sdir / "sweep.md").read_text()
    assert md.startswith("**These runs used SYNTHETIC images")
    assert f"chosen: **{k.field} = {info['chosen']:g}**" in md and "WB's value" in md
    assert md.count("\n| ") == len(sweep_grid(k.name, "smoke")) + 1  # header + one line per value
    assert (sdir / "sweep.png").stat().st_size > 5000


def test_finished_points_are_not_retrained(swept: Path, sweep_root: Path) -> None:
    before = _mtimes(swept)
    run_sweep("stage1-wd", root=sweep_root, out=swept, preset="smoke", **FAST)
    run_sweep("tau", values=[0.0, 1.9], root=sweep_root, out=swept, preset="smoke",
              sweep_dir=swept / "tau-two", **FAST)
    assert all(_mtimes(swept)[p] == t for p, t in before.items())
    assert len(pd.read_csv(swept / "tau-two" / "sweep.csv")) == 2


def test_table1_runs_are_sweep_points(tmp_path: Path) -> None:
    # Table 1's tuned-WD and naive backbones are the sweep's points at the preset's value and at 0.
    runs, _ = plan(TABLE1_ROWS, tmp_path, "smoke", [100.0], [0])
    table_dirs = {r.out for r in runs}
    _, wd_points = plan_points(KINDS["stage1-wd"], [0.0, 5e-3], tmp_path, "smoke", [0], 100.0)
    _, tau_points = plan_points(KINDS["tau"], [1.9], tmp_path, "smoke", [0], 100.0)
    assert {p.run.out for p in wd_points + tau_points} <= table_dirs


def _planted() -> pd.DataFrame:
    # 0.01 is the best value on held-out by far but the worst on validation; 0.001 is best on validation.
    rows = []
    for v, val, held in ((0.0, 30.0, 30.0), (0.001, 35.0, 31.0), (0.01, 20.0, 60.0)):
        for seed in (0, 1):
            rec = {"value": v, "seed": seed, "run": f"r{v}-{seed}", "synthetic_data": True}
            for g in ("all", "many", "medium", "few"):
                rec[f"val_{g}"], rec[f"heldout_{g}"] = val + seed, held + seed
            rows.append(rec)
    return pd.DataFrame(rows)


def test_choice_reads_validation_only(tmp_path: Path) -> None:
    points = _planted()
    assert choose(summarize(points)) == 0.001
    info = {"preset": "smoke", "dataset": "cifar100", "imbalance": 100.0, "seeds": [0, 1], "tta": "flip",
            "search": "grid", "paper": 5e-3, "preset_value": 5e-3, "from_run": None}
    write_outputs(KINDS["stage1-wd"], points, tmp_path, info)
    saved = read_json(tmp_path / "sweep.json")
    assert saved["chosen"] == 0.001 and saved["heldout_chosen"] == 31.5 and saved["heldout_paper"] is None
    assert "not in this sweep" in (tmp_path / "sweep.md").read_text()


def test_choice_needs_every_seed() -> None:
    points = _planted()
    points = points[~((points.value == 0.001) & (points.seed == 1))]  # 0.001 lacks seed 1
    assert choose(summarize(points), seeds=2) == 0.0


def test_interrupted_grid_resumes(sweep_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ltr.experiments.tables.train_stage1
    calls = []

    def dies_on_second(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ltr.experiments.tables, "train_stage1", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        run_sweep("stage1-wd", values=[0.0, 1e-3], root=sweep_root, out=tmp_path, preset="tiny", **FAST)
    first = _mtimes(tmp_path)
    assert len(first) == 1
    monkeypatch.setattr(ltr.experiments.tables, "train_stage1", real)
    files = run_sweep("stage1-wd", values=[0.0, 1e-3], root=sweep_root, out=tmp_path, preset="tiny", **FAST)
    assert len(pd.read_csv(files["sweep.csv"])) == 2
    assert all(_mtimes(tmp_path)[p] == t for p, t in first.items())


@pytest.mark.parametrize(("kind", "values", "needle"), [
    ("stage1-wd", [], "--values is empty"),
    ("stage1-wd", ["-1e-3"], "weight decay must be >= 0"),
    ("stage2-wd", ["0.1", "-0.1"], "weight decay must be >= 0"),
    ("tau", ["-0.5"], "must be >= 0"),
    ("maxnorm", ["0"], "outside (0, 1]"),
    ("maxnorm", ["0.1", "1.5"], "outside (0, 1]"),
])
def test_bad_values_are_one_clear_error(kind: str, values: list[str], needle: str, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["sweep", kind, "--values", *values, "--root", str(tmp_path / "nodata"), "--preset", "tiny",
                 "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and needle in err and err.count("error:") == 1
    assert not (tmp_path / "o").exists()


def test_check_values_sorts_and_dedups() -> None:
    assert check_values(KINDS["tau"], [2, 1.9, 2]) == [1.9, 2.0]
    assert check_values(KINDS["maxnorm"], None) == list(KINDS["maxnorm"].grid)
    assert check_values(KINDS["maxnorm"], None, "smoke") == list(sweep_grid("maxnorm", "smoke"))
    with pytest.raises(LtrError, match="finite"):
        check_values(KINDS["tau"], [float("nan")])


def test_missing_optuna_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now raises ImportError
    code = main(["sweep", "tau", "--search", "bayes", "--root", str(tmp_path), "--preset", "tiny",
                 "--out", str(tmp_path / "o"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'ltr[tune]'" in err


def test_bayes_study_resumes(sweep_root: Path, tmp_path: Path) -> None:
    optuna = pytest.importorskip("optuna")
    kw = dict(search="bayes", root=sweep_root, out=tmp_path, preset="tiny", **FAST)
    run_sweep("tau", trials=3, **kw)
    sdir = tmp_path / "sweep-tau-bayes"
    storage = f"sqlite:///{(sdir / 'optuna.db').resolve()}"
    study = optuna.load_study(study_name="tau", storage=storage)
    assert len(study.trials) == 3
    # An interruption mid-trial leaves it RUNNING in the database: the next run retries its value.
    stale = study.ask({"tau": optuna.distributions.FloatDistribution(0.0, 3.0)})
    stale_value = float(f"{stale.params['tau']:.3g}")
    before = _mtimes(tmp_path)
    files = run_sweep("tau", trials=5, **kw)
    study = optuna.load_study(study_name="tau", storage=storage)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 5
    assert study.trials[stale.number].state == optuna.trial.TrialState.FAIL
    assert stale_value in [t.user_attrs["value"] for t in complete[3:]]
    assert all(_mtimes(tmp_path)[p] == t for p, t in before.items())  # the first 3 trials were not redone
    points = pd.read_csv(files["sweep.csv"])
    assert sorted(points.trial.unique()) == sorted(t.number for t in complete)
    info = read_json(files["sweep.json"])
    assert info["search"] == "bayes" and info["trials"] == 5
    assert points[points.value == info["chosen"]].val_all.max() == points.val_all.max()


def test_table1_tuned_uses_the_chosen_values(swept: Path, sweep_root: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    wd = read_json(swept / "sweep-stage1-wd" / "sweep.json")["chosen"]
    tau = read_json(swept / "sweep-tau" / "sweep.json")["chosen"]
    assert main(["table1", "--root", str(sweep_root), "--preset", "smoke", "--out", str(swept), "--device",
                 "cpu", "--quiet", "--no-figures", "--tuned", str(swept / "sweep-stage1-wd"),
                 str(swept / "sweep-tau")]) == 0
    md = (swept / "table1-tuned.md").read_text()
    assert "Tuned on validation" in md and f"stage-1 weight decay: **{wd:g}**" in md
    assert f"tau of tau-norm: **{tau:g}**" in md
    runs = {r["row"]: r["dir"] for r in read_json(swept / "runs-tuned.json")["runs"]}
    wd_name = f"cifar100-if100-resnet8-wd{wd:g}".replace("e-0", "e-")
    assert Path(runs["WD tuned (w/ CE)"]).name.startswith(wd_name + "-")
    assert Path(runs["WD=0 (w/ CE)"]).name.startswith("cifar100-if100-resnet8-wd0-")
    assert Path(runs["+ tau-norm"]).name == f"tau-norm{tau:g}"
    assert not (swept / "table1.md").exists()  # the paper-valued table is a separate file


def test_tuned_refuses_another_preset(swept: Path, sweep_root: Path) -> None:
    with pytest.raises(LtrError, match="--preset smoke"):
        ltr.experiments.tables.run_table(root=sweep_root, out=swept, preset="tiny",
                                         tuned=[swept / "sweep-tau"], **FAST)
