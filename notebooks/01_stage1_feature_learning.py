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
# 2. train two models, a naive one (no weight decay) and one with a tuned weight decay,
# 3. compare their per-class accuracy and the norms of their classifier weights, also during training,
# 4. put the results beside a committed reference run and beside WB's Table 1,
# 5. look inside the features for why weight decay helps, or why it does not.
#
# Notebook 2 then re-balances the classifier on top of these two models.

# %% [markdown]
# **How to run.** Top to bottom, one cell at a time. Every run is saved in its own directory under
# `EXP` (named after its recipe); running a cell again, or after a kernel restart, reuses the finished
# run instead of training again.
#
# **Setup.** In a clone of the repository the first cell imports `ltr` from the clone. On hosted
# Jupyter (Colab and the like) it clones the repository next to the notebook (into `ltr-repo/`) and
# installs it, so that the data folder and the committed reference runs are there too: put the
# repository's address in `REPO_URL` first.

# %%
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/OWNER/ltr"  # <-- EDIT ME: the GitHub address of this repository

HERE = Path.cwd()
REPO = next((p for p in (HERE.parent, HERE, HERE / "ltr-repo") if (p / "ltr" / "__init__.py").is_file()), None)
spec = importlib.util.find_spec("ltr") if REPO is None else None
if spec is not None and (Path(spec.origin).parents[1] / "pyproject.toml").is_file():
    REPO = Path(spec.origin).parents[1]  # ltr installed from (or on the path of) a checkout
