"""The Table 1 runner: all rows with mean ± std, the paper column, figures, no redo, resume after a kill."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ltr.cli import main
from ltr.data import LtrError
from ltr.engine.rundir import read_json
from ltr.experiments.report import PAPER_TABLE1, best_test_cells, best_test_epoch, fmt_best
from ltr.experiments.tables import TABLE1_ROWS, plan, run_table

FAST = dict(preset="smoke", device="cpu", progress=False)


def _mtimes(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in out.rglob("ckpt.pt")}


@pytest.fixture(scope="module")
def table(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("table") / "t"
    assert main(["table1", "--root", str(tiny_root), "--preset", "smoke", "--seeds", "0", "1",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


def test_plan_shares_stage1_runs(tmp_path: Path) -> None:
    runs, where = plan(TABLE1_ROWS, tmp_path, "smoke", [100.0], [0, 1])
    stage1 = [r for r in runs if r.stage == "stage1"]
    assert len(stage1) == 4  # naive and tuned WD, two seeds
    assert len(runs) == 2 * 13  # 13 rows, two seeds: 2 stage-1 models and 11 stage-2 runs each
    assert runs.index(stage1[-1]) < min(runs.index(r) for r in runs if r.stage == "stage2")
    assert where["WD tuned (w/ CE)", 100.0, 1] == stage1[-1].out or where["WD tuned (w/ CE)", 100.0, 1] in {
        r.out for r in stage1}


def test_all_rows_with_mean_std_paper_and_figures(table: Path) -> None:
    df = pd.read_csv(table / "table1.csv")
    flip = df[df.tta == "flip"]
    assert list(flip.row) == [r.name for r in TABLE1_ROWS]
    assert set(df.tta) == {"plain", "flip"}
    assert (flip.seeds == 2).all() and flip.all_std.notna().all()
    assert flip.set_index("row").all_paper.to_dict() == {k: v[3] for k, v in PAPER_TABLE1.items()}
    assert flip.many_mean.isna().all()  # 100 images a class: no class has > 100, so Many is n/a
    md = (table / "table1.md").read_text()
    assert "flip-averaged" in md and " ± " in md and "n/a" in md and "not the paper's recipe" in md
    assert md.startswith("**These runs used SYNTHETIC images")
    for name in PAPER_TABLE1:
        assert f"| {name} |" in md
    assert "| + CB | WB's loss |" in md  # the preset's class-balanced loss is WB's, and says so
    figs = sorted(p.name for p in (table / "figures").glob("*.png"))
    for f in ("weight_norms.png", "marginal_likelihood.png", "group_accuracy.png",
              "norm_evolution_naive.png", "norm_evolution_wd.png", "per_class_accuracy_wd.png"):
        assert f in figs and (table / "figures" / f).stat().st_size > 1000


def test_rerun_does_no_training(table: Path, tiny_root: Path) -> None:
    before = _mtimes(table)
    run_table(root=tiny_root, out=table, seeds=[0, 1], figures=False, **FAST)
    assert _mtimes(table) == before and len(before) == 26


def test_kill_midway_then_resume(tiny_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "ltr", "table1", "--root", str(tiny_root), "--preset", "tiny",
           "--seeds", "0", "--out", str(out), "--device", "cpu", "--quiet", "--no-figures"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("stage1/*/ckpt.pt")):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    assert not (out / "table1.md").exists()
    run_table(root=tiny_root, out=out, seeds=[0], figures=False, **{**FAST, "preset": "tiny"})
    ours = pd.read_csv(out / "table1.csv")
    assert ours.all_n.eq(1).all() and len(ours) == 2 * 13
    # The resumed runs equal uninterrupted ones (same config, CPU determinism).
    clean = tmp_path / "clean"
    run_table(root=tiny_root, out=clean, seeds=[0], figures=False, **{**FAST, "preset": "tiny"})
    pd.testing.assert_frame_equal(ours, pd.read_csv(clean / "table1.csv"))


def test_bad_table_input(tiny_root: Path, tmp_path: Path, table: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(LtrError, match="twice"):
        run_table(root=tiny_root, out=tmp_path / "d", seeds=[0, 0], **FAST)
    with pytest.raises(LtrError, match="kept apart"):
        run_table(root=tiny_root, out=table, seeds=[0], preset="paper", device="cpu", allow_cpu=True,
                  progress=False)
    with pytest.raises(LtrError, match="--download"):
        run_table(root=tmp_path / "empty", out=tmp_path / "e", seeds=[0], **FAST)
    assert not (tmp_path / "e").exists()
    assert main(["table1", "--root", str(tiny_root), "--preset", "paper", "--device", "cpu",
                 "--out", str(tmp_path / "p")]) == 2
    assert "--preset smoke" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "p")


def test_best_test_epoch_column_is_wbs_figure(table: Path) -> None:
    """The official protocol's figure: flip accuracy at the best plain test epoch of each run, optimistic."""
    df = pd.read_csv(table / "table1.csv")
    runs = read_json(table / "runs.json")["runs"]
    for row in ("WD tuned (w/ CE)", "+ CB & WD & Max"):
        dirs = [Path(r["dir"]) for r in runs if r["row"] == row]
        hists = [pd.read_csv(d / "history.csv") for d in dirs]
        best = [h.test_acc_flip[h.test_acc.idxmax()] for h in hists]
        rec = df[(df.row == row) & (df.tta == "flip")].iloc[0]
        assert rec.best_test_all_mean == pytest.approx(sum(best) / len(best))
        assert rec.best_test_all_n == 2 and rec.best_test_tta == "flip"
    tau = df[(df.row == "+ tau-norm") & (df.tta == "flip")].iloc[0]
    assert pd.isna(tau.best_test_all_mean)  # post-hoc: no epochs of its own
    md = (table / "table1.md").read_text()
    assert "best test epoch (optimistic)" in md and "flatters" in md
    assert "| + tau-norm |" in md and md.split("| + tau-norm |")[1].split("\n")[0].rstrip().endswith("| – |")


