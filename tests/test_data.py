"""The data layer: files, the long-tailed set, splits, groups, device batches, bad input."""

from __future__ import annotations

import hashlib
import json
import pickle
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ltr import data as D
from ltr.cli import main
from ltr.engine import cifar_files as F
from ltr.synthetic import write_fake_cifar

TOTALS = {
    ("cifar100", 100): 10847, ("cifar100", 50): 12608, ("cifar100", 10): 19573,
    ("cifar10", 100): 12406, ("cifar10", 50): 13996, ("cifar10", 10): 20431,
}


@pytest.mark.parametrize(("dataset", "imbalance"), list(TOTALS))
def test_count_profile_totals(dataset: str, imbalance: int) -> None:
    n_max = 500 if dataset == "cifar100" else 5000
    counts = D.long_tail_counts(n_max, D.DATASETS[dataset].num_classes, imbalance)
    assert sum(counts) == TOTALS[dataset, imbalance]
    assert counts[0] == n_max and counts == sorted(counts, reverse=True)


GROUPS = [(100, (35, 35, 30)), (50, (41, 41, 18)), (10, (69, 31, 0))]


@pytest.mark.parametrize(("imbalance", "groups"), GROUPS)
def test_group_sizes(imbalance: int, groups: tuple[int, int, int]) -> None:
    g = D.class_groups(D.long_tail_counts(500, 100, imbalance))
    assert (len(g["many"]), len(g["medium"]), len(g["few"])) == groups


@pytest.mark.parametrize(("dataset", "imbalance"), list(TOTALS))
def test_cli_data_json_full_size(full_root: Path, capsys: pytest.CaptureFixture, dataset: str,
                                 imbalance: int) -> None:
    assert main(["data", "--root", str(full_root), "--dataset", dataset,
                 "--imbalance", str(imbalance), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"dataset", "imbalance", "classes", "train", "test", "groups", "counts"} <= set(info)
    assert info["train"] == TOTALS[dataset, imbalance] == sum(info["counts"])
    assert info["test"] == 10000
    if (dataset, imbalance) == ("cifar100", 100):
        assert info["groups"] == {"many": 35, "medium": 35, "few": 30}


def test_cli_data_human(small_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "--root", str(small_root)]) == 0
    out = capsys.readouterr().out
    assert "groups: many" in out and "images per class" in out


def test_first_images_in_file_order(small_root: Path) -> None:
    x, y = D.read_split(small_root, "cifar100", "train")
    lt = D.load_cifar_lt(small_root, "cifar100", 100)
    for c in (0, 50, 99):
        first = np.flatnonzero(y == c)[: lt.counts[c]]
        got = lt.train_x[lt.train_y == c]
        np.testing.assert_array_equal(got, x[first])


def test_pixel_layout_is_rgb_planes(tmp_path: Path) -> None:
    folder = write_fake_cifar(tmp_path, "cifar10", train_per_class=1, test_per_class=1)
    row = np.arange(3072, dtype=np.int64) % 251
    obj = {b"data": row.astype(np.uint8)[None].repeat(10, 0), b"labels": list(range(10))}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(obj, f, protocol=2)
    x, _ = D.read_split(tmp_path, "cifar10", "test")
    assert x.shape == (10, 3, 32, 32)
    assert x[0, 1, 0, 0] == 1024 % 251 and x[0, 2, 1, 3] == (2048 + 32 + 3) % 251


def test_validation_and_heldout_split(small_root: Path) -> None:
    lt = D.load_cifar_lt(small_root, "cifar100", 100)
    assert not set(lt.val_idx) & set(lt.heldout_idx)
    assert len(lt.val_idx) + len(lt.heldout_idx) == len(lt.test_y)
    assert (np.bincount(lt.test_y[lt.val_idx], minlength=100) == 20).all()
    first = np.flatnonzero(lt.test_y == 7)[:20]
    assert set(first) <= set(lt.val_idx)


def _windows(img: torch.Tensor, pad: int = 4) -> list[torch.Tensor]:
    p = torch.nn.functional.pad(img, (pad, pad, pad, pad))
    out = []
    for oy in range(2 * pad + 1):
        for ox in range(2 * pad + 1):
            w = p[:, oy : oy + 32, ox : ox + 32]
            out += [w, torch.flip(w, dims=[2])]
    return out


