# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1 · Feature learning on a long-tailed CIFAR-100 (stage 1)
#
# This notebook follows the first stage of *Long-Tailed Recognition via Weight Balancing*
# (Alshammari, Wang, Ramanan, Kong, CVPR 2022; **WB** below). Real data is rarely balanced: a few
# *head* classes have many images, many *tail* classes have few. A network trained naively on such data
# is good on the head and poor on the tail. WB's first finding: **weight decay**, tuned properly, already
# fixes much of this while the features are learned.
#
# You will
# 1. build the long-tailed training set and see its class counts,
# 2. train two models, a naive one (no weight decay) and one with WB's tuned weight decay,
# 3. compare their per-class accuracy and the norms of their classifier weights, also during training,
# 4. put the results beside WB's Table 1.
#
# Notebook 2 then re-balances the classifier on top of these two models.

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
# ## 1. The long tail
#
# CIFAR-100 has $C = 100$ classes with $n_{max} = 500$ training images each. The long-tailed version
# keeps, for class $i = 0, \dots, C-1$, only the first
#
# $$n_i = \left\lfloor n_{max} \cdot IF^{-i/(C-1)} \right\rfloor$$
#
# images, where the **imbalance factor** $IF = n_{max} / n_{min}$ is the ratio of the largest to the
# smallest class. Counts fall exponentially from class 0 (the head) to class 99 (the tail). The test set
# stays balanced, so every class counts equally in the accuracy.
#
# Classes are reported in three groups by their number of training images: **Many** (more than 100),
# **Medium** (20 to 100) and **Few** (fewer than 20).

# %%
data = ltr.load_cifar_lt(DATA_ROOT, "cifar100", imbalance=100)
info = data.summary()
print(f"{info['train']:,} training images (long-tailed), {info['test']:,} test images (balanced)")
print("classes per group:", info["groups"])
print("images of the first five classes:", data.counts[:5], " of the last five:", data.counts[-5:])

# %%
plots.plot_count_profile((100, 50, 10), n_max=data.counts[0], title="Training images per class" + NOTE)

# %% [markdown]
# ## 2. Two stage-1 models: naive and with weight decay
#
# Both models are a ResNet trained with cross-entropy and SGD on the long-tailed set. They differ only in
# the weight decay $\lambda$, which adds a penalty on the size of all weights:
#
# $$\min_\theta \; \frac{1}{N} \sum_{j=1}^{N} \ell\big(f_\theta(x_j), y_j\big)
# + \frac{\lambda}{2} \lVert \theta \rVert_2^2 .$$
#
# Why this matters for the tail: the classifier computes a logit $z_c = w_c^\top f(x) + b_c$ per class.
# Head classes supply most of the training images, so most gradient steps make their rows $w_c$ longer,
# and a longer $w_c$ means larger logits for that class whatever the image. Weight decay keeps every row
# short, so no class wins by norm alone. WB also find that it gives better features.
#
# WB's naive model uses $\lambda = 0$; their tuned value, chosen on validation data, is
# $\lambda = 5 \cdot 10^{-3}$.

# %%
naive_cfg = ltr.preset_config("stage1", PRESET, wd=0.0)  # WB's naive model: no weight decay
wd_cfg = ltr.preset_config("stage1", PRESET, wd=5e-3)  # WB's tuned weight decay
NAIVE = EXP / "stage1" / run_name(naive_cfg)
WD = EXP / "stage1" / run_name(wd_cfg)
print(wd_cfg)

# %%
ltr.train_stage1(naive_cfg, NAIVE, root=DATA_ROOT)  # trains, or reuses the finished run in NAIVE
plots.results_table({"naive (WD=0)": NAIVE}, tta="flip")

# %%
ltr.train_stage1(wd_cfg, WD, root=DATA_ROOT)
plots.results_table({"WD=5e-3": WD}, tta="flip")

