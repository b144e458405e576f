"""Behaviour pinned across the restructuring: the `tiny` preset's Table 1 (seed 0, synthetic files, one
thread) gives the metrics.json numbers recorded from the code before it (tests/data/tiny_table1_s0.json).

Record again (only when a change of numbers is intended, and say so in the commit):
    python tests/test_pinned_table.py
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import torch

PINNED = Path(__file__).parent / "data" / "tiny_table1_s0.json"
# Numbers that describe the run rather than its result (wall time, versions, paths).
UNPINNED = {"train_seconds", "name", "from_run", "compile_error"}


def _numbers(obj: object, prefix: str = "") -> dict[str, object]:
    """Every leaf of a metrics.json, keyed by its path, times and names left out."""
    if isinstance(obj, dict):
        out: dict[str, object] = {}
        for k, v in obj.items():
            if k not in UNPINNED:
                out.update(_numbers(v, f"{prefix}{k}."))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_numbers(v, f"{prefix}{i}."))
        return out
    return {prefix.rstrip("."): obj}


def tiny_table_numbers(root: Path, out: Path) -> dict[str, dict[str, object]]:
    """Run the tiny preset's Table 1 for seed 0 on one thread; every run's metrics by its path."""
    from ltr.experiments.tables import run_table

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_table(root=root, out=out, seeds=[0], preset="tiny", device="cpu", progress=False, figures=False)
    finally:
        torch.set_num_threads(threads)
    return {str(p.parent.relative_to(out)): _numbers(json.loads(p.read_text()))
            for p in sorted(out.rglob("metrics.json"))}


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    return a == b


def test_tiny_table1_numbers_unchanged(tiny_root: Path, tmp_path: Path) -> None:
    pinned = json.loads(PINNED.read_text())
    got = json.loads(json.dumps(tiny_table_numbers(tiny_root, tmp_path / "t")))  # same JSON round trip
    assert sorted(got) == sorted(pinned)
    for run, numbers in pinned.items():
        assert sorted(got[run]) == sorted(numbers), run
        diff = [k for k in numbers if not _same(got[run][k], numbers[k])]
        assert not diff, f"{run}: {[(k, numbers[k], got[run][k]) for k in diff[:5]]}"


if __name__ == "__main__":
    from ltr.synthetic import write_fake_cifar

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tiny"
        write_fake_cifar(root, "cifar100", train_per_class=100, test_per_class=10)
        numbers = tiny_table_numbers(root, Path(tmp) / "t")
    compact = {"sort_keys": True, "separators": (",", ":")}
    runs = [f"{json.dumps(k)}:{json.dumps(v, **compact)}" for k, v in sorted(numbers.items())]
    PINNED.write_text("{\n" + ",\n".join(runs) + "\n}\n")  # one run a line
    print(f"recorded {len(numbers)} runs into {PINNED}", file=sys.stderr)
