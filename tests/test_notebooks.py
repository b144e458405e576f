"""The teaching notebooks: Jupytext pairs in step, stored clean, executed headless top to bottom."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jupytext
import nbformat
import pytest
from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
# Figures each notebook must show (issue 6): notebook 1 = count profile, per-class accuracy x2,
# weight norms, norm evolution x2, group accuracy; notebook 2 = post-hoc norms, norm evolution,
# weight norms and marginal likelihood of every model (Fig. 6), the tau sweep, group accuracy.
MIN_IMAGES = {
    "01_stage1_feature_learning.ipynb": 7,
    "02_stage2_classifier_learning.ipynb": 6,
}
PERCENT = re.compile(r"\d+(\.\d+)?\s*%")


def _load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))


def _source(name: str) -> nbformat.NotebookNode:
    """The reviewed source of a notebook: its Jupytext .py pair, read as a notebook."""
    return jupytext.read(NOTEBOOKS / name.replace(".ipynb", ".py"))


def _nbstripout(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbstripout", *args], capture_output=True, text=True)


def test_every_notebook_is_a_jupytext_pair() -> None:
    assert not (REPO / "scripts" / "make_notebooks.py").exists()  # one source of truth, no generator
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == set(MIN_IMAGES)
    assert {p.name for p in NOTEBOOKS.glob("*.py")} == {n.replace(".ipynb", ".py") for n in MIN_IMAGES}
    config_file = find_jupytext_configuration_file(str(NOTEBOOKS))
    assert config_file is not None and Path(config_file) == REPO / "jupytext.toml"
    config = load_jupytext_configuration_file(config_file)
    for name in MIN_IMAGES:
        assert config.default_formats(str(NOTEBOOKS / name)) == "ipynb,py:percent"


@pytest.mark.parametrize("name", sorted(MIN_IMAGES))
def test_pair_in_sync(name: str) -> None:
    """The .ipynb holds exactly the cells of its .py (edit either, then `make strip` or save in Jupyter)."""
    stored = nbformat.read(NOTEBOOKS / name, as_version=4)
    source = _source(name)
    cells = [(c.cell_type, c.source) for c in stored.cells]
    assert cells == [(c.cell_type, c.source) for c in source.cells], (
        f"{name} and its .py differ: run `make strip` (jupytext --sync) and commit both"
    )
    assert stored.metadata["kernelspec"] == source.metadata["kernelspec"]


@pytest.mark.parametrize("name", sorted(MIN_IMAGES))
def test_stored_without_outputs(name: str) -> None:
    nb = _load(name)
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cells"
    for cell in code:
        assert cell["outputs"] == [], f"{name}: a cell holds outputs; run `make strip`"
        assert cell["execution_count"] is None, f"{name}: a cell holds an execution count"
    assert "widgets" not in nb["metadata"]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    nbformat.validate(nbformat.reads(json.dumps(nb), as_version=4))
    # Byte for byte what nbstripout writes (ids, metadata): the git filter would change nothing.
    check = _nbstripout("--verify", str(NOTEBOOKS / name))
    assert check.returncode == 0, f"{name} is not as nbstripout leaves it; run `make strip`"


@pytest.mark.parametrize("name", sorted(MIN_IMAGES))
def test_markdown_states_no_accuracy(name: str) -> None:
    """Accuracies come from runs (code outputs) or committed references; markdown prose quotes none."""
    for cell in _source(name).cells:
        if cell.cell_type == "markdown":
            text = cell.source
            assert not PERCENT.search(text), f"{name}: markdown states a percentage: {text[:80]!r}"


def test_notebook_setup_cells() -> None:
    for name in MIN_IMAGES:
        code = [c.source for c in _source(name).cells if c.cell_type == "code"]
        assert "REPO_URL" in code[0] and "pip" in code[0]  # hosted Jupyter installs ltr first
        assert 'os.environ.get("LTR_PRESET")' in code[1] and "torch.cuda.is_available()" in code[1]
        assert all(f'"{p}"' in code[1] for p in ("paper", "cpu", "smoke"))  # the presets on offer
        assert "prepare_data" in code[2]


def test_nbstripout_restores_the_stored_file(tmp_path: Path) -> None:
    src = NOTEBOOKS / "01_stage1_feature_learning.ipynb"
    dirty = tmp_path / "dirty.ipynb"
    nb = json.loads(src.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        cell["id"] = f"random-{i}"  # as Jupyter or jupytext write them
        if cell["cell_type"] == "code":
            cell["execution_count"] = 3
            cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
            cell["metadata"]["execution"] = {"iopub.status.busy": "2024-01-01"}
    nb["metadata"]["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    dirty.write_text(json.dumps(nb), encoding="utf-8")
    assert _nbstripout("--verify", str(dirty)).returncode != 0
    assert _nbstripout(str(dirty)).returncode == 0
    assert dirty.read_bytes() == src.read_bytes()  # stripping restores the stored file exactly


# ---------------------------------------------------------------- execution


@contextlib.contextmanager
def _kernel_env(tmp: Path, data_root: Path) -> Iterator[Path]:
    """Environment of the kernel: smoke preset, data_root, runs and cwd in a temporary folder.

    The kernel is this interpreter (sys.executable), whatever kernelspecs the machine has: a
    `python3` kernelspec pointing at it is written to a temporary folder that JUPYTER_PATH puts first.
    """
    spec = tmp / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (ltr tests)",
        "language": "python",
    }))
    work = tmp / "work"
    work.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(tmp / "jupyter"))
        mp.setenv("LTR_PRESET", "smoke")
        mp.setenv("LTR_DATA_ROOT", str(data_root))
        mp.setenv("LTR_EXP", str(tmp / "exp"))
        mp.setenv("PYTHONPATH", str(REPO))  # the checkout under test, installed or not
        yield work


@pytest.fixture(scope="module")
def notebook_env(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kernel environment on synthetic data."""
    with _kernel_env(tmp_path_factory.mktemp("notebooks"), small_root) as work:
        yield work


