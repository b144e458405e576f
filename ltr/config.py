"""Stage configs (one dataclass per stage, units in comments), presets, validation and run names."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .data import check_imbalance, dataset_info
from .errors import LtrError
from .models import MODELS

STAGE1_METHODS = ("ce", "aux-balanced", "etf-fr")
STAGE2_LOSSES = ("ce", "cb", "la", "bs", "ldam-drw")
STAGE2_POSTHOC = ("l2norm", "tau-norm", "logit-adjust", "mla")
MLA_TAU = 0.65  # Hasegawa & Sato's tau of multiplicative logit adjustment on CIFAR100-LT (exponent)
CB_VARIANTS = ("official", "standard")
# How tables name the two class-balanced losses: only the official one is WB's.
CB_LABELS = {"official": "WB's loss", "standard": "weighted CE"}
# fidelity: "corrected" (ours: cosine stepped every optimizer step, MaxNorm after every step, frozen BN in
# eval mode) | "official" (what WB's code does: cosine stepped per epoch, last epoch at lr 0, MaxNorm once an
# epoch, BN in train mode, fp32). docs/recipe.md says why both exist.
FIDELITIES = ("corrected", "official")
# What stage 2's fidelity "official" sets besides the epoch-stepped schedule: the official code projects
# MaxNorm once per epoch and leaves the frozen backbone's BN in train mode.
OFFICIAL_STAGE2 = {"pgd_every": "epoch", "bn": "train"}

# Fields added after runs were first written, with their defaults: a run directory whose config.json
# lacks one of them was made with the default, so it still matches (and resumes) under today's config.
FEATURE_REG = 0.01  # Hasegawa & Sato's feature regularisation on CIFAR100-LT (coefficient)
DEFAULTS_OF_ADDED_FIELDS: dict[str, object] = {"aux_weight": 1.0, "ssl": None, "la_tau": 1.0, "lws": False,
                                               "reinit": False, "feature_reg": 0.01, "fidelity": "corrected"}


@dataclass
class Stage1Config:
    """Feature learning (WB stage 1); defaults are the paper's tuned weight-decay recipe."""

    dataset: str = "cifar100"  # cifar100 | cifar10
    imbalance: float = 100.0  # imbalance factor n_max / n_min (ratio)
    model: str = "resnet34"  # backbone name (resnet34 | resnet32 | resnet8)
    # ce = WB stage 1 (CE on instance batches) | aux-balanced (docs/recipe.md §6, our reading) |
    # etf-fr (Hasegawa & Sato's one-stage recipe: fixed simplex-ETF classifier, learnable bias, feature
    # regularisation)
    method: str = "ce"
    aux_weight: float = 1.0  # lambda of aux-balanced: loss = CE_balanced + lambda * CE_instance (ratio)
    ssl: str | None = None  # aux-balanced only: rotation = 4-way rotation head on the instance batch
    # etf-fr only: weight of the feature regularisation, loss = CE + feature_reg * batch mean of ||f||^2 / 2
    # (per squared unit of the pooled penultimate feature norm; Hasegawa & Sato: 0.01)
    feature_reg: float = 0.01
    epochs: int = 200  # passes over the long-tailed training set
    batch_size: int = 64  # images per optimizer step
    lr: float = 0.01  # peak learning rate; cosine to 0
    momentum: float = 0.9  # SGD momentum
    wd: float = 5e-3  # weight decay on every parameter, BN included (0 = the naive model)
    seed: int = 0  # seeds initialisation and batch order
    fidelity: str = "corrected"  # corrected: cosine per step | official: WB's, per epoch, fp32 (FIDELITIES)
    eval_every: int = 10  # epochs between test evaluations shown in the progress bar


