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
# 2. train (or load) two models, a naive one (no weight decay) and one with weight decay,
# 3. compare their per-class accuracy and the norms of their classifier weights, also during training,
# 4. put the results beside a committed reference and beside WB's Table 1,
# 5. see in the authors' own training logs when weight decay pays, and which of WB's claims show here,
# 6. look inside the features for why weight decay helps, or why it does not,
# 7. see how a weight decay is chosen on validation.
#
# Notebook 2 then re-balances the classifier on top of these two models.

# %% [markdown]
# **How to run.** Top to bottom, one cell at a time. The notebook runs in one of two modes, printed by the
# first cell:
#
# - `reference` (the default without a CUDA GPU): it reads the runs committed with the repository and
#   trains nothing, so it finishes in minutes on a laptop;
# - `train` (the default with a GPU, then with the `paper` preset): it trains every model itself, each in
#   its own directory under `exp/` named after its recipe, and reuses a finished one instead of training
#   it again.
#
# Choose with the environment variable `LTR_RUNS` (`reference` or `train`) and `LTR_PRESET` before
# starting Jupyter, or pass them: `notebook_tools.setup(runs="train", preset="cpu")`. On Colab or another
# hosted Jupyter, first run `!git clone <this repository's address> ltr && pip install ./ltr` and
# `%cd ltr/notebooks` in a cell. `nb` then holds what the cells share: the mode (`nb.runs`), the preset,
# the data (`nb.data_root`: the real CIFAR-100, downloaded once; synthetic images only without data and
# network, and then every title says so) and where the runs are (`nb.exp`).

# %%
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd().parent))  # the repository root: this notebook lives in notebooks/
import ltr
from ltr import notebook_tools, plots

nb = notebook_tools.setup()

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
data = ltr.load_cifar_lt(nb.data_root, "cifar100", imbalance=100)
info = data.summary()
print(f"{info['train']:,} training images (long-tailed), {info['test']:,} test images (balanced)")
print("classes per group:", info["groups"])
print("images of the first five classes:", data.counts[:5], " of the last five:", data.counts[-5:])
print("first five classes:", data.class_names[:5], " last five:", data.class_names[-5:])

# %%
plots.plot_count_profile((100, 50, 10), n_max=data.counts[0], title="Training images per class" + nb.note)

# %% [markdown]
# ## 2. Two stage-1 models: naive and with weight decay
#
# Both models are a ResNet trained with cross-entropy and SGD on the long-tailed set. They differ only in
# the weight decay $\lambda$, which adds a penalty on the size of all weights:
#
# $$\min_\theta \; \frac{1}{N} \sum_{j=1}^{N} \ell\big(f_\theta(x_j), y_j\big)
# + \frac{\lambda}{2} \lVert \theta \rVert_2^2 .$$
#
# Why this could matter for the tail: the classifier computes a logit $z_c = w_c^\top f(x) + b_c$ per
# class. Head classes supply most of the training images, so most gradient steps make their rows $w_c$
# longer, and a longer $w_c$ means larger logits for that class whatever the image. Weight decay pulls
# every row towards zero. Whether it also narrows the gap between head and tail rows is a question
# section 4 answers with a number. WB also find that weight decay gives better features (section 8).
#
# WB's naive model uses $\lambda = 0$; their tuned value, chosen on validation data, is
# $\lambda = 5 \cdot 10^{-3}$. Weight decay acts together with the learning rate (every step shrinks the
# weights by their product), so each preset carries its own value. The `cpu` preset's
# $5 \cdot 10^{-4}$ was the best *non-zero* value of a first grid ($5 \cdot 10^{-4}$, $10^{-3}$,
# $3 \cdot 10^{-3}$) on the validation split; over WB's grid, which includes 0, validation picks no
# weight decay at all (`exp/reference/cpu/README.md`, "The weight-decay study", and section 9). So at
# this scale "WD tuned" is the least-decayed model of the grid, not a better one.
#
# A **preset** is the recipe at a given scale; all three train on the real CIFAR-100. `paper` is WB's
# recipe (a ResNet-34; it needs a GPU). `cpu` cuts it to fit a 2-core CPU: a ResNet-8, fewer epochs at a
# higher learning rate, and its own weight decay; data, augmentation, batch size, optimiser, schedule and
# all of stage 2 stay WB's. `smoke` only checks that the code runs. The first cell lists every field the
# preset changes; the second prints what the next two cells train (or, in reference mode, read) and how
# long training the committed runs of the same recipes took.
#
# In reference mode the two models are a retrain of seed 0 of the committed `cpu` Table 1: CPU
# arithmetic is not bit-for-bit reproducible across machines, so they differ slightly from
# `table1.csv`'s seed 0, and the "At this scale" cell of section 7 reads `table1.csv`'s three-seed means.

