"""Training: the learning-rate schedule, the one loop both stages share (`fit`), and the two stages.

Read `fit` first: for each epoch, for each batch, zero the gradients, run the forward pass and the loss,
backpropagate, take an SGD step, advance the schedule, run the method's hooks; then evaluate, record a
history row and checkpoint. Stage 1 (feature learning) and stage 2 (classifier learning) differ only in
the job they hand to `fit`: the batches, which parameters learn, the loss and the hooks (ltr/methods.py).
What keeps the loop fast and safe (compile, mixed precision, resume, the time limit) is in ltr/engine/,
each behind a call of one line here.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import (
    Stage1Config,
    Stage2Config,
    preset_config,
    read_recorded_config,
    run_name,
    stage2_inert_fields,
    stage2_name,
    stage2_recipe_fields,
    validate_stage1,
    validate_stage2,
)
from .data import DeviceLoader, LTData, dataset_info, load_cifar_lt, resolve_device
from .engine import dist
from .engine.checkpoint import CHECKPOINT_FILE, Checkpointer, default_ckpt_every
from .engine.precision import autocast_dtype, check_precision, resolve_precision, set_backend_flags
from .engine.rundir import (
    RunLock,
    claim_run_dir,
    load_checkpoint,
    read_json,
    runtime_info,
    save_torch,
    write_json,
)
from .engine.step import StepRunner, check_compile_mode, prepare_model
from .errors import LtrError, RunInterrupted
from .features import (
    feature_predictor,
    fisher_ratio_or_blank,
    save_test_features,
    stage1_feature_analysis,
    test_features,
    view_features,
)
from .methods import AUX_PREFIX, Hooks, Step, classifier_method, feature_learning_method
from .metrics import evaluate, per_class_accuracy, weight_norms
from .models import build_model
from .regularizers import apply_posthoc

# ---------------------------------------------------------------- the schedule


def lr_factor(step: int, steps_per_epoch: int, epochs: int, fidelity: str = "corrected") -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): cosine from 1 to 0."""
    if fidelity == "official":
        # WB's code steps CosineAnnealingLR(T_max=epochs) at the START of each epoch, so epoch e
        # (0-based) runs at the rate meant for e + 1, and the last epoch at exactly 0.
        epoch = step // max(steps_per_epoch, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch + 1, epochs) / epochs))
    total = max(steps_per_epoch * epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


# ---------------------------------------------------------------- the loop


@dataclass
class TrainingJob:
    """What one run trains: everything `fit` needs, built by a stage."""

    model: nn.Module  # the full model (evaluated as a whole)
    params: list[nn.Parameter]  # what the optimizer updates
    loaders: list[DeviceLoader]  # batch sources, one batch each per step; equal lengths
    step: Step  # inputs, forward pass and loss of one step
    epochs: int  # passes over the loaders
    lr: float  # peak learning rate
    momentum: float  # SGD momentum
    wd: float  # weight decay (L2 coefficient)
    fidelity: str  # schedule: "corrected" (cosine per step) | "official" (WB's, stepped per epoch)
    eval_every: int  # epochs between test evaluations
    train_mode: bool  # model.train() during steps (False keeps BN statistics frozen)
    hooks: Hooks = field(default_factory=Hooks)  # what the method does around the steps
    class_norms: Callable[[], torch.Tensor] | None = None  # per-class norms for history; None: fc's rows
    predict: Callable[[bool], torch.Tensor] | None = None  # test logits (flip?) from cached features
    compile_error: str | None = None  # why torch.compile fell back to eager, if it did (set by fit)


@dataclass
class Runtime:
    """Where and how a run trains; the same for both stages (what `--device`, `--precision` ... set)."""

    device: torch.device  # cpu | cuda[:n]
    precision: str  # resolved: bf16 | fp16 | fp32
    precision_asked: str  # what was asked for (auto resolves by device)
    compile: bool  # torch.compile the step
    compile_mode: str  # default | reduce-overhead (CUDA graphs)
    progress: bool  # one progress bar per run
    ckpt_every: int  # epochs between checkpoints
    backend: dict  # the CUDA backend flags set (empty on CPU)

    def record(self, root: str | os.PathLike) -> dict:
        """The runtime section of a run's config.json."""
        return {**runtime_info(self.device, self.precision, self.compile, str(root)),
                "precision_asked": self.precision_asked,
                "compile_mode": self.compile_mode if self.compile else None, **self.backend}


class EpochTotals:
    """An epoch's training loss and accuracy, summed on the device: no host sync inside the loop."""

    def __init__(self, device: torch.device) -> None:
        self.loss = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.seen = torch.zeros((), device=device, dtype=torch.long)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        self.loss += loss.detach() * len(y)
        self.correct += (logits.detach().argmax(1) == y).sum()
        self.seen += len(y)

    def means(self) -> tuple[float, float]:
        """(mean loss, accuracy in %) over every process's batches."""
        dist.sum_across(self.loss, self.correct, self.seen)
        seen = max(int(self.seen), 1)
        return float(self.loss) / seen, 100.0 * float(self.correct) / seen


def fit(job: TrainingJob, data: LTData, test_x: torch.Tensor, test_y: torch.Tensor, out: Path,
        rt: Runtime, desc: str) -> dict[str, torch.Tensor] | None:
    """Train job for its epochs, resuming from out/ckpt.pt; the last epoch's test features, if computed."""
    model = job.model
    runner = StepRunner(model, job.step, rt.device, rt.precision, rt.compile, rt.compile_mode,
                        full_batch=job.loaders[0].batch_size // dist.world()[1], desc=desc)
    opt = runner.optimizer(job.params, job.lr, job.momentum, job.wd)
    steps_per_epoch = len(job.loaders[0])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: lr_factor(step, steps_per_epoch, job.epochs, job.fidelity))
    checkpoint = Checkpointer(out, model, opt, schedule, runner.scaler, job.loaders, job.epochs,
                              rt.ckpt_every, desc)
    start, history = checkpoint.resume()
    class_norms = job.class_norms or (lambda: weight_norms(model))
    features = None
    bar = tqdm(total=job.epochs, initial=start, desc=desc, unit="ep",
               disable=not (rt.progress and dist.is_main()))
    epoch = start
    try:
        for epoch in range(start, job.epochs):
            t0 = time.perf_counter()
            model.train(job.train_mode)
            job.hooks.before_epoch(epoch)
            totals = EpochTotals(rt.device)
            lr = opt.param_groups[0]["lr"]
            for batches in zip(*job.loaders, strict=True):
                opt.zero_grad(set_to_none=True)
                loss, logits, y = runner.forward_backward(batches)  # forward, loss, backward
                runner.update(opt)  # the SGD step
                lr = opt.param_groups[0]["lr"]  # the rate this step used (history's lr)
                schedule.step()
                job.hooks.after_step()
                totals.add(loss, logits, y)
            job.hooks.after_epoch()
            train_loss, train_acc = totals.means()
            check_finite(train_loss, epoch, history, out, job.lr)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": round(train_loss, 6),
                   "train_acc": round(train_acc, 4), "test_acc": "",
                   "seconds": round(time.perf_counter() - t0, 3)}
            if (epoch + 1) % job.eval_every == 0 or epoch + 1 == job.epochs:
                scores, features = test_scores(job, test_x, test_y, data.num_classes, rt.precision)
                row.update(scores)
            row.update({f"wn_{c}": round(v, 6) for c, v in enumerate(class_norms().cpu().tolist())})
            history.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", train=f"{train_acc:.1f}", test=row["test_acc"])
            checkpoint.end_of_epoch(epoch + 1, history)
    except KeyboardInterrupt:
        raise RunInterrupted(f"interrupted at epoch {epoch + 1}; run the same command to resume") from None
    finally:
        bar.close()
        job.compile_error = runner.compile_error
    if start >= job.epochs:  # nothing left to train: the checkpoint and history are written all the same
        checkpoint.save(job.epochs, history)
    return features