@dataclass
class Stage2Config:
    """Classifier learning (WB stage 2) on top of a finished stage-1 run."""

    from_run: str = ""  # stage-1 run directory to start from
    loss: str = "ce"  # ce | cb (class-balanced) | la (logit-adjusted) | bs (balanced softmax) | ldam-drw
    # official = WB's loss (BCE of softmax probabilities vs one-hot, weight w_y, mean over batch x classes:
    # about 1/C of a weighted CE); standard = weighted cross-entropy (ours)
    cb_variant: str = "official"
    cb_beta: float = 0.9999  # beta of the effective number (1 - beta^n) / (1 - beta)
    wd: float = 0.0  # weight decay on the trainable layers (0.1 in the "WD" rows)
    maxnorm: float | None = None  # MaxNorm thresh in (0, 1]; None = no MaxNorm
    pgd_every: str = "step"  # step = project after every step (paper); epoch = official code
    unit_norm: bool = False  # keep classifier rows at unit norm (the "& L2norm" rows)
    # l2norm | tau-norm | logit-adjust | mla (multiplicative logit adjustment): no training, adjust fc
    posthoc: str | None = None
    tau: float = 1.9  # exponent of tau-norm; with posthoc mla: every logit divided by prior_c ** tau
    la_tau: float = 1.0  # tau of logit adjustment (post-hoc and --loss la): logits - tau * log prior
    lws: bool = False  # learnable weight scaling: train only a per-class logit scale (Kang et al.)
    reinit: bool = False  # re-initialise fc before retraining (cRT of Kang et al. with balanced sampling)
    trainable: str = "fc"  # fc | last2 (last conv + fc; our reading of "last two layers")
    bn: str = "eval"  # eval = frozen BN statistics; train = the official code's drift
    sampling: str = "instance"  # instance | balanced (class-uniform batches)
    epochs: int = 10  # passes over the long-tailed training set
    batch_size: int = 64  # images per optimizer step
    lr: float = 0.01  # peak learning rate; cosine to 0
    momentum: float = 0.9  # SGD momentum
    seed: int = 0  # seeds batch order
    eval_every: int = 1  # epochs between test evaluations shown in the progress bar
    fidelity: str = "corrected"  # corrected | official: WB's stage 2, with OFFICIAL_STAGE2 (FIDELITIES)


# A preset's own default sweep grids ("sweeps": kind -> values, tuning.sweep_grid), kept apart from
# the stage configs so that they never reach a run's config.json. Without one a preset sweeps each kind's
# full grid (WB's Fig. 4 for the stage-1 weight decay). The quick presets sweep three points, WB's value
# among them; the stage-1 grid holds the smoke preset's naive (0) and tuned (5e-3) models, so a sweep
# after notebook 1 or Table 1 trains one new backbone.
SMOKE_SWEEPS: dict[str, tuple[float, ...]] = {
    "stage1-wd": (0.0, 1e-3, 5e-3), "tau": (0.0, 1.0, 1.9), "maxnorm": (0.05, 0.1, 0.5),
    "stage2-wd": (0.0, 1e-2, 0.1), "mla-tau": (0.0, 0.65, 1.3),
}

PRESETS: dict[str, dict[str, dict]] = {
    "paper": {"stage1": {}, "stage2": {}},
    # The paper's recipe cut to fit a 2-core CPU: all 13 Table-1 rows of one seed on the real CIFAR100-LT
    # (IF 100) in under 30 minutes. What it keeps: data, augmentation, batch 64, SGD with momentum 0.9,
    # per-step cosine to 0, weight decay on every parameter, and the whole stage 2 (10 epochs, lr 0.01,
    # batch 64, CB, WD 0.1, MaxNorm 0.1). What it changes, and why:
    # - backbone ResNet-8 (81 k parameters) for ResNet-34 (21 M): on 2 cores a ResNet-8 epoch takes
    #   about 7 s, a ResNet-32 epoch about 55 s; no larger net fits 2 stage-1 runs in the budget;
    # - 70 epochs for 200, and lr 0.05 for 0.01: the most epochs two runs can afford; at lr 0.01 a
    #   ResNet-8 reaches only 40% train accuracy in 30 epochs. Even so it ends near 69% training accuracy:
    #   it never fits its training set, which is where WB's effect of weight decay appears (exp/official);
    # - weight decay 5e-4 for 5e-3: the best non-zero value on the validation split (the first 20 test
    #   images of each class) of 5e-4, 1e-3 and 3e-3 with seed 0; no weight decay scored higher, and the
    #   validation optimum over WB's grid is 0 (exp/reference/cpu/sweep-stage1-wd). 3e-3 was the first
    #   guess: it keeps the paper's total shrinkage (the sum of lr_t * wd over the cosine steps, 0.85) at
    #   lr 0.05, but at this size every step of weight decay cost accuracy (validation All 30.8 / 30.0 /
    #   26.7 for 5e-4 / 1e-3 / 3e-3, and 31.9 for no weight decay): see exp/reference/cpu/README.md;
    # - test accuracy every 5 stage-1 epochs (every stage-2 epoch, as the paper preset), to save time.
    "cpu": {
        "stage1": {"model": "resnet8", "epochs": 70, "batch_size": 64, "lr": 0.05, "wd": 5e-4,
                   "eval_every": 5},
        "stage2": {},
    },
    # Well under a minute on a 2-core CPU on the synthetic test data; not a paper result.
    "smoke": {"stage1": {"model": "resnet8", "epochs": 3, "batch_size": 128, "lr": 0.05, "eval_every": 1},
              "stage2": {"epochs": 2, "batch_size": 128, "lr": 0.05, "eval_every": 2},
              "sweeps": SMOKE_SWEEPS},
    # The fastest end-to-end check of the pipeline (tests): one epoch a stage; numbers mean nothing.
    "tiny": {"stage1": {"model": "resnet8", "epochs": 1, "batch_size": 256, "lr": 0.05, "eval_every": 1},
             "stage2": {"epochs": 1, "batch_size": 256, "lr": 0.05, "eval_every": 1}, "sweeps": SMOKE_SWEEPS},
}


