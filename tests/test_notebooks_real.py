"""Both notebooks executed headless on the real CIFAR-100 (skipped without it).

A module of its own so that, under pytest-xdist's --dist loadfile, this execution and the synthetic one
(test_notebooks.py) run on different workers at the same time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_notebooks import MIN_IMAGES, Executed, _check, _execute_all, _first_output


@pytest.fixture(scope="module")
def executed_real(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Executed]:
    """Both notebooks executed on the real CIFAR-100, notebook 2 reusing notebook 1's runs."""
    return _execute_all(tmp_path_factory.mktemp("notebooks-real"), real_root)


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(MIN_IMAGES))
def test_notebook_executes_on_real_data(name: str, executed_real: dict[str, Executed]) -> None:
    run = executed_real[name]
    _check(name, run)
    first = _first_output(run.nb)
    assert "CIFAR-100 from" in first or ("using cifar100 from" in first and "the real images" in first)
    assert "synthetic" not in run.text.lower()  # real images: no synthetic label anywhere in the outputs