def test_augment_only_crops_and_flips() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (24, 3, 32, 32), dtype=torch.uint8, generator=g)
    aug = D.augment(x, torch.Generator().manual_seed(1))
    assert aug.shape == x.shape and aug.dtype == torch.uint8
    flips = 0
    for i in range(len(x)):
        matches = [k for k, w in enumerate(_windows(x[i])) if torch.equal(w, aug[i])]
        assert matches, f"image {i} is not a window of the padded image or its mirror"
        flips += matches[0] % 2
    assert 0 < flips < len(x)


def _batches(loader: D.DeviceLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def test_loader_determinism_and_epoch_cover() -> None:
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8)
    y = torch.arange(100) % 10
    a = _batches(D.DeviceLoader(x, y, 16, seed=3))
    b = _batches(D.DeviceLoader(x, y, 16, seed=3))
    c = _batches(D.DeviceLoader(x, y, 16, seed=4))
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))
    assert len(a) == 7 and sum(len(batch[1]) for batch in a) == 100
    assert sorted(torch.cat([batch[1] for batch in a]).tolist()) == sorted(y.tolist())
    test = D.DeviceLoader(x, y, 40, train=False)
    assert torch.equal(torch.cat([b[1] for b in test]), y)


def test_balanced_sampler_class_frequencies() -> None:
    counts = D.long_tail_counts(400, 10, 100)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    x = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    loader = D.DeviceLoader(x, y, 64, seed=0, sampling="balanced", num_classes=10)
    drawn = torch.cat([loader.y[loader.epoch_indices()] for _ in range(20)])
    freq = torch.bincount(drawn, minlength=10).float() / len(drawn)
    assert torch.allclose(freq, torch.full((10,), 0.1), atol=0.01)
    inst = torch.bincount(loader.y[D.DeviceLoader(x, y, 64, seed=0).epoch_indices()], minlength=10)
    assert inst.tolist() == counts
    idx = loader.epoch_indices()
    tail = idx[loader.y[idx] == 9]
    assert len(set(tail.tolist())) == counts[9]  # every tail image is drawn, none from elsewhere


# ---------------------------------------------------------------- bad input


def test_missing_dataset_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(D.DataError) as err:
        D.load_cifar_lt(tmp_path / "nowhere")
    msg = str(err.value)
    assert "nowhere" in msg and D.DATASETS["cifar100"].url in msg
    assert D.DATASETS["cifar100"].md5 in msg and "--download" in msg
    assert main(["data", "--root", str(tmp_path / "nowhere")]) == 2
    assert "--download" in capsys.readouterr().err


def _archive(tmp_path: Path, dataset: str) -> Path:
    src = tmp_path / "src"
    folder = write_fake_cifar(src, dataset, train_per_class=2, test_per_class=1)
    path = tmp_path / "archive.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return path


def _small_info(tmp_path: Path, archive: Path, **fields: object) -> D.DatasetInfo:
    """cifar10's info for the small archive: its md5 and the md5 of the files it packs."""
    src = tmp_path / "src" / D.DATASETS["cifar10"].folder
    names = [n for n, _ in D.DATASETS["cifar10"].file_md5]
    files = tuple((n, hashlib.md5((src / n).read_bytes()).hexdigest()) for n in names)
    return replace(D.DATASETS["cifar10"], url=archive.as_uri(),
                   md5=hashlib.md5(archive.read_bytes()).hexdigest(), file_md5=files, **fields)


def test_download_checks_md5_and_unpacks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _archive(tmp_path, "cifar10")
    info = _small_info(tmp_path, archive)
    monkeypatch.setitem(D.DATASETS, "cifar10", info)
    root = tmp_path / "root"
    folder = F.download(root, "cifar10")
    assert folder == root / info.folder and (folder / "test_batch").is_file()
    assert all(c.ok for c in D.verify(root, "cifar10"))
    assert F.download(root, "cifar10") == folder  # present: skipped
    assert not [p for p in root.iterdir() if p.name.startswith(".") or p.suffix == ".part"]


