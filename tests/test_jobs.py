"""--jobs: a plan's runs in worker processes give the table of one process; the first error stops all."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from ltr.cli import main
from ltr.data import LtrError
from ltr.experiments.jobs import check_jobs, gpu_slots
from ltr.experiments.tables import TABLE1_ROWS, Row, run_table

# A stage-1 row and two stage-2 rows on it that may run at once: post-hoc (computes and caches the
# stage-1 model's test features) and trained (reads or writes the same cache).
ROWS = tuple(r for r in TABLE1_ROWS if r.name in ("WD tuned (w/ CE)", "+ tau-norm", "+ CB & WD & Max"))
FAST = dict(preset="tiny", seeds=[0], device="cpu", progress=False, figures=False)


def test_two_jobs_give_the_table_of_one(tiny_root: Path, tmp_path: Path) -> None:
    run_table(ROWS, root=tiny_root, out=tmp_path / "one", jobs=1, **FAST)
    run_table(ROWS, root=tiny_root, out=tmp_path / "two", jobs=2, **FAST)
    one, two = (pd.read_csv(tmp_path / d / "table1.csv") for d in ("one", "two"))
    assert len(one) == 2 * len(ROWS) and one.all_n.eq(1).all()
    pd.testing.assert_frame_equal(one, two)
    for ckpt in (tmp_path / "one").rglob("ckpt.pt"):
        a = torch.load(ckpt, weights_only=True)["model"]
        b = torch.load(tmp_path / "two" / ckpt.relative_to(tmp_path / "one"), weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), ckpt
    assert not list((tmp_path / "two").rglob(".lock"))


def test_failing_run_stops_the_rest_with_its_error(tiny_root: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    # A recipe that plans fine and fails only when its stage-2 run validates, inside a worker.
    bad = (Row("WD tuned (w/ CE)", "wd"), Row("bad MaxNorm", "wd", {"maxnorm": 5.0}))
    with pytest.raises(LtrError, match=r"--maxnorm must be in \(0, 1\].*stage2 run"):
        run_table(bad, root=tiny_root, out=tmp_path / "bad", jobs=2, **FAST)
    assert not (tmp_path / "bad" / "table1.csv").exists()


def test_jobs_flag_bad_input(tiny_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["table1", "--root", str(tiny_root), "--preset", "tiny", "--device", "cpu", "--jobs", "0",
                 "--out", str(tmp_path / "z")]) == 2
    assert "--jobs must be" in capsys.readouterr().err
    with pytest.raises(LtrError, match="--jobs"):
        check_jobs(-1)


def test_each_worker_gets_its_own_gpu_when_several_are_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    assert gpu_slots(torch.device("cpu"), 3) == [None, None, None]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert gpu_slots(cuda, 3) == ["4", "6", "4"]
    assert gpu_slots(torch.device("cuda", 1), 2) == [None, None]  # a named device: all share it
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert gpu_slots(cuda, 2) == [None, None]  # one GPU: they share it
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu_slots(cuda, 2) == ["0", "1"]


def test_a_plan_compiles_stage1_only() -> None:
    from ltr.experiments.jobs import stage_kwargs

    common = {"compile": True, "compile_mode": "reduce-overhead", "precision": "auto"}
    assert stage_kwargs("stage1", common)["compile"] is True
    assert stage_kwargs("stage2", common) == {**common, "compile": False}
