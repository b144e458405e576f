"""Build the notebooks' committed reference runs (exp/reference/cpu/notebooks) from finished runs.

    python scripts/notebook_reference.py stage1 RUN_DIR...   # copy stage-1 runs in, weights only
    LTR_RUNS=train LTR_PRESET=cpu LTR_EXP=exp/reference/cpu/notebooks \
        jupyter execute --timeout=-1 notebooks/02_stage2_classifier_learning.ipynb
    python scripts/notebook_reference.py prune               # keep what reference mode reads

A committed run keeps config.json, history.csv, metrics.json and the smallest checkpoint that its readers
need: a stage-1 run its model weights (what load_stage1 reads), a trained stage-2 run its classifier
(what the logit-rescaling cell reads), a post-hoc run none (recomputed from stage 1 in no time).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "exp" / "reference" / "cpu" / "notebooks"
RUN_FILES = ("config.json", "history.csv", "metrics.json", "ckpt.pt")
WD, NAIVE = "cifar100-if100-resnet8-wd0.0005-e70-s0", "cifar100-if100-resnet8-wd0-e70-s0"
# The stage-2 runs notebook 2 reads in reference mode: (stage-1 run, stage-2 run) -> trained?
STAGE2 = {(WD, "l2norm"): False, (WD, "tau-norm1.9"): False, (NAIVE, "tau-norm1.9"): False,
          (WD, "cb-official-e10-s0"): True, (WD, "cb-official-wd0.1-e10-s0"): True,
          (WD, "cb-official-wd0.1-max0.1-e10-s0"): True}


def copy_stage1(runs: list[Path]) -> None:
    """Copy finished stage-1 runs into OUT/stage1 with a weights-only checkpoint."""
    for run in runs:
        if not (run / "metrics.json").is_file():
            sys.exit(f"{run} is not a finished run (no metrics.json)")
        dest = OUT / "stage1" / run.name
        dest.mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES[:3]:
            shutil.copy2(run / name, dest / name)
        ckpt = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
        # Weights and the epoch only: no optimizer momentum, sampler state or history (half the bytes).
        torch.save({"model": ckpt["model"], "epoch": ckpt["epoch"]}, dest / "ckpt.pt")
        print(f"{dest.relative_to(REPO)}: {(dest / 'ckpt.pt').stat().st_size:,} bytes of weights")


def prune() -> None:
    """Keep only the stage-2 runs and files reference mode reads; paths inside them relative to the repo."""
    for run in sorted((OUT / "stage2").glob("*/*")):
        key = (run.parent.name, run.name)
        if key not in STAGE2:
            shutil.rmtree(run)
            continue
        for f in run.iterdir():
            if f.name not in RUN_FILES:
                f.unlink()
        ckpt = run / "ckpt.pt"
        if STAGE2[key]:
            state = torch.load(ckpt, map_location="cpu", weights_only=True)["model"]
            torch.save({"model": {k: state[k].clone() for k in ("fc.weight", "fc.bias")}}, ckpt)
        else:
            ckpt.unlink(missing_ok=True)
        for name in ("config.json", "metrics.json"):  # a clone elsewhere finds stage 1 from its own root
            info = json.loads((run / name).read_text())
            for holder in (info, info.get("config", {})):
                if "from_run" in holder:
                    holder["from_run"] = str(Path(holder["from_run"]).resolve().relative_to(REPO))
            (run / name).write_text(json.dumps(info, indent=2) + "\n")
    missing = [k for k in STAGE2 if not (OUT / "stage2" / k[0] / k[1] / "metrics.json").is_file()]
    if missing:
        sys.exit(f"missing stage-2 runs: {missing}; run notebook 2 in train mode first (see the docstring)")
    shutil.rmtree(OUT / "sweep-tau", ignore_errors=True)
    for f in [*OUT.rglob("test_features.pt"), *OUT.rglob(".lock")]:
        f.unlink()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "stage1":
        copy_stage1([Path(p) for p in sys.argv[2:]])
    elif sys.argv[1:] == ["prune"]:
        prune()
    else:
        sys.exit(__doc__)