def preset_config(stage: str, preset: str = "paper", **overrides: object) -> Stage1Config | Stage2Config:
    """A stage's config from a preset, with explicit fields taking precedence."""
    if preset not in PRESETS:
        raise LtrError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cls = Stage1Config if stage == "stage1" else Stage2Config
    values = {**PRESETS[preset][stage], **{k: v for k, v in overrides.items() if v is not None}}
    if stage == "stage2" and values.get("fidelity") == "official":
        # One switch: the official code's projection and BN mode come with its schedule (an explicit
        # contrary value is left for validate_stage2 to reject).
        values = {**OFFICIAL_STAGE2, **values}
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise LtrError(f"unknown {stage} config fields {unknown}")
    return cls(**values)


def _fmt(x: float) -> str:
    return f"{x:g}".replace("e-0", "e-")


def run_name(cfg: Stage1Config) -> str:
    """A stage-1 run directory name that says what it is, e.g. cifar100-if100-resnet34-wd5e-3-e200-s0."""
    parts = [cfg.dataset, f"if{_fmt(cfg.imbalance)}", cfg.model]
    if cfg.method != "ce":
        parts.append(cfg.method + (_fmt(cfg.aux_weight) if cfg.aux_weight != 1.0 else "")
                     + (_fmt(cfg.feature_reg) if cfg.feature_reg != FEATURE_REG else ""))
    if cfg.ssl:
        parts.append(cfg.ssl)
    parts += [f"wd{_fmt(cfg.wd)}", f"e{cfg.epochs}"]
    if cfg.fidelity != "corrected":
        parts.append(cfg.fidelity)
    return "-".join(parts + [f"s{cfg.seed}"])


def validate_stage1(cfg: Stage1Config) -> None:
    """Reject configs that cannot run, naming the field and the fix."""
    dataset_info(cfg.dataset)
    check_imbalance(cfg.imbalance)
    if cfg.model not in MODELS:
        raise LtrError(f"unknown model {cfg.model!r}; choose one of {sorted(MODELS)}")
    if cfg.method not in STAGE1_METHODS:
        raise LtrError(f"unknown stage-1 method {cfg.method!r}; choose one of {STAGE1_METHODS}")
    if not (cfg.aux_weight >= 0 and math.isfinite(cfg.aux_weight)):
        raise LtrError(f"--aux-weight must be a number >= 0, got {cfg.aux_weight}")
    if cfg.ssl not in (None, "rotation"):
        raise LtrError(f"unknown --ssl {cfg.ssl!r}; the only self-supervised task is 'rotation'")
    if cfg.method != "aux-balanced" and (cfg.ssl is not None or cfg.aux_weight != 1.0):
        raise LtrError("--aux-weight and --ssl configure the auxiliary heads of --method aux-balanced")
    if not (cfg.feature_reg >= 0 and math.isfinite(cfg.feature_reg)):
        raise LtrError(f"--feature-reg must be a number >= 0, got {cfg.feature_reg}")
    if cfg.method != "etf-fr" and cfg.feature_reg != DEFAULTS_OF_ADDED_FIELDS["feature_reg"]:
        raise LtrError("--feature-reg sets the feature regularisation of --method etf-fr")
    if cfg.fidelity not in FIDELITIES:
        raise LtrError(f"unknown fidelity {cfg.fidelity!r}; use 'corrected' or 'official'")
    _check_common(cfg)