def check_finite(train_loss: float, epoch: int, history: list[dict], out: Path, lr: float) -> None:
    """Stop a diverged run with the fix in the message; its last good checkpoint stays as it was."""
    if not math.isfinite(train_loss):
        last = history[-1]["epoch"] if history else "none"
        raise LtrError(f"the training loss became {train_loss} in epoch {epoch + 1}; the last good "
                       f"checkpoint (epoch {last}) is kept in {out}. Try a lower --lr (now {lr})")


def test_scores(job: TrainingJob, test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                precision: str) -> tuple[dict, dict[str, torch.Tensor] | None]:
    """Test accuracy (plain and flip-averaged, class means) and the test features' Fisher ratio."""
    # WB report the flip accuracy of the epoch with the best plain accuracy: both are kept every time.
    features, predict = None, job.predict
    if predict is None:  # one pass per view gives the logits of both and the Fisher ratio
        features = view_features(job.model, test_x, precision)
        predict = feature_predictor(job.model, features)
    scores = {key: round(float(per_class_accuracy(predict(flip).argmax(1), test_y, num_classes).nanmean()), 4)
              for key, flip in (("test_acc", False), ("test_acc_flip", True))}
    if features is not None:
        scores["test_fdr"] = fisher_ratio_or_blank(features["plain"], test_y)
    return scores, features


