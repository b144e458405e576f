"""Write the two teaching notebooks (without outputs) from the cell texts below.

Usage: python scripts/make_notebooks.py [OUT_DIR]   (default: notebooks/ of this checkout)

This script bootstrapped the notebooks; running it again OVERWRITES notebooks/*.ipynb with these
cells. Edit either the cells here (then rerun) or the notebooks in Jupyter (then `make strip`), and
keep the two in step when you change one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat import v4

REPO = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- shared cells

SETUP = '''\
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
print("ltr", ltr.__version__)'''

PRESET = '''\
# PRESET: "paper" = WB's recipe (ResNet-34, 200 epochs; needs a GPU).
#         "smoke" = a tiny ResNet for a few epochs: checks the code on a CPU, teaches nothing about accuracy.
# Override with the environment variable LTR_PRESET, or just edit the line.
import os

import torch

PRESET = os.environ.get("LTR_PRESET") or ("paper" if torch.cuda.is_available() else "smoke")
DATA_ROOT = Path(os.environ.get("LTR_DATA_ROOT", REPO / "data"))  # holds cifar-100-python/
EXP = Path(os.environ.get("LTR_EXP", REPO / "exp"))  # run directories go here
print(f"preset {PRESET!r}, data {DATA_ROOT}, runs under {EXP}")'''

DATA = '''\
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
NOTE = "" if COMPARABLE else f"  [{SOURCE}: not comparable to WB]"'''

HOW_TO_RUN = """\
**How to run.** Top to bottom, one cell at a time. Every run is saved in its own directory under
`EXP` (named after its recipe); running a cell again, or after a kernel restart, reuses the finished
run instead of training again. With the `paper` preset training takes a GPU and a long time (WB's
official code needed about 55 minutes per stage-1 run on one RTX 3090); the `smoke` preset finishes in
minutes on a CPU but its numbers mean nothing, and on synthetic images even less."""

STAGE1_CONFIGS = '''\
naive_cfg = ltr.preset_config("stage1", PRESET, wd=0.0)  # WB's naive model: no weight decay
wd_cfg = ltr.preset_config("stage1", PRESET, wd=5e-3)  # WB's tuned weight decay
NAIVE = EXP / "stage1" / run_name(naive_cfg)
WD = EXP / "stage1" / run_name(wd_cfg)
print(wd_cfg)'''

# ---------------------------------------------------------------- notebook 1

NB1 = [
    ("md", """\
# 1 · Feature learning on a long-tailed CIFAR-100 (stage 1)

This notebook follows the first stage of *Long-Tailed Recognition via Weight Balancing*
(Alshammari, Wang, Ramanan, Kong, CVPR 2022; **WB** below). Real data is rarely balanced: a few
*head* classes have many images, many *tail* classes have few. A network trained naively on such data
is good on the head and poor on the tail. WB's first finding: **weight decay**, tuned properly, already
fixes much of this while the features are learned.

You will
1. build the long-tailed training set and see its class counts,
2. train two models, a naive one (no weight decay) and one with WB's tuned weight decay,
3. compare their per-class accuracy and the norms of their classifier weights, also during training,
4. put the results beside WB's Table 1.

Notebook 2 then re-balances the classifier on top of these two models."""),
    ("md", HOW_TO_RUN),
    ("code", SETUP),
    ("code", PRESET),
    ("code", DATA),
    ("md", r"""
## 1. The long tail

CIFAR-100 has $C = 100$ classes with $n_{max} = 500$ training images each. The long-tailed version
keeps, for class $i = 0, \dots, C-1$, only the first

$$n_i = \left\lfloor n_{max} \cdot IF^{-i/(C-1)} \right\rfloor$$

images, where the **imbalance factor** $IF = n_{max} / n_{min}$ is the ratio of the largest to the
smallest class. Counts fall exponentially from class 0 (the head) to class 99 (the tail). The test set
stays balanced, so every class counts equally in the accuracy.