def _check_common(cfg: Stage1Config | Stage2Config) -> None:
    if cfg.epochs < 0 or cfg.batch_size < 1:
        raise LtrError("epochs must be >= 0 and batch size >= 1")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise LtrError(f"learning rate must be a positive number, got {cfg.lr}")
    if cfg.wd < 0:
        raise LtrError(f"weight decay must be >= 0, got {cfg.wd}")
    if cfg.eval_every < 1:
        raise LtrError("eval_every must be >= 1 epoch")


def validate_stage2(cfg: Stage2Config) -> None:
    """Reject stage-2 configs that cannot run or contradict themselves."""
    _check_common(cfg)
    choices = {"loss": STAGE2_LOSSES, "cb_variant": CB_VARIANTS, "fidelity": FIDELITIES,
               "pgd_every": ("step", "epoch"), "trainable": ("fc", "last2"), "bn": ("eval", "train"),
               "sampling": ("instance", "balanced"), "posthoc": (None, *STAGE2_POSTHOC)}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise LtrError(f"{name}={getattr(cfg, name)!r} is not one of {allowed}")
    if cfg.fidelity == "official" and cfg.posthoc is None:
        wrong = {k: getattr(cfg, k) for k, v in OFFICIAL_STAGE2.items() if getattr(cfg, k) != v}
        if wrong:
            raise LtrError("--fidelity official is WB's stage 2 as one switch (epoch-stepped cosine, "
                           + ", ".join(f"{k}={v!r}" for k, v in OFFICIAL_STAGE2.items()) + "); it cannot run "
                           "with " + ", ".join(f"{k}={v!r}" for k, v in wrong.items())
                           + ": drop those, or use --fidelity corrected with them")
    if cfg.maxnorm is not None and not (0 < cfg.maxnorm <= 1):
        raise LtrError(f"--maxnorm must be in (0, 1] (the thresh of docs/recipe.md §4), got {cfg.maxnorm}")
    if cfg.tau < 0:
        raise LtrError(f"--tau must be >= 0, got {cfg.tau}")
    if not (cfg.la_tau >= 0 and math.isfinite(cfg.la_tau)):
        raise LtrError(f"--la-tau must be a number >= 0, got {cfg.la_tau}")
    if cfg.maxnorm is not None and cfg.unit_norm:
        raise LtrError("--maxnorm and --unit-norm both constrain the rows; pick one")
    if cfg.la_tau != 1.0 and cfg.loss != "la" and cfg.posthoc != "logit-adjust":
        raise LtrError("--la-tau sets the tau of --loss la and --posthoc logit-adjust; use one of them")
    # LWS trains only the scales, LDAM keeps its own unit-norm cosine classifier: row constraints clash.
    rows = (("--maxnorm", cfg.maxnorm is not None), ("--unit-norm", cfg.unit_norm))
    for on, name, extra in ((cfg.lws, "--lws", (("--trainable last2", cfg.trainable != "fc"),)),
                            (cfg.loss == "ldam-drw", "--loss ldam-drw", ())):
        clash = [flag for flag, used in rows + extra if used]
        if on and clash:
            raise LtrError(f"{name} cannot be combined with {', '.join(clash)}")
    if cfg.lws and (cfg.reinit or cfg.loss == "ldam-drw"):
        raise LtrError("--lws rescales the stage-1 classifier as it is: drop --reinit / --loss ldam-drw")
    if cfg.posthoc is not None:
        trained = {
            f"--loss {cfg.loss}": cfg.loss != "ce", "--lws": cfg.lws, "--reinit": cfg.reinit,
            "--wd": cfg.wd != 0, "--maxnorm": cfg.maxnorm is not None, "--unit-norm": cfg.unit_norm,
            "--trainable last2": cfg.trainable != "fc",
            "--bn train": cfg.bn != "eval" and cfg.fidelity == "corrected",
            "--fidelity official": cfg.fidelity != "corrected",
            "--sampling balanced": cfg.sampling != "instance",
        }
        clash = [flag for flag, on in trained.items() if on]
        if clash:
            raise LtrError(f"--posthoc {cfg.posthoc} adjusts a trained classifier without training; it "
                           f"cannot be combined with {', '.join(clash)}. Drop those flags, or drop --posthoc "
                           "to retrain")


