"""The real CIFAR-100 (official pickles): md5, the exact long-tailed splits, and that a run learns.

Marked `real`: they run when LTR_CIFAR100_ARCHIVE (or LTR_CIFAR100_ROOT) points at the data, as
.ci/run does, and are skipped with the reason on a clone without it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ltr.cli import main
from ltr.config import preset_config
from ltr.data import DATASETS, load_cifar_lt, read_class_names, verify
from ltr.train import train_stage1

pytestmark = pytest.mark.real

# SPEC 1.2: totals and Many / Medium / Few classes of CIFAR100-LT.
EXPECTED = {100: (10847, (35, 35, 30)), 50: (12608, (41, 41, 18)), 10: (19573, (69, 31, 0))}


def test_unpacked_files_are_the_official_ones(real_root: Path) -> None:
    checks = verify(real_root, "cifar100")
    assert [Path(c.file).name for c in checks] == ["train", "test", "meta"]
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    assert dict((Path(c.file).name, c.got) for c in checks) == dict(DATASETS["cifar100"].file_md5)


@pytest.mark.parametrize("imbalance", sorted(EXPECTED))
def test_long_tailed_totals_and_groups(real_root: Path, imbalance: int) -> None:
    data = load_cifar_lt(real_root, "cifar100", imbalance)
    info = data.summary()
    total, groups = EXPECTED[imbalance]
    assert info["train"] == total and info["test"] == 10000
    assert (info["groups"]["many"], info["groups"]["medium"], info["groups"]["few"]) == groups
    assert not data.synthetic


def test_head_is_apple_tail_is_worm(real_root: Path) -> None:
    names = read_class_names(real_root, "cifar100")
    data = load_cifar_lt(real_root, "cifar100", 100)
    assert (names[0], data.counts[0]) == ("apple", 500)
    assert (names[99], data.counts[99]) == ("worm", 5)
    # The head keeps its first 500 images in file order: every training image of class 0.
    assert int((data.train_y == 0).sum()) == 500


def test_verify_cli_passes_then_catches_a_flipped_byte(real_root: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "--root", str(real_root), "--verify"]) == 0
    assert capsys.readouterr().out.count(": ok") == 3
    # A copy of the root whose test file has one byte flipped (train and meta linked, not copied).
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "meta"):
        os.symlink(real_root / "cifar-100-python" / name, folder / name)
    raw = bytearray((real_root / "cifar-100-python" / "test").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (folder / "test").write_bytes(bytes(raw))
    assert main(["data", "--root", str(tmp_path), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "test: DIFFERS" in captured.out and "train: ok" in captured.out
    assert "delete" in captured.err and "--download" in captured.err


def test_one_smoke_epoch_learns_above_chance(real_root: Path, tmp_path: Path) -> None:
    cfg = preset_config("stage1", "smoke", epochs=1)
    metrics = train_stage1(cfg, tmp_path / "run", root=real_root, device="cpu", progress=False)
    # Chance is 1% on 100 balanced test classes; one epoch of a ResNet-8 on real images beats it.
    assert metrics["plain"]["all"] > 2.0, metrics["plain"]
    assert metrics["plain"]["many"] > metrics["plain"]["few"]  # the long tail shows already
    assert metrics["synthetic_data"] is False