# ---------------------------------------------------------------- what both stages share


def start_runtime(device: str | torch.device, precision: str, compile: bool, compile_mode: str,
                  progress: bool, ckpt_every: int | None, fidelity: str) -> Runtime:
    """Check the runtime flags and resolve them for this machine (device, precision, backend flags)."""
    check_precision(precision)
    check_compile_mode(compile_mode)
    dev = dist.init(resolve_device(device))
    resolved = resolve_precision(precision, dev, fidelity)
    return Runtime(dev, resolved, precision, compile, compile_mode, progress,
                   default_ckpt_every(dev) if ckpt_every is None else ckpt_every,
                   set_backend_flags(dev, resolved))


def finished_metrics(out: Path, stage: str, config: dict, inert: tuple[str, ...] = ()) -> dict | None:
    """The metrics of the finished run with this config in out, or None; refuses a different run there.

    inert: fields that do not change this run (stage2_inert_fields); they match whatever was recorded.
    """
    if (out / "config.json").exists():
        config = read_recorded_config(config, read_json(out / "config.json").get("config", {}), inert)
    return claim_run_dir(out, stage, config)


def evaluate_and_record(out: Path, model: nn.Module, data: LTData, test_x: torch.Tensor, test_y: torch.Tensor,
                        precision: str, extra: dict,
                        predict: Callable[[bool], torch.Tensor] | None = None) -> dict:
    """Evaluate the final model and write metrics.json, which marks the run as finished."""
    dev = test_x.device
    metrics = evaluate(model, test_x, test_y, data.counts, torch.as_tensor(data.val_idx, device=dev),
                       torch.as_tensor(data.heldout_idx, device=dev), dtype=autocast_dtype(precision),
                       predict=predict)
    metrics.update(extra)
    metrics["precision"] = precision
    # Figures and tables label runs on synthetic files, so they cannot pass for paper results.
    metrics["synthetic_data"] = data.synthetic
    if dist.is_main():
        write_json(out / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------- stage 1: feature learning


def train_stage1(cfg: Stage1Config, out: str | os.PathLike | None = None, root: str | os.PathLike = "data",
                 device: str | torch.device = "auto", data: LTData | None = None, download: bool = False,
                 compile: bool = False, precision: str = "auto", progress: bool = True,
                 ckpt_every: int | None = None, compile_mode: str = "default") -> dict:
    """Feature learning: train (or resume, or reuse) a stage-1 run and return its metrics.

    precision: auto (bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs, fp32 on CPU and with
    fidelity "official") | bf16 | fp16 | fp32. compile: torch.compile the step (compile_mode default |
    reduce-overhead), falling back to eager with a warning. ckpt_every: epochs between checkpoints.
    """
    validate_stage1(cfg)
    out = Path(out) if out is not None else Path("exp/stage1") / run_name(cfg)
    done = finished_metrics(out, "stage1", asdict(cfg))
    if done is not None:
        return done
    rt = start_runtime(device, precision, compile, compile_mode, progress, ckpt_every, cfg.fidelity)
    dist.check_batch(cfg.batch_size)
    if data is None:
        data = load_cifar_lt(root, cfg.dataset, cfg.imbalance, download=download)
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, enabled=dist.is_main()):
        if dist.is_main() and not (out / "config.json").exists():
            write_json(out / "config.json", {"stage": "stage1", "config": asdict(cfg), "runtime": {
                **rt.record(root), "processes": dist.world()[1]}})
        dist.barrier()
        return _train_stage1(cfg, out, data, rt)