if REPO is None:
    REPO = HERE / "ltr-repo"
    subprocess.run(["git", "clone", "--quiet", "--depth", "1", REPO_URL, str(REPO)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", str(REPO)], check=True)
sys.path.insert(0, str(REPO))
import ltr

# %% [markdown]
# **Choose a preset.** A preset is a recipe at a given scale; all three train on the real CIFAR-100.
#
# - `paper`: WB's recipe (ResNet-34, 200 epochs). It needs a GPU.
# - `cpu`: WB's recipe cut to fit a lab session on a 2-core CPU with no GPU. It keeps the data, the
#   augmentation, the batch size, SGD with momentum, the cosine schedule, weight decay on every
#   parameter, and all of stage 2. It changes the backbone (a ResNet-8), trains fewer epochs at a
#   higher learning rate, and uses its own weight decay, tuned on the validation split for that schedule
#   as WB tuned theirs. The table two cells down lists every field it changes, and how long its training
#   took when measured.
# - `smoke`: a few epochs, to check that everything runs; its numbers teach nothing.
#
# Without a GPU the cell picks `cpu`. Set the environment variable `LTR_PRESET`, or edit the line.
#
# `PRECISION` is the arithmetic of training: `auto` takes bfloat16 on GPUs that have it (A100, H100,
# RTX 30xx and later), float16 with gradient scaling on older ones (a hosted T4, a V100), and float32 on
# a CPU. Each run records the one it used in its `config.json`.

# %%
import os

import torch

PRESET = os.environ.get("LTR_PRESET") or ("paper" if torch.cuda.is_available() else "cpu")  # or "smoke"
PRECISION = os.environ.get("LTR_PRECISION", "auto")  # auto | bf16 | fp16 | fp32
DATA_ROOT = Path(os.environ.get("LTR_DATA_ROOT", REPO / "data"))
EXP = Path(os.environ.get("LTR_EXP", REPO / "exp"))
REFERENCE = REPO / "exp" / "reference" / "cpu"

# %% [markdown]
# **The data.** CIFAR-100 from `DATA_ROOT` (the folder `cifar-100-python/`), downloaded there once if
# it is missing. Only when there is neither the data nor a network does the cell write small
# *synthetic* images in the same file layout instead, and then it says so in its output, in every
# figure title and beside every table.

# %%
import numpy as np
import pandas as pd

from ltr import notebook_tools

from ltr import plots
from ltr.config import run_name
from ltr.data import class_groups
from ltr.notebook_tools import prepare_data
from ltr.experiments.tables import PAPER_TABLE1

DATA_ROOT, SYNTHETIC = prepare_data(DATA_ROOT, PRESET)
if SYNTHETIC:
    EXP = EXP / "synthetic"  # runs on synthetic images never mix with runs on CIFAR-100
COMPARABLE = PRESET == "paper" and not SYNTHETIC
SOURCE = f"{PRESET} preset" + (" on SYNTHETIC images" if SYNTHETIC else "")
NOTE = "" if COMPARABLE else f"  [{SOURCE}: not comparable to WB]"
print(f"ltr {ltr.__version__}, preset {PRESET!r}, runs under {EXP}")

# %% [markdown]
# What the preset changes in WB's recipe (nothing for `paper`), and how long this notebook's training
# took in the committed reference run of the `cpu` preset (`exp/reference/cpu`, measured on a 2-core
# CPU): this notebook trains exactly its two stage-1 runs.
# The README's Notebooks section gives the measured wall time of the whole notebook with this preset.

# %%
CHANGES = notebook_tools.preset_changes(PRESET)
display(CHANGES if len(CHANGES) else f"preset {PRESET!r} is WB's recipe, unchanged")
notebook_tools.reference_timing(REFERENCE, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"], PRESET);

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
print("first five classes:", data.class_names[:5], " last five:", data.class_names[-5:])

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
# $\lambda = 5 \cdot 10^{-3}$. Weight decay acts together with the learning rate (every step shrinks
# the weights by their product), so each preset carries its own value, tuned on the validation split for
# its schedule; the cell prints the one in use. At the `cpu` preset's small scale the tuned value is
# small: watch whether it still balances the norms, and whether that still helps the tail.

# %%
naive_cfg = ltr.preset_config("stage1", PRESET, wd=0.0)
wd_cfg = ltr.preset_config("stage1", PRESET)
NAIVE, WD = EXP / "stage1" / run_name(naive_cfg), EXP / "stage1" / run_name(wd_cfg)
N_LABEL, WD_LABEL = "naive (WD=0)", f"WD={wd_cfg.wd:g}"
print(wd_cfg)

# %%
ltr.train_stage1(naive_cfg, NAIVE, root=DATA_ROOT, precision=PRECISION)
plots.results_table({N_LABEL: NAIVE}, tta="flip")

# %%
ltr.train_stage1(wd_cfg, WD, root=DATA_ROOT, precision=PRECISION)
plots.results_table({WD_LABEL: WD}, tta="flip")

# %% [markdown]
# ## 3. Per-class accuracy
#
# Each bar is the test accuracy of one class, classes sorted from head (left) to tail (right); the dashed
# lines are the group means (the Many / Medium / Few numbers of the tables). Look for the slope from head
# to tail: the naive model should be strong on the left and fall to near nothing on the right. Then look
# at which groups gain, or lose, when weight decay is added: all of them, mostly the head, or the tail?

# %%
plots.plot_per_class_accuracy(NAIVE, title=N_LABEL + NOTE)

# %%
plots.plot_per_class_accuracy(WD, title=WD_LABEL + NOTE)

# %% [markdown]
# ## 4. Per-class weight norms (WB Fig. 3)
#
# The norm $\lVert w_c \rVert$ of each row of the last linear layer. In WB's Fig. 3 the head rows of
# the naive model are clearly longer than the tail rows, and with weight decay the curve is lower and
# flatter, that is, more *balanced*. Check whether your two models show both. The table after the
# figure gives the same in numbers: the mean norm of each group, and how much longer the head rows are
# than the tail rows.

# %%
plots.plot_weight_norms({N_LABEL: NAIVE, WD_LABEL: WD}, title="classifier weight norms" + NOTE)

# %%
rows = {}
for label, run in {N_LABEL: NAIVE, WD_LABEL: WD}.items():
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
plots.plot_norm_evolution(NAIVE, title=N_LABEL + NOTE)

# %%
plots.plot_norm_evolution(WD, title=WD_LABEL + NOTE)

# %% [markdown]
# ## 6. Results beside a reference run and beside the paper
#
# Our columns are the runs above, measured at their **last** epoch on the full balanced test set, with
# flip averaging (the logits of an image and its mirror image averaged, as in WB's official code). The
# `WB` columns are copied from **WB's Table 1** (CIFAR100-LT, IF = 100, ResNet-34, 200 epochs); they are
# the paper's numbers, not ours. `n/a` marks an empty group. Only the `paper` preset is comparable to
# them; for the others, compare the shape: which groups gain, and by roughly how much.

# %%
plots.plot_group_accuracy({N_LABEL: NAIVE, WD_LABEL: WD}, tta="flip", title="stage 1" + NOTE)

# %%
if not COMPARABLE:
    print(f"Our columns come from the {SOURCE}: they are NOT comparable to WB's columns.")
plots.results_table({N_LABEL: NAIVE, WD_LABEL: WD}, tta="flip", paper=PAPER_TABLE1)

# %% [markdown]
# **The committed reference.** `exp/reference/cpu` holds the Table 1 of the `cpu` preset on the real
# CIFAR-100, made with this code over three seeds (the run directories without checkpoints,
# `table1.csv`, and a README naming the machine). With the `cpu` preset your two rows above should land
# close to its two rows below. The line after the table reads, from the same file, how much weight decay
# moves each group in that run and in WB's table. Look at Few: does weight decay help the tail at this
# scale too, and by about as much as in the paper? `exp/reference/cpu/README.md` goes through WB's
# claims one by one for this recipe, with the weight-decay study behind the preset's value.

# %%
notebook_tools.show_reference(REFERENCE, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"],
                              changes=[("WD=0 (w/ CE)", "WD tuned (w/ CE)")])

# %%
# The paper-scale reference (WB's recipe on a GPU, `exp/reference/<gpu>-paper/`) when one is committed:
# its two stage-1 rows beside WB's and their per-class weight norms, drawn from its run directories.
notebook_tools.show_paper_reference(REPO, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"], figure="weight_norms")

# %% [markdown]
# ## 7. Why weight decay helps (or does not)
#
# WB show *that* weight decay helps; Hasegawa & Sato ("Exploring Weight Balancing on Long-Tailed
# Recognition Problem", ICLR 2024) look at *why*, in the features $f(x)$ that the classifier reads (the
# pooled output of the last ReLU). Two measurements, both recorded by every stage-1 run:
#
# - the **Fisher discriminant ratio** $\mathrm{FDR} = \mathrm{Tr}(S_W^{-1} S_B)$, with $S_B$ the spread of
#   the class means around the overall mean (weighted by class size) and $S_W$ the spread of the features
#   around their own class mean. High FDR: classes lie far apart compared with how scattered each class
#   is, so a linear classifier separates them easily ($S_W^{-1}$ is a pseudo-inverse where $S_W$ is
#   singular, e.g. for a feature unit that is always zero). The trainer records it on the test features at
#   every evaluated epoch, and on the test and training features at the end;
# - the **cone effect**: the mean cosine similarity of two feature vectors. ReLU features are never
#   negative, so they all live in one orthant and tend to point the same way. A high cosine between
#   features of *different* classes means the classes crowd into a narrow cone; a low one means they
#   spread out.
#
# Their finding for WB's recipe: weight decay raises the FDR and weakens the cone effect, that is,
# weight decay mainly buys better features, not only balanced classifier norms. The figure shows both
# for your two models: FDR over the epochs (left), FDR at the end on test and training features
# (middle), the cone effect at the end (right); the table below it gives the same numbers.

# %%
notebook_tools.show_feature_analysis({N_LABEL: NAIVE, WD_LABEL: WD}, "your runs" + NOTE);

# %% [markdown]
# The same for the committed references: the `cpu` one (the two stage-1 models of its first seed) and,
# when one is committed, a paper-scale one (`exp/reference/*-paper/`). A reference made before ltr
# recorded these measurements says so instead of drawing.
#
# **Connect the figures to the accuracy tables.** In section 6 and in the reference table, did weight
# decay raise All, and Few? Here, did it raise the FDR and lower the different-class cosine? If weight
# decay helps accuracy, the features should show why; if it does not help at this scale, check whether
# its features are no better either, and whether training features and test features tell the same
# story (a model that fits its training set well can still have poorly separated test features).

# %%
notebook_tools.show_reference_features(REFERENCE, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"],
                                       "committed reference, cpu preset");

# %%
PAPER_REFERENCE = notebook_tools.paper_reference_said(REPO)
notebook_tools.show_reference_features(PAPER_REFERENCE, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"],
                                       "committed reference, paper preset");

# %% [markdown]
# ## 8. Choosing the weight decay on validation (WB Fig. 4) · the long cell
#
# Where does a value like $5 \cdot 10^{-3}$ come from? WB tune $\lambda$ and plot accuracy against it
# (their Fig. 4). Tuning must not look at the test set: a value picked for its test accuracy flatters
# that accuracy. `ltr.run_sweep` trains one stage-1 model per value of the preset's grid, **chooses on
# the validation split** (the first 20 test images of each class) and **reports on the held-out split**
# (the other 80), for the chosen value and for WB's. With `paper` and `cpu` the grid is WB's,
# $\lambda \in \{0, 5\cdot10^{-4}, 10^{-3}, 2\cdot10^{-3}, 5\cdot10^{-3}, 10^{-2}, 2\cdot10^{-2}\}$; `smoke`
# sweeps three of its values, WB's among them (the cell prints the grid in use). The two models above
# are two of its points and are reused, not retrained.
#
# **This is the long cell.** With `cpu` it trains five more stage-1 models, about 50 minutes on a
# 2-core CPU (the committed reference sweep's runs took about 10 minutes each; the README's Notebooks
# section has the measurements); with `smoke` it trains one. Pass `values=[0, 5e-4, 2e-3]` for a
# shorter sweep, or skip the cell and read the committed one of the `cpu` preset in the cell after it.
#
# In the figure, solid lines are validation, dashed lines held-out. Look at where All peaks, at what
# happens to Few on each side of the peak, and at whether the two splits agree on the shape.

# %%
print("weight decays of this preset's grid:", ltr.sweep_grid("stage1-wd", PRESET))
WD_SWEEP = ltr.run_sweep("stage1-wd", root=DATA_ROOT, out=EXP, preset=PRESET, precision=PRECISION)
notebook_tools.show_sweep(WD_SWEEP["sweep.json"].parent, "your sweep" + NOTE);

# %% [markdown]
# The committed sweep of the `cpu` preset on the real CIFAR-100 (`exp/reference/cpu/sweep-stage1-wd`,
# one seed). Its README says what it shows. Is the validation optimum near WB's value at this scale, and
# how much held-out accuracy separates the chosen value from WB's?

# %%
notebook_tools.show_sweep(REFERENCE / "sweep-stage1-wd", "committed reference, cpu preset");

# %% [markdown]
# ## Try it
#
# 1. **Weight decay, searched.** `ltr.run_sweep("stage1-wd", search="bayes", trials=8, ...)` lets
#    Optuna pick the values to try (needs `pip install optuna`). Does it land where the grid did? Add
#    `seeds=[0, 1]`: does the choice stay put when the seed changes, and by how much do two seeds of the
#    same value differ?
# 2. **Imbalance factor.** Build `ltr.load_cifar_lt(DATA_ROOT, "cifar100", imbalance=10)` and print its
#    `summary()`. How many Few classes are left? Train both models with `imbalance=10`: does weight decay
#    still help as much when the tail is less extreme? (An empty group shows as `n/a`.)
# 3. **Watching the norms grow.** Compare the two evolution plots. In the naive model, do the head rows
#    keep growing until the end? Train the naive model for more epochs (`epochs=...`) and check whether
#    the gap between Many and Few norms keeps widening.
