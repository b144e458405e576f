# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2 · Classifier learning: balancing the classifier (stage 2)
#
# Stage 1 (notebook 1) learned the features. WB's second step keeps those features frozen and only
# re-balances the last layer, the classifier. Two families of fixes:
#
# - **post-hoc normalisation**, no training: rescale the classifier rows (L2-norm, tau-norm);
# - **retraining** the classifier for a few epochs with the **class-balanced (CB) loss**, **weight decay**
#   and the **MaxNorm** constraint. WB's best recipe combines all three.
#
# For each model we plot the per-class weight norms and the marginal likelihood (WB Fig. 6), and end with
# a summary in the style of WB's Table 1.

# %% [markdown]
# **How to run.** Top to bottom, one cell at a time. Every run is saved in its own directory under
# `EXP` (named after its recipe); running a cell again, or after a kernel restart, reuses the finished
# run instead of training again. With the `paper` preset training takes a GPU and a long time (WB's
# official code needed about 55 minutes per stage-1 run on one RTX 3090); the `smoke` preset finishes in
# minutes on a CPU but its numbers mean nothing, and on synthetic images even less.

# %%
# Setup. On hosted Jupyter (Colab and the like) ltr is not installed yet: install it from its repository.
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/OWNER/ltr"  # <-- EDIT ME: the GitHub address of this repository

# Running from a clone (notebooks/ next to ltr/)? Then data/ and exp/ live at the clone's root.
HERE = Path.cwd()
REPO = HERE.parent if HERE.name == "notebooks" and (HERE.parent / "ltr").is_dir() else HERE
try:
    import ltr
except ImportError:
    if (REPO / "ltr" / "__init__.py").is_file():
        sys.path.insert(0, str(REPO))  # a clone without `pip install -e .`
    else:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", f"git+{REPO_URL}"], check=True)
    import ltr
print("ltr", ltr.__version__)

# %%
# PRESET: "paper" = WB's recipe (ResNet-34, 200 epochs; needs a GPU).
#         "smoke" = a tiny ResNet for a few epochs: checks the code on a CPU, teaches nothing about accuracy.
# Override with the environment variable LTR_PRESET, or just edit the line.
import os

import torch

PRESET = os.environ.get("LTR_PRESET") or ("paper" if torch.cuda.is_available() else "smoke")
DATA_ROOT = Path(os.environ.get("LTR_DATA_ROOT", REPO / "data"))  # holds cifar-100-python/
EXP = Path(os.environ.get("LTR_EXP", REPO / "exp"))  # run directories go here
print(f"preset {PRESET!r}, data {DATA_ROOT}, runs under {EXP}")

# %%
# The data: CIFAR-100 from DATA_ROOT. Missing? The paper preset downloads it; the smoke preset writes
# small SYNTHETIC images in the same file layout instead (and says so).
import numpy as np
import pandas as pd

from ltr import plots
from ltr.config import run_name, stage2_name
from ltr.data import class_groups
from ltr.notebook_tools import prepare_data
from ltr.tables import PAPER_TABLE1  # WB's Table 1 numbers, as printed in the paper

DATA_ROOT, SYNTHETIC = prepare_data(DATA_ROOT, PRESET)
if SYNTHETIC:
    EXP = EXP / "synthetic"  # runs on synthetic images never mix with runs on CIFAR-100
COMPARABLE = PRESET == "paper" and not SYNTHETIC
# NOTE goes into figure titles, so that no figure from this run can pass for a paper result.
SOURCE = f"{PRESET} preset" + (" on SYNTHETIC images" if SYNTHETIC else "")
NOTE = "" if COMPARABLE else f"  [{SOURCE}: not comparable to WB]"

# %% [markdown]
# ## 1. The stage-1 models
#
# The same two configs as in notebook 1. Calling `train_stage1` again with the same config finds the
# finished run directory and returns it without training; if you skipped notebook 1, it trains them now.

# %%
naive_cfg = ltr.preset_config("stage1", PRESET, wd=0.0)  # WB's naive model: no weight decay
wd_cfg = ltr.preset_config("stage1", PRESET, wd=5e-3)  # WB's tuned weight decay
NAIVE = EXP / "stage1" / run_name(naive_cfg)
WD = EXP / "stage1" / run_name(wd_cfg)
print(wd_cfg)