def _train_stage1(cfg: Stage1Config, out: Path, data: LTData, rt: Runtime) -> dict:
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.num_classes)
    loaders, step = feature_learning_method(cfg, model, data, rt.device, shard=dist.world())
    if dist.world()[1] > 1 and rt.device.type == "cuda":
        # Batch statistics over the whole global batch, as in a single process (NCCL only).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = prepare_model(model, rt.device)
    test_x = torch.as_tensor(data.test_x, device=rt.device)
    test_y = torch.as_tensor(data.test_y, device=rt.device)
    # Every trained parameter, all under the weight decay (etf-fr's fixed classifier weight is not trained).
    job = TrainingJob(model, [p for p in model.parameters() if p.requires_grad], loaders, step, cfg.epochs,
                      cfg.lr, cfg.momentum, cfg.wd, cfg.fidelity, cfg.eval_every, train_mode=True)
    t0 = time.perf_counter()
    features = fit(job, data, test_x, test_y, out, rt, f"stage1 {out.name}")
    train_seconds = round(time.perf_counter() - t0, 2)
    # One pass over the test images (plain and mirrored) serves the last history row, the metrics, the
    # feature analysis and every classifier-only stage 2 on this run (cached in the run directory).
    features = features or view_features(model, test_x, rt.precision)
    if dist.is_main():
        save_test_features(out, features, rt.precision)
    return evaluate_and_record(
        out, model, data, test_x, test_y, rt.precision,
        {"stage": "stage1", "name": out.name, "epochs": cfg.epochs, "method": cfg.method,
         "train_seconds": train_seconds, "compile_error": job.compile_error,
         "features": stage1_feature_analysis(model, data, features["plain"], test_y, rt.precision)},
        feature_predictor(model, features),
    )