def test_download_verifies_unpacked_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The archive's md5 matches, but a file inside it is not the official one: nothing is kept.
    archive = _archive(tmp_path, "cifar10")
    info = _small_info(tmp_path, archive)
    files = dict(info.file_md5)
    files["test_batch"] = "0" * 32
    monkeypatch.setitem(D.DATASETS, "cifar10", replace(info, file_md5=tuple(files.items())))
    root = tmp_path / "root"
    with pytest.raises(D.DataError, match="test_batch") as err:
        F.download(root, "cifar10")
    assert "--download" in str(err.value)
    assert list(root.iterdir()) == []


def test_verify_cli_names_the_file_that_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    archive = _archive(tmp_path, "cifar10")
    info = _small_info(tmp_path, archive)
    monkeypatch.setitem(D.DATASETS, "cifar10", info)
    root = tmp_path / "root"
    F.download(root, "cifar10")
    assert main(["data", "--root", str(root), "--dataset", "cifar10", "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == 7 and "data_batch_5" in out and "batches.meta" in out
    batch = root / info.folder / "data_batch_2"
    raw = bytearray(batch.read_bytes())
    raw[-1] ^= 1  # one flipped bit
    batch.write_bytes(bytes(raw))
    assert main(["data", "--root", str(root), "--dataset", "cifar10", "--verify"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count(": ok") == 6
    assert "data_batch_2" in captured.err and "--download" in captured.err and "delete" in captured.err
    (root / info.folder / "test_batch").unlink()
    assert main(["data", "--root", str(root), "--dataset", "cifar10", "--verify"]) == 2
    assert "missing" in capsys.readouterr().out
    assert main(["data", "--root", str(tmp_path / "nowhere"), "--verify"]) == 2


def test_download_bad_md5_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _archive(tmp_path, "cifar10")
    info = replace(D.DATASETS["cifar10"], url=archive.as_uri(), md5="0" * 32)
    monkeypatch.setitem(D.DATASETS, "cifar10", info)
    root = tmp_path / "root"
    with pytest.raises(D.DataError, match="md5"):
        F.download(root, "cifar10")
    assert list(root.iterdir()) == []


def _broken(tmp_path: Path, content: bytes) -> Path:
    folder = write_fake_cifar(tmp_path, "cifar10", train_per_class=2, test_per_class=1)
    (folder / "data_batch_3").write_bytes(content)
    return tmp_path


class _Evil:
    def __reduce__(self) -> tuple:
        return (print, ("pwned",))


@pytest.mark.parametrize(
    "content",
    [
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]})[:40],
        pickle.dumps(_Evil()),
        pickle.dumps([1, 2, 3]),
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
        pickle.dumps({b"nothing": 1}),
    ],
    ids=["truncated", "foreign-object", "not-a-dict", "wrong-row-length", "missing-keys"],
)
def test_broken_files(tmp_path: Path, content: bytes, capsys: pytest.CaptureFixture) -> None:
    root = _broken(tmp_path, content)
    with pytest.raises(D.DataError, match="data_batch_3"):
        D.read_split(root, "cifar10", "train")
    assert main(["data", "--root", str(root), "--dataset", "cifar10"]) == 2
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["abc", "0.5", "-3", "nan"])
def test_bad_imbalance(small_root: Path, bad: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(D.DataError, match="imbalance"):
        D.check_imbalance(bad)
    assert main(["data", "--root", str(small_root), "--imbalance", bad]) == 2
    assert "imbalance factor" in capsys.readouterr().err


def test_unknown_dataset(small_root: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["data", "--root", str(small_root), "--dataset", "imagenet"]) == 2
    assert "cifar100" in capsys.readouterr().err


def test_imbalance_too_large_for_data(small_root: Path) -> None:
    with pytest.raises(D.DataError, match="no image"):
        D.load_cifar_lt(small_root, "cifar100", 1000)


def test_synthetic_flag(small_root: Path) -> None:
    lt = D.load_cifar_lt(small_root, "cifar10", 10)
    assert lt.synthetic
    lt.class_names = ["airplane"] + lt.class_names[1:]
    assert not lt.synthetic