Classes are reported in three groups by their number of training images: **Many** (more than 100),
**Medium** (20 to 100) and **Few** (fewer than 20)."""),
    ("code", '''\
data = ltr.load_cifar_lt(DATA_ROOT, "cifar100", imbalance=100)
info = data.summary()
print(f"{info['train']:,} training images (long-tailed), {info['test']:,} test images (balanced)")
print("classes per group:", info["groups"])
print("images of the first five classes:", data.counts[:5], " of the last five:", data.counts[-5:])'''),
    ("code", '''\
plots.plot_count_profile((100, 50, 10), n_max=data.counts[0], title="Training images per class" + NOTE)'''),
    ("md", r"""
## 2. Two stage-1 models: naive and with weight decay

Both models are a ResNet trained with cross-entropy and SGD on the long-tailed set. They differ only in
the weight decay $\lambda$, which adds a penalty on the size of all weights:

$$\min_\theta \; \frac{1}{N} \sum_{j=1}^{N} \ell\big(f_\theta(x_j), y_j\big)
+ \frac{\lambda}{2} \lVert \theta \rVert_2^2 .$$

Why this matters for the tail: the classifier computes a logit $z_c = w_c^\top f(x) + b_c$ per class.
Head classes supply most of the training images, so most gradient steps make their rows $w_c$ longer,
and a longer $w_c$ means larger logits for that class whatever the image. Weight decay keeps every row
short, so no class wins by norm alone. WB also find that it gives better features.

WB's naive model uses $\lambda = 0$; their tuned value, chosen on validation data, is
$\lambda = 5 \cdot 10^{-3}$."""),
    ("code", STAGE1_CONFIGS),
    ("code", '''\
ltr.train_stage1(naive_cfg, NAIVE, root=DATA_ROOT)  # trains, or reuses the finished run in NAIVE
plots.results_table({"naive (WD=0)": NAIVE}, tta="flip")'''),
    ("code", '''\
ltr.train_stage1(wd_cfg, WD, root=DATA_ROOT)
plots.results_table({"WD=5e-3": WD}, tta="flip")'''),
    ("md", """\
## 3. Per-class accuracy

Each bar is the test accuracy of one class, classes sorted from head (left) to tail (right); the dashed
lines are the group means (the Many / Medium / Few numbers of the tables). Look for the slope from head
to tail, and for which groups gain when weight decay is added."""),
    ("code", 'plots.plot_per_class_accuracy(NAIVE, title="naive model (WD=0)" + NOTE)'),
    ("code", 'plots.plot_per_class_accuracy(WD, title="weight decay 5e-3" + NOTE)'),
    ("md", r"""
## 4. Per-class weight norms (WB Fig. 3)

The norm $\lVert w_c \rVert$ of each row of the last linear layer. Without weight decay, expect the
head rows to be clearly longer than the tail rows; with weight decay the curve should be lower and
flatter, that is, more *balanced*."""),
    ("code", '''\
plots.plot_weight_norms({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, title="classifier weight norms" + NOTE)'''),
    ("code", '''\
# The same in numbers: mean norm per group, and how much longer the head rows are than the tail rows.
rows = {}
for label, run in {"naive (WD=0)": NAIVE, "WD=5e-3": WD}.items():
    m = plots.load_run(run)["metrics"]
    norms = pd.Series(m["weight_norms"])
    rows[label] = {g: norms[idx].mean() for g, idx in class_groups(m["counts"]).items() if idx}
norm_table = pd.DataFrame(rows).T
norm_table["head / tail"] = norm_table.iloc[:, 0] / norm_table.iloc[:, -1]
norm_table.round(3)'''),
    ("md", r"""
## 5. How the norms evolve during training (WB Fig. 2)

