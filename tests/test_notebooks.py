"""The teaching notebooks: Jupytext pairs in step, stored clean, executed headless top to bottom."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from queue import Empty

import jupytext
import nbformat
import pytest
from jupytext.config import find_jupytext_configuration_file, load_jupytext_configuration_file
from nbclient import NotebookClient

from ltr.experiments.tuning import sweep_grid

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
    """One setup call before section 1: the first code cell imports ltr from the checkout and calls
    notebook_tools.setup(); a markdown cell before it says how to install on hosted Jupyter."""
    for name in MIN_IMAGES:
        cells = _source(name).cells
        first = next(i for i, c in enumerate(cells) if c.cell_type == "code")
        code = cells[first].source
        assert "sys.path.insert" in code and "notebook_tools.setup(" in code
        assert len(code.splitlines()) <= 25  # short: section 1 starts on the first screen
        before = " ".join(c.source for c in cells[:first] if c.cell_type == "markdown")
        assert "pip" in before + code and "LTR_RUNS" in before  # hosted Jupyter installs ltr; the two modes


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
    """Environment of the kernel: train mode, smoke preset, data_root, runs and cwd in a temporary folder.

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
        mp.setenv("LTR_RUNS", "train")  # these train (smoke); see test_reference_mode.py
        mp.setenv("LTR_PRESET", "smoke")
        mp.setenv("LTR_DATA_ROOT", str(data_root))
        mp.setenv("LTR_EXP", str(tmp / "exp"))
        mp.setenv("PYTHONPATH", str(REPO))  # the checkout under test, installed or not
        yield work


@dataclass
class Executed:
    """One notebook executed top to bottom: the executed copy, its output text, or the error it raised."""

    nb: nbformat.NotebookNode
    text: str
    seconds: float
    cells: list[tuple[float, str]]  # (seconds, first source line) of every code cell, slowest first
    error: Exception | None
    exp: Path  # LTR_EXP of the kernel: the runs it trained


def _execute_all(tmp: Path, data_root: Path) -> dict[str, Executed]:
    """Both notebooks in order in one kernel environment: notebook 2 reuses the runs of notebook 1."""
    with _kernel_env(tmp, data_root) as work:
        return {name: _execute(name, work) for name in sorted(MIN_IMAGES)}


# Each notebook runs once per data kind (session scope); the tests below read the result. Under
# pytest-xdist (`make test`: --dist loadfile) a module's tests share one worker, so the synthetic
# executions stay here and the real ones in test_notebooks_real.py: the two kinds run in parallel.
@pytest.fixture(scope="session")
def executed(small_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Executed]:
    """Both notebooks executed on the synthetic files."""
    return _execute_all(tmp_path_factory.mktemp("notebooks"), small_root)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum(
        1
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") in ("display_data", "execute_result") and "image/png" in out.get("data", {})
    )


def _cell_seconds(cell: nbformat.NotebookNode) -> float:
    """Wall time of an executed code cell from the timestamps nbclient records."""
    ex = cell.metadata.get("execution", {})
    if "iopub.execute_input" not in ex or "shell.execute_reply" not in ex:
        return 0.0
    start, end = (datetime.fromisoformat(ex[k].replace("Z", "+00:00"))
                  for k in ("iopub.execute_input", "shell.execute_reply"))
    return (end - start).total_seconds()


def _wait_in_slices(channel: object, slice_s: float = 1.0) -> None:
    """Make channel.get_msg wait in slices of at most slice_s seconds, each starting with a fresh poll.

    A message can arrive without waking the asyncio poll (jupyter/nbclient#312): the wait then lasts
    until its timeout, and a cell's reply came 900 s late (the cell timeout) in two of two `make test`
    runs on 2026-12-01. A new poll sees a waiting message at once, so a missed wake-up costs a slice.
    """
    wait = channel.get_msg

    async def get_msg(timeout: float | None = None) -> dict:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = slice_s if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                return await wait(timeout=min(slice_s, left))
            except Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    raise

    channel.get_msg = get_msg


