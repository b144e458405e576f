"""A plan's runs in N worker processes: stage 2 after its stage 1, one bar, first error stops all.

A run is a pure function of its config, so where it trains does not change what it writes: `--jobs 2`
gives the same run directories as `--jobs 1`. Workers are started with 'spawn' (a fresh interpreter;
CUDA cannot be forked) and each loads the data once. With several visible GPUs every worker sees only
its own (CUDA_VISIBLE_DEVICES, set before CUDA starts in it); with one GPU they share it, which pays off
because a ResNet-34 step at batch 64 leaves most of a large GPU idle.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import LtrError, TimeLimitReached

POLL_SECONDS = 0.5  # how often the parent checks that its workers are alive while it waits


def check_jobs(jobs: int) -> int:
    """The number of worker processes, or an LtrError."""
    if not isinstance(jobs, int) or jobs < 1:
        raise LtrError(f"--jobs must be a whole number >= 1 (runs trained at once), got {jobs!r}")
    return jobs


def gpu_slots(device: torch.device, jobs: int) -> list[str | None]:
    """CUDA_VISIBLE_DEVICES of each worker: its own GPU when several are visible, None (share) otherwise."""
    if device.type != "cuda" or device.index is not None or jobs < 2:
        return [None] * jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = ([v.strip() for v in visible.split(",") if v.strip()] if visible is not None
           else [str(i) for i in range(torch.cuda.device_count())])
    return [None] * jobs if len(ids) < 2 else [ids[i % len(ids)] for i in range(jobs)]


def worker_threads() -> int:
    """CPU threads per worker: as many as the parent uses. On a CPU the bits of a result depend on the
    thread count (oneDNN splits its reductions by thread), so a worker with a share of the threads would
    not reproduce one process's run; N workers share the cores (set OMP_WAIT_POLICY=PASSIVE: idlers sleep)."""
    return torch.get_num_threads()


def stage_kwargs(stage: str, common: dict) -> dict:
    """The keyword arguments of one run: a plan compiles stage 1 only (a stage-2 run trains for minutes at
    most on a frozen backbone: compiling it, once per run, would cost more than it saves)."""
    return common if stage == "stage1" else {**common, "compile": False}


def _worker(slot: str | None, threads: int, tasks: Any, results: Any, root: str, dataset: str,
            common: dict) -> None:
    """A worker's loop: take (index, stage, config, out, imbalance), train it, report (index, error)."""
    if slot is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot  # before anything touches CUDA in this process
    torch.set_num_threads(threads)
    from ..data import load_cifar_lt
    from ..train import train_stage1, train_stage2

    data: dict[float, Any] = {}
    while True:
        task = tasks.get()
        if task is None:
            return
        index, stage, config, out, imbalance = task
        try:
            if imbalance not in data:
                data[imbalance] = load_cifar_lt(root, dataset, imbalance)
            train = train_stage1 if stage == "stage1" else train_stage2
            train(config, out, data=data[imbalance], progress=False, **stage_kwargs(stage, common))
        except TimeLimitReached as exc:  # stopped cleanly: this worker can take the next task (and stop it)
            results.put((index, ("deadline", str(exc), "")))
            continue
        except BaseException as exc:  # reported to the parent, which stops everything and raises it
            kind = "ltr" if isinstance(exc, LtrError) else "other"
            results.put((index, (kind, str(exc), traceback.format_exc())))
            return
        results.put((index, None))


def run_parallel(runs: Sequence[Any], jobs: int, device: torch.device, root: str | os.PathLike,
                 dataset: str, common: dict, bar: Any) -> None:
    """Train runs (objects with stage, config, out, imbalance) in `jobs` worker processes; a stage-2 run only
    once its stage-1 run (config.from_run) has finished; bar (tqdm) advances once per finished run.

    The first run that fails stops the others (their checkpoints are kept, so a rerun resumes them) and its
    error is raised here: an LtrError with the worker's message, anything else as a RuntimeError with the
    worker's traceback. Past the time limit (engine.checkpoint.deadline) no run is handed out, the running
    ones stop at their next epoch boundary with a checkpoint, and TimeLimitReached is raised once all have.
    """
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    index_of = {Path(r.out): i for i, r in enumerate(runs)}
    needs = {i: (index_of.get(Path(r.config.from_run)) if r.stage == "stage2" else None)
             for i, r in enumerate(runs)}
    workers = [ctx.Process(target=_worker, daemon=True,
                           args=(slot, worker_threads(), tasks, results, str(root), dataset, common))
               for slot in gpu_slots(device, jobs)]
    for w in workers:
        w.start()
    waiting, running, done = list(range(len(runs))), set(), set()
    failed = True
    cut: str | None = None  # the first time-limit message
    try:
        while len(done) < len(runs):
            if cut is not None and not running:
                failed = False  # every worker is idle: a clean stop
                raise TimeLimitReached(f"{cut} ({len(done)} of {len(runs)} runs finished)")
            for i in [i for i in waiting if cut is None and (needs[i] is None or needs[i] in done)]:
                tasks.put((i, runs[i].stage, runs[i].config, Path(runs[i].out), runs[i].imbalance))
                waiting.remove(i)
                running.add(i)
            bar.set_postfix_str(", ".join(sorted(Path(runs[i].out).name for i in running))[:120])
            try:
                index, error = results.get(timeout=POLL_SECONDS)
            except queue.Empty:
                dead = [w for w in workers if w.exitcode is not None]
                if dead:
                    training = ", ".join(str(runs[i].out) for i in sorted(running))
                    raise LtrError(f"a worker process died (exit code {dead[0].exitcode}) while training "
                                   f"{training}; out of memory? Rerun with fewer --jobs: finished runs are "
                                   "kept and unfinished ones resume") from None
                continue
            running.discard(index)
            if error is not None:
                kind, message, trace = error
                run = runs[index]
                if kind == "deadline":
                    cut = cut or message
                    continue
                if kind == "ltr":
                    raise LtrError(f"{message} [{run.stage} run {run.out}]")
                raise RuntimeError(f"the {run.stage} run {run.out} failed in a worker process:\n{trace}")
            done.add(index)
            bar.update(1)
        failed = False
    finally:
        for _ in workers:
            tasks.put(None)
        for w in workers:
            if failed:
                w.terminate()  # checkpoints are atomic and a dead owner's lock is taken over: reruns resume
            w.join(timeout=30 if failed else 300)
            if w.is_alive():  # idle by now (every run reported): never wait on a stuck exit
                w.kill()
                w.join()
        tasks.cancel_join_thread()
        tasks.close()
        results.close()
