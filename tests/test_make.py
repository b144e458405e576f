"""`make` picks any Python 3.10-3.13 (scripts/find-python), says which, and says what to do without one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIND = REPO / "scripts" / "find-python"


def _fake(bin_dir: Path, name: str, version: str | None) -> None:
    """A fake interpreter that reports version (as the probe prints it), or fails like a pyenv shim."""
    body = f'echo "{version} /opt/{name}"' if version else f'echo "pyenv: {name}: not found" >&2; exit 127'
    (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
    (bin_dir / name).chmod(0o755)


def _find(bin_dir: Path, *names: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin"}
    return subprocess.run(["/bin/sh", str(FIND), *names], capture_output=True, text=True, env=env)


def test_default_order_takes_the_first_that_fits(tmp_path: Path) -> None:
    # python3 too old, python3.13 a shim of an unselected version: python3.12 is next in line.
    for name, version in (("python3", "3.9"), ("python3.13", None), ("python3.12", "3.12"),
                          ("python3.11", "3.11"), ("python3.10", "3.10")):
        _fake(tmp_path, name, version)
    done = _find(tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "python3.12"
    assert "using python3.12 (Python 3.12, /opt/python3.12)" in done.stderr
    _fake(tmp_path, "python3", "3.13")
    assert _find(tmp_path).stdout.strip() == "python3"  # python3 first when it fits


def test_none_fits_says_what_each_was_and_what_to_do(tmp_path: Path) -> None:
    _fake(tmp_path, "python3", "3.14")
    _fake(tmp_path, "python3.9", "3.9")
    done = _find(tmp_path, "python3", "python3.9", "no-such-python")
    assert done.returncode == 1 and done.stdout == ""
    assert "no Python 3.10-3.13 found" in done.stderr
    assert "python3: Python 3.14, outside 3.10-3.13" in done.stderr
    assert "python3.9: Python 3.9, outside" in done.stderr
    assert "no-such-python: not found, or it does not run" in done.stderr
    assert "PYTHON=" in done.stderr  # how to name one


def test_makefile_uses_it() -> None:
    make = (REPO / "Makefile").read_text()
    assert "scripts/find-python $(PYTHON)" in make and "python3.11" not in make