def load_stage1(run_dir: str | os.PathLike, num_classes: int | None = None,
                device: str | torch.device = "cpu") -> tuple[nn.Module, Stage1Config]:
    """The finished stage-1 model of a run directory, with its config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise LtrError(f"{run_dir} is not a stage-1 run directory (no config.json); train one with "
                       "`python -m ltr stage1 --out DIR` and pass that DIR to --from")
    info = read_json(run_dir / "config.json")
    if info.get("stage") != "stage1":
        raise LtrError(f"{run_dir} holds a {info.get('stage')} run; --from needs a stage-1 run")
    if not (run_dir / "metrics.json").exists() or not (run_dir / CHECKPOINT_FILE).exists():
        raise LtrError(f"the stage-1 run in {run_dir} is not finished (no metrics.json or ckpt.pt); "
                       "rerun its stage1 command to resume it, then retry")
    names = {f.name for f in fields(Stage1Config)}
    cfg = Stage1Config(**{k: v for k, v in info["config"].items() if k in names})
    ckpt = load_checkpoint(run_dir / CHECKPOINT_FILE, "cpu")
    # Stage 2 starts from the backbone and its main head; aux-balanced's extra heads are left behind.
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith(AUX_PREFIX)}
    fc_w = state.get("fc.weight")
    classes = int(fc_w.shape[0]) if fc_w is not None else -1
    if num_classes is not None and classes != num_classes:
        raise LtrError(f"the checkpoint in {run_dir} has a {classes}-class classifier but the data has "
                       f"{num_classes} classes; use a stage-1 run trained on the same dataset")
    model = build_model(cfg.model, classes if classes > 0 else dataset_info(cfg.dataset).num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise LtrError(f"the checkpoint in {run_dir} does not match a {cfg.model} "
                       f"({str(exc).splitlines()[0]}); was it trained with another --model?") from None
    if cfg.method == "etf-fr":
        model.fc.weight.requires_grad_(False)  # the checkpoint's fixed ETF; stage 2 decides what trains
    return prepare_model(model, resolve_device(device)), cfg


def stage1_data_root(run_dir: str | os.PathLike) -> Path:
    """The data root a stage-1 run trained on, as its config.json recorded it."""
    runtime = read_json(Path(run_dir) / "config.json").get("runtime", {})
    for key in ("root_resolved", "root"):
        if runtime.get(key) and Path(runtime[key]).is_dir():
            return Path(runtime[key])
    return Path(runtime.get("root_resolved") or runtime.get("root") or "data")


# ---------------------------------------------------------------- stage 2: classifier learning


def train_stage2(cfg: Stage2Config, out: str | os.PathLike | None = None,
                 root: str | os.PathLike | None = None,
                 device: str | torch.device = "auto", data: LTData | None = None, download: bool = False,
                 compile: bool = False, precision: str = "auto", progress: bool = True,
                 ckpt_every: int | None = None, compile_mode: str = "default") -> dict:
    """Classifier learning (or a post-hoc normaliser) on a stage-1 run; returns its metrics.

    root=None reads the data from where the stage-1 run found it (its config.json); the runtime
    arguments are train_stage1's.
    """
    validate_stage2(cfg)
    if not cfg.from_run:
        raise LtrError("stage 2 needs --from: the directory of a finished stage-1 run")
    out = Path(out) if out is not None else Path("exp/stage2") / Path(cfg.from_run).name / stage2_name(cfg)
    done = finished_metrics(out, "stage2", asdict(cfg), stage2_inert_fields(cfg))
    if done is not None:
        return done
    rt = start_runtime(device, precision, compile, compile_mode, progress, ckpt_every, cfg.fidelity)
    model, s1 = load_stage1(cfg.from_run, None, rt.device)
    root = stage1_data_root(cfg.from_run) if root is None else root
    if data is None:
        try:
            data = load_cifar_lt(root, s1.dataset, s1.imbalance, download=download)
        except LtrError as exc:
            raise LtrError(f"{exc} (data root taken from {cfg.from_run}/config.json; pass --root "
                           "to read it from elsewhere)") from None
    if model.fc.out_features != data.num_classes:
        raise LtrError(f"the stage-1 classifier has {model.fc.out_features} classes but the data has "
                       f"{data.num_classes}; use a stage-1 run trained on this dataset")
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        if not (out / "config.json").exists():
            write_json(out / "config.json", {"stage": "stage2", "config": asdict(cfg), "stage1": asdict(s1),
                                             "runtime": rt.record(root)})
        return _train_stage2(cfg, out, model, data, rt)


def _train_stage2(cfg: Stage2Config, out: Path, model: nn.Module, data: LTData, rt: Runtime) -> dict:
    test_x = torch.as_tensor(data.test_x, device=rt.device)
    test_y = torch.as_tensor(data.test_y, device=rt.device)
    extra = {"stage": "stage2", "name": out.name, "from_run": str(cfg.from_run), "loss": cfg.loss,
             "cb_variant": cfg.cb_variant if cfg.loss == "cb" else None}
    predict = None
    if cfg.trainable == "fc" and cfg.bn == "eval":
        # The backbone never changes here, so its test features are computed once per stage-1 run.
        predict = feature_predictor(model, test_features(cfg.from_run, model, test_x, rt.precision))
    if cfg.posthoc is not None:
        apply_posthoc(cfg.posthoc, model.fc, data.counts, cfg.tau, cfg.la_tau)
        save_torch(out / CHECKPOINT_FILE, {"model": model.state_dict(), "epoch": 0, "history": []})
        extra.update(epochs=0, posthoc=cfg.posthoc, train_seconds=0.0)
        return evaluate_and_record(out, model, data, test_x, test_y, rt.precision, extra, predict)
    method = classifier_method(cfg, model, data.counts, rt.device)
    loader = DeviceLoader(data.train_x, data.train_y, cfg.batch_size, rt.device, seed=cfg.seed,
                          sampling=cfg.sampling, num_classes=data.num_classes)
    # LWS swaps model.fc for a scaled copy: predict reads whatever model.fc is by then.
    job = TrainingJob(model, method.params, [loader], method.step, cfg.epochs, cfg.lr, cfg.momentum, cfg.wd,
                      cfg.fidelity, cfg.eval_every, train_mode=cfg.bn == "train", hooks=method.hooks,
                      class_norms=method.class_norms, predict=predict)
    t0 = time.perf_counter()
    fit(job, data, test_x, test_y, out, rt, f"stage2 {out.name}")
    return evaluate_and_record(
        out, model, data, test_x, test_y, rt.precision,
        {**extra, "epochs": cfg.epochs, **method.report, **method.report_at_end(),
         "train_seconds": round(time.perf_counter() - t0, 2)},
        predict,
    )


def stage2_from(run: str | os.PathLike, preset: str = "paper", **fields_: object) -> Stage2Config:
    """A stage-2 config on top of a stage-1 run directory: a preset, the recipe's defaults, then fields.

    Besides Stage2Config's fields it takes crt=True (cRT: balanced batches and a re-initialised classifier).
    """
    cfg = preset_config("stage2", preset, **stage2_recipe_fields(fields_))
    return replace(cfg, from_run=str(run))