# %%
CHANGES = notebook_tools.preset_changes(nb.preset)
display(CHANGES if len(CHANGES) else f"preset {nb.preset!r} is WB's recipe, unchanged")

# %%
naive_cfg = ltr.preset_config("stage1", nb.preset, wd=0.0)
wd_cfg = ltr.preset_config("stage1", nb.preset)
N_LABEL, WD_LABEL = "naive (WD=0)", f"WD={wd_cfg.wd:g}"
notebook_tools.training_plan(nb, {N_LABEL: naive_cfg, WD_LABEL: wd_cfg})

# %%
NAIVE = nb.stage1(naive_cfg)
plots.results_table({N_LABEL: NAIVE}, tta="flip")

# %%
WD = nb.stage1(wd_cfg)
plots.results_table({WD_LABEL: WD}, tta="flip")

# %% [markdown]
# ## 3. Per-class accuracy
#
# Each bar is the test accuracy of one class, classes sorted from head (left) to tail (right); the dashed
# lines are the group means (the Many / Medium / Few numbers of the tables). Look for the slope from head
# to tail: the naive model should be strong on the left and fall to near nothing on the right. Then look
# at which groups gain, or lose, when weight decay is added: all of them, mostly the head, or the tail?

# %%
plots.plot_per_class_accuracy(NAIVE, title=N_LABEL + nb.note)

# %%
plots.plot_per_class_accuracy(WD, title=WD_LABEL + nb.note)

# %% [markdown]
# ## 4. Per-class weight norms (WB Fig. 3)
#
# The norm $\lVert w_c \rVert$ of each row of the last linear layer. In WB's Fig. 3 the head rows of the
# naive model are clearly longer than the tail rows, and with weight decay the curve is lower and
# flatter. "Lower" and "flatter" are two different things. The table after the figure gives the mean
# norm of each group and `many / few`, how many times longer the head rows are than the tail rows.
#
# **Check:** does weight decay make every group's rows shorter? Does it make `many / few` smaller, so
# that no class wins by norm alone, or only shrink all rows together?

# %%
plots.plot_weight_norms({N_LABEL: NAIVE, WD_LABEL: WD}, title="classifier weight norms" + nb.note)

# %%
notebook_tools.norm_table({N_LABEL: NAIVE, WD_LABEL: WD})

# %% [markdown]
# ## 5. How the norms evolve during training (WB Fig. 2)
#
# Every epoch the trainer records all $\lVert w_c \rVert$ in `history.csv`. Left: the mean norm of each
# group over the epochs, solid for the naive model, dashed with weight decay. Right: the ratio of the
# Many mean to the Few mean. Look for when the groups drift apart, and whether weight decay stops the
# drift or only slows the growth of every row. (`plots.plot_norm_evolution(run)` draws every class of one
# run as a map over the epochs.)

# %%
plots.plot_norm_ratio_evolution({N_LABEL: NAIVE, WD_LABEL: WD}, title="norms during training" + nb.note)

# %% [markdown]
# ## 6. Results beside the reference and beside the paper
#
# Our columns are the runs above, measured at their **last** epoch on the full balanced test set, with
# **flip-averaging** (see the glossary). The `WB` columns are copied from **WB's Table 1** (CIFAR100-LT,
# IF = 100, ResNet-34); they are the paper's numbers, not ours. `n/a` marks an empty group. Only the
# `paper` preset is comparable to them; for the others, compare the shape: which groups gain, and by
# roughly how much.

# %%
plots.plot_group_accuracy({N_LABEL: NAIVE, WD_LABEL: WD}, tta="flip", title="stage 1" + nb.note)

# %%
if not nb.comparable:
    print(f"Our columns come from the {nb.source}: they are NOT comparable to WB's columns.")
plots.results_table({N_LABEL: NAIVE, WD_LABEL: WD}, tta="flip", paper=notebook_tools.PAPER_TABLE1)

# %% [markdown]
# **The committed reference.** `exp/reference/cpu` holds the Table 1 of the `cpu` preset on the real
# CIFAR-100 over three seeds (`table1.csv`, the run directories, and a README naming the machine). With the
# `cpu` preset your two rows above should land close to its two rows below. The line after the table
# reads, from the same file, how much weight decay moves each group here and in WB's table.
#
# **Check:** does weight decay help Few at this scale? And in WB's own table, how large is its Few gain
# next to its gain on All? A claim about the tail should rest on the Few column, not on All.