Every epoch the trainer records all $\lVert w_c \rVert$ in `history.csv`. Left: the mean norm of each
group over the epochs (the band spans the group's smallest to largest norm). Right: every class
(rows, head at the top) at every epoch (columns). Look for when the groups drift apart, and whether
weight decay stops the drift."""),
    ("code", 'plots.plot_norm_evolution(NAIVE, title="naive model (WD=0)" + NOTE)'),
    ("code", 'plots.plot_norm_evolution(WD, title="weight decay 5e-3" + NOTE)'),
    ("md", """\
## 6. Results beside the paper

Our columns are the runs above, measured at their **last** epoch on the full balanced test set, with
flip averaging (the logits of an image and its mirror image averaged, as in WB's official code). The
`WB` columns are copied from **WB's Table 1** (CIFAR100-LT, IF = 100, ResNet-34, 200 epochs); they are
the paper's numbers, not ours. `n/a` marks an empty group. Runs with the `smoke` preset, and any run on
synthetic images, are not comparable to WB's numbers."""),
    ("code", '''\
plots.plot_group_accuracy({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, tta="flip", title="stage 1" + NOTE)'''),
    ("code", '''\
if not COMPARABLE:
    print(f"Our columns come from the {SOURCE}: they are NOT comparable to WB's columns.")
plots.results_table({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, tta="flip", paper=PAPER_TABLE1)'''),
    ("md", r"""
## Try it

1. **Weight decay.** Add a third model with `ltr.preset_config("stage1", PRESET, wd=1e-3)` (or `2e-2`),
   give it its own directory with `run_name`, and train it. Where do its weight norms and its Few-group
   accuracy land between the two models above? WB sweep $\lambda \in \{0, 5\cdot10^{-4}, 10^{-3},
   2\cdot10^{-3}, 5\cdot10^{-3}, 10^{-2}, 2\cdot10^{-2}\}$ (their Fig. 4). Choose with the validation
   split in `metrics["val"]`, never with the test set.
2. **Imbalance factor.** Build `ltr.load_cifar_lt(DATA_ROOT, "cifar100", imbalance=10)` and print its
   `summary()`. How many Few classes are left? Train both models with `imbalance=10`: does weight decay
   still help as much when the tail is less extreme? (An empty group shows as `n/a`.)
3. **Watching the norms grow.** Compare the two evolution plots. In the naive model, do the head rows
   keep growing until the end? Train the naive model for more epochs (`epochs=...`) and check whether
   the gap between Many and Few norms keeps widening."""),
]

# ---------------------------------------------------------------- notebook 2

NB2 = [
    ("md", """\
# 2 · Classifier learning: balancing the classifier (stage 2)

Stage 1 (notebook 1) learned the features. WB's second step keeps those features frozen and only
re-balances the last layer, the classifier. Two families of fixes:

- **post-hoc normalisation**, no training: rescale the classifier rows (L2-norm, tau-norm);
- **retraining** the classifier for a few epochs with the **class-balanced (CB) loss**, **weight decay**
  and the **MaxNorm** constraint. WB's best recipe combines all three.

For each model we plot the per-class weight norms and the marginal likelihood (WB Fig. 6), and end with
a summary in the style of WB's Table 1."""),
    ("md", HOW_TO_RUN),
    ("code", SETUP),
    ("code", PRESET),
    ("code", DATA),
    ("md", """\
## 1. The stage-1 models

The same two configs as in notebook 1. Calling `train_stage1` again with the same config finds the
finished run directory and returns it without training; if you skipped notebook 1, it trains them now."""),
    ("code", STAGE1_CONFIGS),
    ("code", '''\
ltr.train_stage1(naive_cfg, NAIVE, root=DATA_ROOT)
ltr.train_stage1(wd_cfg, WD, root=DATA_ROOT)
plots.results_table({"naive (WD=0)": NAIVE, "WD=5e-3": WD}, tta="flip")'''),
    ("code", '''\
def stage2(stage1_run, **recipe):
    """Train (or reuse) one stage-2 model on top of a stage-1 run directory; returns its directory."""
    cfg = ltr.stage2_from(stage1_run, PRESET, **recipe)
    out = EXP / "stage2" / stage1_run.name / stage2_name(cfg)
    ltr.train_stage2(cfg, out, root=DATA_ROOT)
    return out'''),
    ("md", r"""
## 2. Post-hoc normalisation: L2-norm and tau-norm

No training at all: rescale each row $w_c$ of the classifier (the bias is left as it is).

$$\text{tau-norm:}\quad w_c \leftarrow \frac{w_c}{\lVert w_c \rVert^{\tau}}$$

With $\tau = 0$ nothing changes; $\tau = 1$ is **L2-norm**, every row gets length 1, so no class wins by
norm; with $\tau > 1$ the short (tail) rows end up *longer* than the head rows, a deliberate push towards
the tail. WB use $\tau = 1.9$ (the value can be tuned on the validation split)."""),
    ("code", '''\
L2 = stage2(WD, posthoc="l2norm")
TAU = stage2(WD, posthoc="tau-norm", tau=1.9)
NAIVE_TAU = stage2(NAIVE, posthoc="tau-norm", tau=1.9)  # WB's "WD=0 + tau-norm" row
plots.plot_weight_norms({"WD=5e-3 (stage 1)": WD, "+ L2-norm": L2, "+ tau-norm": TAU},
                        title="post-hoc normalisation" + NOTE)'''),
    ("md", r"""
## 3. Retraining the classifier with the class-balanced loss

Now the classifier is trained again (10 epochs in the paper) while the backbone stays frozen, with its
batch-norm statistics fixed. The **class-balanced loss** (Cui et al. 2019) weights each image by its
class: with the *effective number* of images $E_{n} = (1 - \beta^{n}) / (1 - \beta)$,

$$\alpha_c \propto \frac{1 - \beta}{1 - \beta^{n_c}}, \qquad \beta = 0.9999,$$

normalised so that the $C$ weights sum to $C$ ($n_c$ = training images of class $c$). The loss is the
cross-entropy of each image times $\alpha_{y}$ of its label, averaged over the batch: rare classes weigh
more. (We write $\alpha_c$ for these loss weights, to keep $w_c$ for the classifier rows.)"""),
    ("code", '''\
# The class weights for this training set, computed by hand to see them (the trainer has its own).
counts = np.array(plots.load_run(WD)["metrics"]["counts"])  # training images per class
beta = 0.9999
cb = (1 - beta) / (1 - beta**counts)
cb = cb / cb.sum() * len(cb)
print(f"head class: {counts[0]} images -> weight {cb[0]:.2f}")
print(f"tail class: {counts[-1]} images -> weight {cb[-1]:.2f}")
CB = stage2(WD, loss="cb")'''),
    ("md", r"""
## 4. Adding weight decay and MaxNorm

**Weight decay** on the classifier (0.1 in WB's stage 2) keeps pulling all rows shorter. **MaxNorm**
caps them: after every SGD step (projected gradient descent), every row longer than a threshold
$\delta$ is scaled back onto the ball of radius $\delta$,

$$w_c \leftarrow w_c \cdot \min\!\left(1, \frac{\delta}{\lVert w_c \rVert}\right),
\qquad \delta = \min_c \lVert w_c \rVert
+ 0.1 \,\big(\max_c \lVert w_c \rVert - \min_c \lVert w_c \rVert\big),$$

with $\delta$ computed once from the stage-1 classifier. Rows shorter than $\delta$ are left alone.
Weight decay shrinks, MaxNorm caps: together the head rows cannot outgrow the tail rows."""),
    ("code", '''\
CB_WD = stage2(WD, loss="cb", wd=0.1)
CB_WD_MAX = stage2(WD, loss="cb", wd=0.1, maxnorm=0.1)
print("MaxNorm threshold delta:", plots.load_run(CB_WD_MAX)["metrics"]["maxnorm_thresholds"])'''),
    ("md", """\
The norms during retraining, starting (epoch 0) from the stage-1 classifier. Look at the head rows in
the first epoch, and at how close the groups end up."""),
    ("code", 'plots.plot_norm_evolution(CB_WD_MAX, title="CB & WD & MaxNorm retraining" + NOTE)'),
    ("md", r"""
## 5. Weight norms and marginal likelihood of every model (WB Fig. 6)

The **marginal likelihood** of class $c$ is the softmax probability $p(c \mid x)$ averaged over all test
images. The test set is balanced, so an unbiased model puts about $1/C$ on every class (dashed line); a
model biased towards the head puts more mass on the left. Compare each model's two curves: balanced
norms should go with a flatter likelihood."""),
    ("code", '''\
MODELS = {"WD=5e-3 (stage 1)": WD, "+ L2-norm": L2, "+ tau-norm": TAU, "+ CB": CB, "+ CB & WD": CB_WD,
          "+ CB & WD & MaxNorm": CB_WD_MAX}
plots.plot_weight_norms(MODELS, title="classifier weight norms" + NOTE)'''),
    ("code", 'plots.plot_marginal_likelihood(MODELS, title="marginal likelihood on the test set" + NOTE)'),
    ("md", """\
## 6. Summary in the style of WB's Table 1

Our columns: last epoch, full balanced test set, flip averaging. The `WB` columns are **WB's Table 1**
numbers for the row with the same recipe (CIFAR100-LT, IF = 100, ResNet-34), copied from the paper and
not produced here; `-` means WB's table has no such row. Numbers from the `smoke` preset or from
synthetic images are not comparable to WB's."""),
    ("code", '''\
SUMMARY = {"naive (WD=0)": NAIVE, "WD=0 + tau-norm": NAIVE_TAU, **MODELS}
plots.plot_group_accuracy(SUMMARY, tta="flip", title="every model" + NOTE)'''),
    ("code", '''\
if not COMPARABLE:
    print(f"Our columns come from the {SOURCE}: they are NOT comparable to WB's columns.")
plots.results_table(SUMMARY, tta="flip", paper=PAPER_TABLE1)'''),
    ("md", """\
## 7. Optional: WB beside its neighbours (no training here)

`python -m ltr compare --preset PRESET` trains the comparison rows on the same backbone and schedule:
our reading of *To Balance or Not to Balance* (Zhang et al.: a main head on class-balanced batches and an
auxiliary head on instance batches), cRT, LWS, logit adjustment, balanced softmax and LDAM-DRW. This
cell only **reads** the table that command wrote, if it exists; it never trains. The "published" column
holds numbers that papers report for their own recipes; the Zhang et al. row is our reading of an
abstract and has no published number."""),
    ("code", '''\
COMPARE = REPO / "exp" / ("compare" if PRESET == "paper" else f"compare-{PRESET}")
if (COMPARE / "compare.csv").exists():
    if not COMPARABLE:
        print(f"These runs come from the {PRESET} preset: NOT comparable to published numbers.")
    compare = pd.read_csv(COMPARE / "compare.csv")
    display(compare[compare.tta == "flip"].drop(columns="tta"))
else:
    print(f"No comparison table in {COMPARE} yet. From the repository root run:")
    print(f"  python -m ltr compare --preset {PRESET} --root {DATA_ROOT} --seeds 0")'''),
    ("md", r"""
## Try it

1. **Tune tau on validation.** Run `stage2(WD, posthoc="tau-norm", tau=t)` for `t` in
   `(0.5, 1.0, 1.5, 2.0, 2.5)` and read `plots.load_run(run)["metrics"]["val"]["flip"]` of each: the
   validation split is the first 20 test images of each class. Pick $\tau$ there, then report the
   `heldout` numbers of that run. What happens to Many and to Few as $\tau$ grows?
2. **The MaxNorm threshold.** Retrain with `maxnorm=0.05` and `maxnorm=0.5`. How does the threshold
   $\delta$ printed above change, and how do the evolution plot and the Many/Few balance change?
3. **Good features first?** Apply WB's best recipe to the naive backbone:
   `stage2(NAIVE, loss="cb", wd=0.1, maxnorm=0.1)`. Put it in `plots.results_table` beside the same
   recipe on `WD`. Can classifier retraining make up for features learned without weight decay?"""),
]


def build(cells: list[tuple[str, str]], prefix: str) -> nbformat.NotebookNode:
    """A notebook from (kind, source) pairs, with stable cell ids and no outputs."""
    nb = v4.new_notebook()
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    for i, (kind, text) in enumerate(cells):
        cid, source = f"{prefix}-{i:02d}", text.strip("\n")
        cell = v4.new_markdown_cell(source, id=cid) if kind == "md" else v4.new_code_cell(source, id=cid)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def main(argv: list[str]) -> int:
    """Write both notebooks into argv[0] (default notebooks/)."""
    out = Path(argv[0]) if argv else REPO / "notebooks"
    out.mkdir(parents=True, exist_ok=True)
    for name, cells, prefix in (
        ("01_stage1_feature_learning.ipynb", NB1, "s1"),
        ("02_stage2_classifier_learning.ipynb", NB2, "s2"),
    ):
        nbformat.write(build(cells, prefix), out / name)
        print(out / name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