# %%
ltr.train_stage1(naive_cfg, NAIVE, root=DATA_ROOT)
ltr.train_stage1(wd_cfg, WD, root=DATA_ROOT)
plots.results_table({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, tta="flip")


# %%
def stage2(stage1_run, **recipe):
    """Train (or reuse) one stage-2 model on top of a stage-1 run directory; returns its directory."""
    cfg = ltr.stage2_from(stage1_run, PRESET, **recipe)
    out = EXP / "stage2" / stage1_run.name / stage2_name(cfg)
    ltr.train_stage2(cfg, out, root=DATA_ROOT)
    return out


# %% [markdown]
# ## 2. Post-hoc normalisation: L2-norm and tau-norm
#
# No training at all: rescale each row $w_c$ of the classifier (the bias is left as it is).
#
# $$\text{tau-norm:}\quad w_c \leftarrow \frac{w_c}{\lVert w_c \rVert^{\tau}}$$
#
# With $\tau = 0$ nothing changes; $\tau = 1$ is **L2-norm**, every row gets length 1, so no class wins by
# norm; with $\tau > 1$ the short (tail) rows end up *longer* than the head rows, a deliberate push towards
# the tail. WB use $\tau = 1.9$ (the value can be tuned on the validation split).

# %%
L2 = stage2(WD, posthoc="l2norm")
TAU = stage2(WD, posthoc="tau-norm", tau=1.9)
NAIVE_TAU = stage2(NAIVE, posthoc="tau-norm", tau=1.9)  # WB's "WD=0 + tau-norm" row
plots.plot_weight_norms({"WD=5e-3 (stage 1)": WD, "+ L2-norm": L2, "+ tau-norm": TAU},
                        title="post-hoc normalisation" + NOTE)

# %% [markdown]
# ## 3. Retraining the classifier with the class-balanced loss
#
# Now the classifier is trained again (10 epochs in the paper) while the backbone stays frozen, with its
# batch-norm statistics fixed. The **class-balanced loss** (Cui et al. 2019) weights each image by its
# class: with the *effective number* of images $E_{n} = (1 - \beta^{n}) / (1 - \beta)$,
#
# $$\alpha_c \propto \frac{1 - \beta}{1 - \beta^{n_c}}, \qquad \beta = 0.9999,$$
#
# normalised so that the $C$ weights sum to $C$ ($n_c$ = training images of class $c$). The loss is the
# cross-entropy of each image times $\alpha_{y}$ of its label, averaged over the batch: rare classes weigh
# more. (We write $\alpha_c$ for these loss weights, to keep $w_c$ for the classifier rows.)

# %%
# The class weights for this training set, computed by hand to see them (the trainer has its own).
counts = np.array(plots.load_run(WD)["metrics"]["counts"])  # training images per class
beta = 0.9999
cb = (1 - beta) / (1 - beta**counts)
cb = cb / cb.sum() * len(cb)
print(f"head class: {counts[0]} images -> weight {cb[0]:.2f}")
print(f"tail class: {counts[-1]} images -> weight {cb[-1]:.2f}")
CB = stage2(WD, loss="cb")

# %% [markdown]
# ## 4. Adding weight decay and MaxNorm
#
# **Weight decay** on the classifier (0.1 in WB's stage 2) keeps pulling all rows shorter. **MaxNorm**
# caps them: after every SGD step (projected gradient descent), every row longer than a threshold
# $\delta$ is scaled back onto the ball of radius $\delta$,
#
# $$w_c \leftarrow w_c \cdot \min\!\left(1, \frac{\delta}{\lVert w_c \rVert}\right),
# \qquad \delta = \min_c \lVert w_c \rVert
# + 0.1 \,\big(\max_c \lVert w_c \rVert - \min_c \lVert w_c \rVert\big),$$
#
# with $\delta$ computed once from the stage-1 classifier. Rows shorter than $\delta$ are left alone.
# Weight decay shrinks, MaxNorm caps: together the head rows cannot outgrow the tail rows.

# %%
CB_WD = stage2(WD, loss="cb", wd=0.1)
CB_WD_MAX = stage2(WD, loss="cb", wd=0.1, maxnorm=0.1)
print("MaxNorm threshold delta:", plots.load_run(CB_WD_MAX)["metrics"]["maxnorm_thresholds"])

# %% [markdown]
# The norms during retraining, starting (epoch 0) from the stage-1 classifier. Look at the head rows in
# the first epoch, and at how close the groups end up.

# %%
plots.plot_norm_evolution(CB_WD_MAX, title="CB & WD & MaxNorm retraining" + NOTE)

# %% [markdown]
# ## 5. Weight norms and marginal likelihood of every model (WB Fig. 6)
#
# The **marginal likelihood** of class $c$ is the softmax probability $p(c \mid x)$ averaged over all test
# images. The test set is balanced, so an unbiased model puts about $1/C$ on every class (dashed line); a
# model biased towards the head puts more mass on the left. Compare each model's two curves: balanced
# norms should go with a flatter likelihood.

# %%
MODELS = {"WD=5e-3 (stage 1)": WD, "+ L2-norm": L2, "+ tau-norm": TAU, "+ CB": CB, "+ CB & WD": CB_WD,
          "+ CB & WD & MaxNorm": CB_WD_MAX}
plots.plot_weight_norms(MODELS, title="classifier weight norms" + NOTE)

# %%
plots.plot_marginal_likelihood(MODELS, title="marginal likelihood on the test set" + NOTE)

# %% [markdown]
# ## 6. Summary in the style of WB's Table 1
#
# Our columns: last epoch, full balanced test set, flip averaging. The `WB` columns are **WB's Table 1**
# numbers for the row with the same recipe (CIFAR100-LT, IF = 100, ResNet-34), copied from the paper and
# not produced here; `-` means WB's table has no such row. Numbers from the `smoke` preset or from
# synthetic images are not comparable to WB's.

# %%
SUMMARY = {"naive (WD=0)": NAIVE, "WD=0 + tau-norm": NAIVE_TAU, **MODELS}
plots.plot_group_accuracy(SUMMARY, tta="flip", title="every model" + NOTE)

# %%
if not COMPARABLE:
    print(f"Our columns come from the {SOURCE}: they are NOT comparable to WB's columns.")
plots.results_table(SUMMARY, tta="flip", paper=PAPER_TABLE1)

# %% [markdown]
# ## 7. Optional: WB beside its neighbours (no training here)
#
# `python -m ltr compare --preset PRESET` trains the comparison rows on the same backbone and schedule:
# our reading of *To Balance or Not to Balance* (Zhang et al.: a main head on class-balanced batches and an
# auxiliary head on instance batches), cRT, LWS, logit adjustment, balanced softmax and LDAM-DRW. This
# cell only **reads** the table that command wrote, if it exists; it never trains. The "published" column
# holds numbers that papers report for their own recipes; the Zhang et al. row is our reading of an
# abstract and has no published number.

# %%
COMPARE = REPO / "exp" / ("compare" if PRESET == "paper" else f"compare-{PRESET}")
if (COMPARE / "compare.csv").exists():
    if not COMPARABLE:
        print(f"These runs come from the {PRESET} preset: NOT comparable to published numbers.")
    compare = pd.read_csv(COMPARE / "compare.csv")
    display(compare[compare.tta == "flip"].drop(columns="tta"))
else:
    print(f"No comparison table in {COMPARE} yet. From the repository root run:")
    print(f"  python -m ltr compare --preset {PRESET} --root {DATA_ROOT} --seeds 0")

# %% [markdown]
# ## Try it
#
# 1. **Tune tau on validation.** Run `stage2(WD, posthoc="tau-norm", tau=t)` for `t` in
#    `(0.5, 1.0, 1.5, 2.0, 2.5)` and read `plots.load_run(run)["metrics"]["val"]["flip"]` of each: the
#    validation split is the first 20 test images of each class. Pick $\tau$ there, then report the
#    `heldout` numbers of that run. What happens to Many and to Few as $\tau$ grows?
# 2. **The MaxNorm threshold.** Retrain with `maxnorm=0.05` and `maxnorm=0.5`. How does the threshold
#    $\delta$ printed above change, and how do the evolution plot and the Many/Few balance change?
# 3. **Good features first?** Apply WB's best recipe to the naive backbone:
#    `stage2(NAIVE, loss="cb", wd=0.1, maxnorm=0.1)`. Put it in `plots.results_table` beside the same
#    recipe on `WD`. Can classifier retraining make up for features learned without weight decay?