def test_best_test_epoch_of_an_old_history_falls_back_to_plain(tmp_path: Path) -> None:
    new, old = tmp_path / "new", tmp_path / "old"
    for d in (new, old):
        d.mkdir()
    (new / "history.csv").write_text("epoch,test_acc,test_acc_flip\n1,30,31\n2,,\n3,35,34.5\n4,35,36\n")
    (old / "history.csv").write_text("epoch,test_acc\n1,30\n2,35\n")
    assert best_test_epoch(new) == (35.0, 34.5)  # the first epoch with the best plain accuracy
    assert best_test_epoch(old) == (35.0, None)
    assert best_test_cells([(35.0, 34.5), (33.0, 32.0)]) == ([34.5, 32.0], "flip")
    # One old history among the seeds: every seed falls back to plain, and the cell says so.
    assert best_test_cells([(35.0, 34.5), (35.0, None), None]) == ([35.0, 35.0, None], "plain")
    rec = pd.Series({"best_test_all_mean": 35.0, "best_test_all_std": float("nan"), "seeds": 1,
                     "best_test_tta": "plain"})
    assert fmt_best(rec) == "35.00 (plain)"


def test_cb_variant_both_gives_every_cb_row_twice(tiny_root: Path, tmp_path: Path) -> None:
    """`table1 --preset tiny --cb-variant both`: every CB row with each loss, stage 1 shared."""
    out = tmp_path / "both"
    assert main(["table1", "--root", str(tiny_root), "--preset", "tiny", "--cb-variant", "both",
                 "--seeds", "0", "--out", str(out), "--device", "cpu", "--quiet", "--no-figures"]) == 0
    df = pd.read_csv(out / "table1.csv")
    flip = df[df.tta == "flip"].fillna({"cb_loss": ""})
    cb_rows = [r.name for r in TABLE1_ROWS if r.stage2.get("loss") == "cb"]
    assert len(cb_rows) == 6 and len(flip) == len(TABLE1_ROWS) + len(cb_rows)
    for name in cb_rows:
        wb = flip[flip.row == name].iloc[0]
        ce = flip[flip.row == f"{name} (weighted CE)"].iloc[0]
        assert (wb.cb_loss, ce.cb_loss) == ("WB's loss", "weighted CE")
        assert wb.all_paper == ce.all_paper == PAPER_TABLE1[name][3]
        assert wb.seeds == ce.seeds == 1
    assert (flip[~flip.row.isin(cb_rows) & ~flip.row.str.endswith("(weighted CE)")].cb_loss == "").all()
    assert len(list((out / "stage1").iterdir())) == 2  # the naive and the tuned-weight-decay model, shared
    s2 = sorted(p.name for p in (out / "stage2").glob("*/*cb-*"))
    assert len(s2) == 12 and sum("cb-official" in n for n in s2) == 6
    md = (out / "table1.md").read_text()
    assert "| + CB | WB's loss |" in md and "| + CB (weighted CE) | weighted CE |" in md
    # Stage 2 at WB's fidelity: the same stage-1 models, its own runs and table.
    stage1 = {p: p.stat().st_mtime_ns for p in out.glob("stage1/*/ckpt.pt")}
    run_table(root=tiny_root, out=out, seeds=[0], figures=False, fidelity="official",
              **{**FAST, "preset": "tiny"})
    assert {p: p.stat().st_mtime_ns for p in out.glob("stage1/*/ckpt.pt")} == stage1
    off = pd.read_csv(out / "table1-official.csv")
    assert off[off.tta == "flip"].seeds.eq(1).all()
    assert "fidelity official" in (out / "table1-official.md").read_text()
    trained = [p.name for p in out.glob("stage2/*/*fidelity-official*")]
    assert len(trained) == 8  # every trained stage-2 row; post-hoc rows have no schedule