def _execute(name: str, work: Path) -> Executed:
    """Run a notebook top to bottom in work; an error is kept, to fail the tests that read it."""
    nb = _source(name)  # executed from the reviewed .py; test_pair_in_sync ties the .ipynb to it

    def sliced_waits(notebook: nbformat.NotebookNode) -> None:
        _wait_in_slices(client.kc.shell_channel)
        _wait_in_slices(client.kc.iopub_channel)

    client = NotebookClient(
        nb, kernel_name="python3", timeout=900, resources={"metadata": {"path": str(work)}},
        on_notebook_start=sliced_waits,
    )
    t0 = time.perf_counter()
    error = None
    try:
        client.execute()  # raises CellExecutionError, naming the cell, on the first error
    except Exception as e:  # noqa: BLE001 - kept and raised by the tests of this notebook
        error = e
    seconds = time.perf_counter() - t0
    nbformat.write(nb, work / f"executed-{name}")  # the executed copy stays in tmp
    text = "".join(
        o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells for o in c.get("outputs", [])
    )
    cells = sorted(((_cell_seconds(c), c.source.partition("\n")[0]) for c in nb.cells
                    if c.cell_type == "code"), reverse=True)
    return Executed(nb, text, seconds, cells, error, Path(os.environ.get("LTR_EXP", REPO / "exp")))


def test_a_missed_wake_up_costs_one_slice_not_the_cell_timeout() -> None:
    """_wait_in_slices: a message the first poll missed is returned by the next slice; a real timeout
    still raises Empty."""
    import asyncio

    class Channel:
        def __init__(self) -> None:
            self.polls = 0

        async def get_msg(self, timeout: float | None = None) -> dict:
            self.polls += 1
            if self.polls == 1:  # the wake-up is missed: this poll sleeps out its whole timeout
                await asyncio.sleep(timeout)
                raise Empty
            return {"msg": "reply"}

    channel = Channel()
    _wait_in_slices(channel, slice_s=0.05)
    t0 = time.monotonic()
    assert asyncio.run(channel.get_msg(timeout=900)) == {"msg": "reply"}
    assert time.monotonic() - t0 < 1 and channel.polls == 2

    class Silent:
        async def get_msg(self, timeout: float | None = None) -> dict:
            await asyncio.sleep(timeout)
            raise Empty

    silent = Silent()
    _wait_in_slices(silent, slice_s=0.05)
    with pytest.raises(Empty):
        asyncio.run(silent.get_msg(timeout=0.2))


def _check(name: str, run: Executed) -> None:
    """What every execution must show: no error, the figures, stored notebooks untouched."""
    slowest = ", ".join(f"{s:.1f} s {src!r}" for s, src in run.cells[:3])
    print(f"\n{name}: executed in {run.seconds:.1f} s; slowest cells: {slowest}")
    if run.error is not None:
        raise run.error
    errors = [o for c in run.nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert _images(run.nb) >= MIN_IMAGES[name], f"{name}: {_images(run.nb)} figures, want {MIN_IMAGES[name]}"
    # Stored notebooks are untouched by the run.
    assert all(not c.get("outputs") for c in _load(name)["cells"] if c["cell_type"] == "code")


def _first_output(nb: nbformat.NotebookNode) -> str:
    """The text of the first output of the executed notebook (what the reader sees first)."""
    out = next(o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    return out.get("text", "") + "".join(out.get("data", {}).get("text/plain", ""))


@pytest.mark.parametrize("name", sorted(MIN_IMAGES))
def test_notebook_executes(name: str, executed: dict[str, Executed]) -> None:
    run = executed[name]
    _check(name, run)
    assert "SYNTHETIC images" in _first_output(run.nb)  # the synthetic data is announced first
    assert "NOT comparable" in run.text


def test_smoke_sweeps_run_the_preset_grid(executed: dict[str, Executed]) -> None:
    """The smoke preset's sweeps run its own short grids; the weight-decay sweep reuses both models."""
    for name, kind in (("01_stage1_feature_learning.ipynb", "stage1-wd"),
                       ("02_stage2_classifier_learning.ipynb", "tau")):
        _check(name, executed[name])
        grid = sweep_grid(kind, "smoke")
        assert str(grid) in executed[name].text  # the cell prints the grid it sweeps
        (info,) = executed[name].exp.rglob(f"sweep-{kind}/sweep.json")
        assert json.loads(info.read_text())["values"] == list(grid)
    # Notebook 1's naive and tuned models are two of the grid's points: three stage-1 runs in all.
    stage1 = [p for p in executed[name].exp.rglob("stage1/*") if (p / "metrics.json").exists()]
    assert len(stage1) == len(set(sweep_grid("stage1-wd", "smoke"))) == 3