@pytest.fixture(scope="module")
def real_notebook_env(real_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Kernel environment on the real CIFAR-100 (skipped without it)."""
    with _kernel_env(tmp_path_factory.mktemp("notebooks-real"), real_root) as work:
        yield work


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    )


def _execute(name: str, work: Path) -> tuple[nbformat.NotebookNode, str]:
    """Run a notebook top to bottom in work; the executed copy and all output text."""
    nb = _source(name)  # executed from the reviewed .py; test_pair_in_sync ties the .ipynb to it
    client = NotebookClient(
        nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(work)}}
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    seconds = time.perf_counter() - t0
    nbformat.write(nb, work / f"executed-{name}")  # the executed copy stays in tmp
    print(f"\n{name}: executed in {seconds:.1f} s")
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert _images(nb) >= MIN_IMAGES[name], f"{name}: {_images(nb)} figures, want {MIN_IMAGES[name]}"
    text = "".join(
        o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells for o in c.get("outputs", [])
    )
    # Stored notebooks are untouched by the run.
    assert all(not c.get("outputs") for c in _load(name)["cells"] if c["cell_type"] == "code")
    return nb, text


def _first_output(nb: nbformat.NotebookNode) -> str:
    """The text of the first output of the executed notebook (what the reader sees first)."""
    out = next(o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    return out.get("text", "") + "".join(out.get("data", {}).get("text/plain", ""))


# Notebook 2 reuses the stage-1 runs of notebook 1 (same LTR_EXP); run alone, it trains them itself.
@pytest.mark.parametrize("name", sorted(MIN_IMAGES))
def test_notebook_executes(name: str, notebook_env: Path) -> None:
    nb, text = _execute(name, notebook_env)
    assert "SYNTHETIC images" in _first_output(nb)  # the synthetic data is announced first
    assert "NOT comparable" in text


@pytest.mark.real
@pytest.mark.parametrize("name", sorted(MIN_IMAGES))
def test_notebook_executes_on_real_data(name: str, real_notebook_env: Path) -> None:
    nb, text = _execute(name, real_notebook_env)
    assert "using cifar100 from" in _first_output(nb) and "the real images" in _first_output(nb)
    assert "synthetic" not in text.lower()  # real images: no synthetic label anywhere in the outputs