def stage2_name(cfg: Stage2Config) -> str:
    """A stage-2 run directory name from its recipe, e.g. cb-official-wd0.1-max0.1-e10-s0."""
    if cfg.posthoc:
        tau = {"tau-norm": cfg.tau, "logit-adjust": cfg.la_tau, "mla": cfg.tau}.get(cfg.posthoc)
        return cfg.posthoc + (_fmt(tau) if tau is not None else "")
    loss = cfg.loss
    if loss == "cb" and cfg.cb_variant != "standard":
        loss = "cb-official"
    elif loss == "la" and cfg.la_tau != 1.0:
        loss = f"la{_fmt(cfg.la_tau)}"
    parts = ([cfg.trainable] if cfg.trainable != "fc" else []) + [loss]
    if cfg.sampling != "instance":
        parts.append(cfg.sampling)
    if cfg.reinit:
        parts.append("reinit")
    if cfg.lws:
        parts.append("lws")
    if cfg.wd:
        parts.append(f"wd{_fmt(cfg.wd)}")
    official = cfg.fidelity == "official"  # implies the once-per-epoch projection and BN in train mode
    if cfg.maxnorm is not None:
        epoch = cfg.pgd_every == "epoch" and not official
        parts.append(f"max{_fmt(cfg.maxnorm)}" + ("-epoch" if epoch else ""))
    if cfg.unit_norm:
        parts.append("unitnorm")
    if cfg.bn != "eval" and not official:
        parts.append("bntrain")
    if official:
        parts.append("fidelity-official")
    return "-".join(parts + [f"e{cfg.epochs}", f"s{cfg.seed}"])


def stage2_inert_fields(cfg: Stage2Config) -> tuple[str, ...]:
    """Fields that do not change what a stage-2 run computes (cb_variant without the CB loss): a run
    directory made when such a field had another default is still the same run, so it is reused."""
    return ("cb_variant",) if cfg.loss != "cb" else ()


def stage2_recipe_fields(fields: dict) -> dict:
    """Stage-2 fields with the defaults a named recipe implies (the CLI and stage2_from share them): crt =
    cRT (Kang et al.), a re-initialised classifier on class-balanced batches; lws (Kang et al.) learns on
    class-balanced batches; posthoc mla without tau: Hasegawa & Sato's MLA_TAU, not tau-norm's 1.9."""
    fields = dict(fields)
    if fields.pop("crt", False):
        if fields.get("sampling") not in (None, "balanced"):
            raise LtrError("--crt retrains on class-balanced batches; drop --sampling instance")
        fields.update(sampling="balanced", reinit=True)
    if fields.get("posthoc") == "mla" and fields.get("tau") is None:
        fields["tau"] = MLA_TAU
    if fields.get("lws") and fields.get("sampling") is None:
        fields["sampling"] = "balanced"
    return fields


def read_recorded_config(config: dict, recorded: dict, inert: tuple[str, ...] = ()) -> dict:
    """config as an older run directory would have recorded it, so that the two compare field by field: a
    field the record lacks (added later) is left out where config holds its default; inert fields
    (stage2_inert_fields) take the recorded value, as they do not change the run."""
    missing = object()
    config = {k: v for k, v in config.items()
              if k in recorded or (k not in inert and DEFAULTS_OF_ADDED_FIELDS.get(k, missing) != v)}
    config.update({k: recorded[k] for k in inert if k in recorded})
    return config