# %% [markdown]
# ## 3. Per-class accuracy
#
# Each bar is the test accuracy of one class, classes sorted from head (left) to tail (right); the dashed
# lines are the group means (the Many / Medium / Few numbers of the tables). Look for the slope from head
# to tail, and for which groups gain when weight decay is added.

# %%
plots.plot_per_class_accuracy(NAIVE, title="naive model (WD=0)" + NOTE)

# %%
plots.plot_per_class_accuracy(WD, title="weight decay 5e-3" + NOTE)

# %% [markdown]
# ## 4. Per-class weight norms (WB Fig. 3)
#
# The norm $\lVert w_c \rVert$ of each row of the last linear layer. Without weight decay, expect the
# head rows to be clearly longer than the tail rows; with weight decay the curve should be lower and
# flatter, that is, more *balanced*.

# %%
plots.plot_weight_norms({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, title="classifier weight norms" + NOTE)

# %%
# The same in numbers: mean norm per group, and how much longer the head rows are than the tail rows.
rows = {}
for label, run in {"naive (WD=0)": NAIVE, "WD=5e-3": WD}.items():
    m = plots.load_run(run)["metrics"]
    norms = pd.Series(m["weight_norms"])
    rows[label] = {g: norms[idx].mean() for g, idx in class_groups(m["counts"]).items() if idx}
norm_table = pd.DataFrame(rows).T
norm_table["head / tail"] = norm_table.iloc[:, 0] / norm_table.iloc[:, -1]
norm_table.round(3)

# %% [markdown]
# ## 5. How the norms evolve during training (WB Fig. 2)
#
# Every epoch the trainer records all $\lVert w_c \rVert$ in `history.csv`. Left: the mean norm of each
# group over the epochs (the band spans the group's smallest to largest norm). Right: every class
# (rows, head at the top) at every epoch (columns). Look for when the groups drift apart, and whether
# weight decay stops the drift.

# %%
plots.plot_norm_evolution(NAIVE, title="naive model (WD=0)" + NOTE)

# %%
plots.plot_norm_evolution(WD, title="weight decay 5e-3" + NOTE)

# %% [markdown]
# ## 6. Results beside the paper
#
# Our columns are the runs above, measured at their **last** epoch on the full balanced test set, with
# flip averaging (the logits of an image and its mirror image averaged, as in WB's official code). The
# `WB` columns are copied from **WB's Table 1** (CIFAR100-LT, IF = 100, ResNet-34, 200 epochs); they are
# the paper's numbers, not ours. `n/a` marks an empty group. Runs with the `smoke` preset, and any run on
# synthetic images, are not comparable to WB's numbers.

# %%
plots.plot_group_accuracy({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, tta="flip", title="stage 1" + NOTE)

# %%
if not COMPARABLE:
    print(f"Our columns come from the {SOURCE}: they are NOT comparable to WB's columns.")
plots.results_table({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, tta="flip", paper=PAPER_TABLE1)

# %% [markdown]
# ## Try it
#
# 1. **Weight decay.** Add a third model with `ltr.preset_config("stage1", PRESET, wd=1e-3)` (or `2e-2`),
#    give it its own directory with `run_name`, and train it. Where do its weight norms and its Few-group
#    accuracy land between the two models above? WB sweep $\lambda \in \{0, 5\cdot10^{-4}, 10^{-3},
#    2\cdot10^{-3}, 5\cdot10^{-3}, 10^{-2}, 2\cdot10^{-2}\}$ (their Fig. 4). Choose with the validation
#    split in `metrics["val"]`, never with the test set.
# 2. **Imbalance factor.** Build `ltr.load_cifar_lt(DATA_ROOT, "cifar100", imbalance=10)` and print its
#    `summary()`. How many Few classes are left? Train both models with `imbalance=10`: does weight decay
#    still help as much when the tail is less extreme? (An empty group shows as `n/a`.)
# 3. **Watching the norms grow.** Compare the two evolution plots. In the naive model, do the head rows
#    keep growing until the end? Train the naive model for more epochs (`epochs=...`) and check whether
#    the gap between Many and Few norms keeps widening.