# %%
notebook_tools.show_reference(nb.reference, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"],
                              changes=[("WD=0 (w/ CE)", "WD tuned (w/ CE)")])

# %%
# The paper-scale reference (WB's recipe on a GPU, `exp/reference/<gpu>-paper/`) when one is committed:
# its two stage-1 rows beside WB's and their per-class weight norms, drawn from its run directories.
notebook_tools.show_paper_reference(nb.repo, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"], figure="weight_norms")

# %% [markdown]
# ## 7. Where WB's claims appear: the authors' own training logs
#
# WB's repository ships the logs of its two stage-1 runs (ResNet-34, weight decay 0 and
# $5 \cdot 10^{-3}$, trained longer than the paper says; `exp/official/README.md` gives the source and
# the licence). They record the training and the test accuracy at every epoch. The figure puts them beside
# the same two curves of our runs, with epochs as a fraction of each schedule (our test accuracy is
# evaluated every few epochs only).
#
# Look at the left panel first. While the weight-decay model still underfits (its training accuracy,
# dashed, well below the naive model's), its test accuracy is *behind*. It pulls ahead only once it, too,
# fits its training set. Then look at where our runs end on the right.

# %%
notebook_tools.fit_and_test(nb, {N_LABEL: NAIVE, WD_LABEL: WD})

# %% [markdown]
# **At this scale.** The next cell puts the `cpu` reference's rows (`table1.csv`, mean over three
# seeds; `table1-tuned.csv`, every value chosen on validation, one seed) beside WB's Table 1, and checks
# WB's claims one by one with numbers read from those files, from the two runs above and from WB's
# logs. The best row at this scale, "+ CB" with a weighted cross-entropy, is a stage-2 row: notebook 2
# trains it.

# %%
notebook_tools.at_this_scale(nb, NAIVE, WD);

# %% [markdown]
# So the numbers here do not show that WB are wrong, nor that their claims hold everywhere: WB's weight
# decay pays in the regime where the model fits its training set, which the ResNet-8 of the `cpu` preset,
# in its short schedule, never reaches. A student who reads only WB's abstract, or only this table,
# misses half of that.

# %% [markdown]
# ## 8. Why weight decay helps (or does not)
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
# for the two models: FDR over the epochs (left), FDR at the end on test and training features
# (middle), the cone effect at the end (right); the table below it gives the same numbers.

# %%
notebook_tools.show_feature_analysis({N_LABEL: NAIVE, WD_LABEL: WD}, "the two runs above" + nb.note);

# %% [markdown]
# The same for the committed references: the `cpu` one (the two stage-1 models of its first seed) and,
# when one is committed, a paper-scale one (`exp/reference/*-paper/`). A reference made before ltr
# recorded these measurements says so instead of drawing.
#
# **Connect the figures to the accuracy tables.** In section 6, did weight decay raise All, and Few? Here,
# did it raise the FDR and lower the different-class cosine? If the features are better but the accuracy
# is not, ask what the FDR measures: $S_B$ weighs each class mean by its class size, so on a long-tailed
# set it mostly says how well the head classes separate.

# %%
notebook_tools.show_reference_features(nb.reference, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"],
                                       "committed reference, cpu preset");

# %%
PAPER_REFERENCE = notebook_tools.paper_reference_said(nb.repo)
notebook_tools.show_reference_features(PAPER_REFERENCE, ["WD=0 (w/ CE)", "WD tuned (w/ CE)"],
                                       "committed reference, paper preset");

# %% [markdown]
# ## 9. Choosing the weight decay on validation (WB Fig. 4)
#
# Where does a value like $5 \cdot 10^{-3}$ come from? WB tune $\lambda$ and plot accuracy against it
# (their Fig. 4). Tuning must not look at the test set: a value picked for its test accuracy flatters
# that accuracy. `ltr.run_sweep` trains one stage-1 model per value of the preset's grid, **chooses on
# the validation split** (the first 20 test images of each class) and **reports on the held-out split**
# (the other 80), for the chosen value and for WB's. With `paper` and `cpu` the grid is WB's,
# $\lambda \in \{0, 5\cdot10^{-4}, 10^{-3}, 2\cdot10^{-3}, 5\cdot10^{-3}, 10^{-2}, 2\cdot10^{-2}\}$; `smoke`
# sweeps three of its values. The two models above are two of its points and are reused, not retrained.
#
# In reference mode the cell shows the committed sweep of the `cpu` preset (one seed). In train mode it
# first says how many models it trains and how long the committed runs of the same recipes took (with
# `cpu`, this is the long cell), trains them, shows your sweep, and then the committed one. In the figure,
# solid lines are validation, dashed lines held-out. Is the validation optimum near WB's value at this
# scale? What happens to Few as $\lambda$ grows?

# %%
notebook_tools.stage1_wd_sweep(nb);

# %% [markdown]
# ## Try it
#
# Cheapest first; the table after the list gives each item's measured training time at the `cpu` scale,
# read from the committed runs (the machine is named with it).
#
# 1. **Why does weight decay not win here?** (reading only) Use the figure of section 7, the training
#    accuracy in the "At this scale" output, and section 4's norm table. Write two sentences a classmate
#    who only read WB's abstract would understand. (Answers: the two "why" questions.)
# 2. **The sweep, read.** (reading only) In section 9's committed sweep: where does validation All peak,
#    which group goes first as $\lambda$ grows, and how far is WB's value behind? Open the sweep runs'
#    `history.csv` (`exp/reference/cpu/stage1/*-wd*-e70-s0/`): how does the last-epoch training accuracy
#    change with $\lambda$? And the Many/Few norm ratio (`notebook_tools.group_norms(run)`)? (Answer e.)
# 3. **Train the two models yourself.** Set `LTR_RUNS=train` (the `cpu` preset without a GPU) and run
#    sections 2 to 6. Do your rows land near the reference's? Which model is ahead on All, and does that
#    hold in every seed of the reference (`exp/reference/cpu/stage1/*/metrics.json`)? (Answer f.)
# 4. **The sweep, trained.** With `LTR_RUNS=train`, section 9 trains the rest of the grid. Pass
#    `values=[...]` to `ltr.run_sweep` for a shorter one, or `search="bayes", trials=8` to let Optuna
#    choose the values (needs `pip install optuna`). Does the choice match the committed sweep's? (Answer e.)
#
# Answers for the instructor: `notebooks/answers.md`.

# %%
PAIR = [0.0, ltr.preset_config("stage1", "cpu").wd]
REST = [v for v in ltr.sweep_grid("stage1-wd", "cpu") if v not in PAIR]
notebook_tools.try_it_costs(nb, {"1. why weight decay does not win": [], "2. the sweep, read": [],
                                 "3. train the two models": PAIR, "4. the sweep, trained": REST})

# %% [markdown]
# ## Glossary
#
# - **Imbalance factor (IF)**: training images of the largest class divided by those of the smallest;
#   here the counts fall exponentially from the head class to the tail class.
# - **Many / Medium / Few**: classes with more than 100, 20 to 100, and fewer than 20 training images;
#   accuracy is reported per group and over all classes (**All**).
# - **Flip-averaging**: the logits of a test image and of its mirror image are averaged before the
#   prediction, as in WB's code; a cheap test-time augmentation.
# - **Last epoch vs best test epoch**: we report the model as training leaves it. WB's code keeps the
#   epoch with the best test accuracy, which lets the test set choose and so flatters the number.
# - **Weight decay**: a penalty $
# rac{\lambda}{2}\lVert	heta
# Vert^2$ on all weights; each SGD step
#   shrinks every weight by a factor set by the learning rate times $\lambda$.
# - **MaxNorm**: after each step, every classifier row longer than a threshold is scaled back to it
#   (a projection); rows may shrink freely below it.
# - **tau-norm**: after training, divide each classifier row by its norm to the power $	au$;
#   $	au = 0$ changes nothing, larger $	au$ favours the short (tail) rows.
# - **L2-norm**: tau-norm with $	au = 1$: every row gets length 1.
# - **Class-balanced loss**: a loss that weighs each image by a weight that grows as its class gets rarer
#   (WB use the "effective number" weights of Cui et al.), so the tail counts more.
# - **cRT** (classifier re-training): keep the stage-1 features, re-initialise the classifier and train it
#   on class-balanced batches.
# - **LWS** (learnable weight scaling): keep the classifier rows and learn one scale per class on
#   balanced batches.
# - **LDAM-DRW**: a loss that asks for a larger margin for rarer classes, with class re-weighting switched
#   on only late in training (deferred re-weighting).
# - **Logit adjustment / balanced softmax**: add $	au \log \pi_c$ (the class prior) to the logits in the
#   loss, or subtract it at test time, so the prior's advantage for the head is removed.
# - **Fisher ratio**: $\mathrm{Tr}(S_W^{-1} S_B)$, how far apart the class means are compared with the
#   spread within each class; higher means linearly easier to separate (section 8).
# - **Cone effect**: ReLU features are non-negative, so they crowd into a narrow cone; measured by the mean
#   cosine similarity of two features, lower is more spread out (section 8).
