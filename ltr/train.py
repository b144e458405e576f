"""The one training loop shared by both stages and the comparison methods; run directories and resume."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from .config import (
    LATER_DEFAULTS,
    Stage1Config,
    Stage2Config,
    preset_config,
    run_name,
    stage2_inert_fields,
    stage2_name,
    validate_stage1,
    validate_stage2,
)
from .data import DeviceLoader, LTData, dataset_info, load_cifar_lt, normalize, resolve_device
from .engine import dist
from .engine.precision import (
    autocast,
    autocast_dtype,
    check_precision,
    grad_scaler,
    resolve_precision,
    set_backend_flags,
)
from .engine.rundir import (
    RunLock,
    claim_run_dir,
    load_checkpoint,
    read_json,
    runtime_info,
    save_torch,
    write_history,
    write_json,
)
from .errors import LtrError, TimeLimitReached
from .losses import class_balanced_weights, make_loss
from .methods import (
    AUX_PREFIX,
    BALANCED_SEED_OFFSET,
    Step,
    StepModule,
    add_aux_heads,
    aux_balanced_step,
    cosine_step,
    feature_regularized_step,
    plain_step,
)
from .metrics import (
    evaluate,
    extract_features,
    feature_analysis,
    fisher_ratio,
    per_class_accuracy,
    weight_norms,
)
from .models import build_model, fix_etf_classifier
from .regularizers import (
    ScaledLinear,
    l2_normalize,
    logit_adjust_bias,
    maxnorm_threshold,
    multiplicative_logit_adjust,
    project_max_norm,
    project_unit_norm,
    tau_normalize,
)

# ---------------------------------------------------------------- schedule


def lr_factor(step: int, steps_per_epoch: int, epochs: int, fidelity: str = "corrected") -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): cosine from 1 to 0."""
    if fidelity == "official":
        # The official code steps CosineAnnealingLR(T_max=epochs) at the START of each epoch,
        # so epoch e (0-based) runs at the rate meant for e + 1, and the last epoch at exactly 0.
        epoch = step // max(steps_per_epoch, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch + 1, epochs) / epochs))
    total = max(steps_per_epoch * epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


# ---------------------------------------------------------------- time limit and compile

DEADLINE_ENV = "LTR_DEADLINE"  # Unix time after which every run stops at its next epoch boundary
COMPILE_MODES = ("default", "reduce-overhead")  # torch.compile modes the trainer runs


def deadline() -> float | None:
    """The time limit of this process (Unix time, from LTR_DEADLINE), or None."""
    value = os.environ.get(DEADLINE_ENV, "").strip()
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise LtrError(f"{DEADLINE_ENV}={value!r} is not a Unix time in seconds; unset it") from None


def default_ckpt_every(device: torch.device) -> int:
    """Epochs between checkpoints: every epoch on CPU (minutes each), every 10 on CUDA (a ResNet-34
    checkpoint is about 170 MB and an epoch a few seconds); a time limit still saves where it stops."""
    return 10 if device.type == "cuda" else 1


def check_compile_mode(mode: str) -> str:
    """The compile mode, or an LtrError naming the choices."""
    if mode not in COMPILE_MODES:
        raise LtrError(f"unknown --compile-mode {mode!r}; choose one of {' | '.join(COMPILE_MODES)}")
    return mode


def _compile(module: nn.Module, mode: str) -> nn.Module | None:
    """torch.compile(module) for one static shape in mode, or None (warned) when torch refuses at once."""
    try:
        return torch.compile(module, dynamic=False, **({} if mode == "default" else {"mode": mode}))
    except Exception as exc:  # e.g. no compiler for this Python or platform
        _compile_warning(exc, "")
        return None


def _compile_warning(exc: BaseException, desc: str) -> str:
    why = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"
    warnings.warn(f"torch.compile failed ({why}); training {desc or 'this run'} in eager mode instead",
                  RuntimeWarning, stacklevel=3)
    return why


# ---------------------------------------------------------------- the loop

@dataclass
class _Job:
    """What one run trains: everything the shared loop needs, built by a stage."""

    model: nn.Module  # the full model (evaluated as a whole)
    params: list[nn.Parameter]  # what the optimizer updates
    loaders: list[DeviceLoader]  # batch sources, one batch each per step; equal lengths
    step: Step  # inputs, forward pass and loss of one step
    epochs: int  # passes over the loaders
    lr: float  # peak learning rate
    momentum: float  # SGD momentum
    wd: float  # weight decay
    fidelity: str  # lr schedule flavour
    eval_every: int  # epochs between test evaluations
    train_mode: bool  # model.train() during steps (False keeps BN statistics frozen)
    after_step: Callable[[], None] | None = None  # projection after every optimizer step
    after_epoch: Callable[[], None] | None = None  # projection after every epoch
    before_epoch: Callable[[int], None] | None = None  # gets the 0-based epoch (deferred re-weighting)
    class_norms: Callable[[], torch.Tensor] | None = None  # per-class norms for history; default fc rows
    predict: Callable[[bool], torch.Tensor] | None = None  # test logits (flip?) without the images
    compile_error: str | None = None  # why torch.compile fell back to eager, if it did
    final_features: dict[str, torch.Tensor] | None = None  # test features of the last epoch (set by _fit)


def _fit(
    job: _Job,
    data: LTData,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    out: Path,
    device: torch.device,
    precision: str,
    compile: bool,
    progress: bool,
    desc: str,
    ckpt_every: int,
    stop_after: int | None,
    compile_mode: str = "default",
) -> bool:
    """Train job for its epochs, resuming from out/ckpt.pt; True when all epochs are done.

    A compile failure (at compile time or in any compiled step) warns once and trains on in eager mode.
    Past the time limit (deadline()) the run checkpoints at the end of its epoch and raises
    TimeLimitReached; rerunning resumes it.
    """
    from tqdm.auto import tqdm

    model = job.model
    scaler = grad_scaler(precision, device)
    # One fused kernel for the whole update on CUDA: at batch 64 launches, not FLOPs, dominate. With the
    # fp16 scaler the fused kernel also skips a step with inf/NaN gradients on the device, where the
    # unfused path would read found_inf on the host every step.
    opt = _sgd(job, fused=device.type == "cuda" or scaler.is_enabled())
    spe = len(job.loaders[0])
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, spe, job.epochs, job.fidelity)
    )
    history: list[dict] = []
    start = 0
    ckpt_path = out / "ckpt.pt"
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, device)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise LtrError(
                f"{ckpt_path} does not fit this run's model ({str(exc).splitlines()[0]}); "
                "delete it to retrain"
            ) from None
        kernel = {k: opt.param_groups[0].get(k) for k in ("fused", "foreach")}
        opt.load_state_dict(ckpt["optimizer"])
        for group in opt.param_groups:  # the kernel is this run's choice, not the checkpoint's
            group.update(kernel)
        sched.load_state_dict(ckpt["scheduler"])
        if scaler.is_enabled() and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        # Every loader's RNG state: each one's batch order (and augmentation) goes on where it stopped.
        rngs = ckpt.get("loader_rngs") or [ckpt["loader_rng"]]
        if len(rngs) != len(job.loaders):
            raise LtrError(f"{ckpt_path} holds {len(rngs)} sampler states, this run has "
                           f"{len(job.loaders)}; delete it to retrain")
        for loader, state in zip(job.loaders, rngs, strict=True):
            loader.load_state_dict({"generator": state.cpu()})
        history = list(ckpt.get("history", []))
        start = int(ckpt["epoch"])
    # The step's forward pass as one module call: DistributedDataParallel (under torchrun) all-reduces
    # each gradient bucket while the backward pass is still running.
    runner = dist.data_parallel(StepModule(model, job.step.forward), device)
    # Compiled for the full batch only (dynamic=False: one static graph, captured once). The last,
    # smaller batch of an epoch runs through the same module uncompiled: one eager step an epoch, the
    # same batches and arithmetic as eager training, and no recompile or re-capture for its shape.
    compiled = _compile(runner, check_compile_mode(compile_mode)) if compile else None
    if compiled is None:  # not asked for, or fell back to eager (an nn.Module has no truth value to test)
        compiled = runner
    if compile and compiled is runner:
        job.compile_error = "torch.compile refused the model"
    # CUDA graphs (reduce-overhead) reuse their output memory on the next replay: say where a step starts.
    mark_step = (getattr(torch.compiler, "cudagraph_mark_step_begin", None)
                 if compile_mode == "reduce-overhead" else None)
    full_batch = job.loaders[0].batch_size // dist.world()[1]  # what each process's shard holds
    # Ranks that disagreed about the clock would wait on each other forever: one process only.
    limit = deadline() if dist.world()[1] == 1 else None
    if limit is not None and start < job.epochs and time.time() >= limit:
        raise TimeLimitReached(f"time limit reached before {desc} started (epoch {start}/{job.epochs}); "
                               "rerun to go on")

    def save(epoch: int) -> None:
        if not dist.is_main():
            return  # under torchrun only rank 0 writes the run directory
        save_torch(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "loader_rngs": [loader.state_dict()["generator"] for loader in job.loaders],
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": epoch,
                "history": history,
            },
        )
        write_history(out / "history.csv", history)

    class_norms = job.class_norms or (lambda: weight_norms(model))
    dtype = autocast_dtype(precision)
    step_autocast = functools.partial(autocast, device.type, dtype)
    def forward_backward(module: nn.Module, images: tuple, batches: tuple) -> tuple[torch.Tensor, ...]:
        """One step's forward pass and backward pass through module; (loss, logits, labels)."""
        if module is not runner and mark_step is not None:
            mark_step()
        with step_autocast():
            outputs = module(*images)
        loss, logits, y = job.step.loss(model, outputs, batches)
        # Without fp16 the scaler is off: scale() returns the loss, step() is opt.step().
        scaler.scale(loss).backward()
        return loss, logits, y

    bar = tqdm(total=job.epochs, initial=start, desc=desc, disable=not (progress and dist.is_main()),
               unit="ep")
    for epoch in range(start, job.epochs):
        t0 = time.perf_counter()
        model.train(job.train_mode)
        if job.before_epoch is not None:
            job.before_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = torch.zeros((), device=device, dtype=torch.long)
        epoch_lr = opt.param_groups[0]["lr"]
        for batches in zip(*job.loaders, strict=True):
            opt.zero_grad(set_to_none=True)
            images = job.step.inputs(batches)
            use_compiled = compiled is not runner and all(len(x) == full_batch for x in images)
            try:
                loss, logits, y = forward_backward(compiled if use_compiled else runner, images, batches)
            except Exception as exc:
                if not use_compiled:
                    raise
                # Compilation is lazy: it fails here, in the first (or a later) compiled step. The same
                # batch runs again in eager mode (a failed forward may have moved BN statistics once).
                job.compile_error = _compile_warning(exc, desc)
                compiled = runner
                opt.zero_grad(set_to_none=True)
                loss, logits, y = forward_backward(runner, images, batches)
            scaler.step(opt)
            scaler.update()
            # The rate this step used (history's lr: with the official schedule, the rate after the
            # last step already belongs to the next epoch).
            epoch_lr = opt.param_groups[0]["lr"]
            sched.step()
            if job.after_step is not None:
                job.after_step()
            # Accumulate on the device: reading a number here would stall the GPU every step.
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if job.after_epoch is not None:
            job.after_epoch()
        dist.sum_across(loss_sum, correct, seen)
        seen = int(seen)
        train_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(train_loss):
            bar.close()
            raise LtrError(
                f"the training loss became {train_loss} in epoch {epoch + 1}; the last good "
                f"checkpoint (epoch {start if not history else history[-1]['epoch']}) is kept "
                f"in {out}. Try a lower --lr (now {job.lr})"
            )
        row = {
            "epoch": epoch + 1,
            "lr": epoch_lr,  # the rate of the epoch's last step
            "train_loss": round(train_loss, 6),
            "train_acc": round(100.0 * float(correct) / max(seen, 1), 4),
            "test_acc": "",
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if (epoch + 1) % job.eval_every == 0 or epoch + 1 == job.epochs:
            # Plain and flip-averaged accuracy at every evaluated epoch (WB's reported figure is the flip
            # accuracy of the epoch with the best plain accuracy), and the test features' Fisher ratio
            # from the same pass (no second pass over the data).
            feats, predict = None, job.predict
            if predict is None:
                feats = view_features(model, test_x, precision)
                predict = feature_predictor(model, feats)
                if epoch + 1 == job.epochs:  # the final model's: its evaluation reuses them
                    job.final_features = feats
            for key, flip in (("test_acc", False), ("test_acc_flip", True)):
                row[key] = round(float(
                    per_class_accuracy(predict(flip).argmax(1), test_y, data.num_classes).nanmean()), 4)
            if feats is not None:
                row["test_fdr"] = _fdr_or_blank(feats["plain"], test_y)
        norms = class_norms().cpu().tolist()
        row.update({f"wn_{c}": round(v, 6) for c, v in enumerate(norms)})
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", train=f"{row['train_acc']:.1f}", test=row["test_acc"])
        done = epoch + 1
        out_of_time = limit is not None and done < job.epochs and time.time() >= limit
        if done % ckpt_every == 0 or done == job.epochs or done == stop_after or out_of_time:
            save(done)
        if out_of_time:
            bar.close()
            raise TimeLimitReached(f"time limit reached: {desc} stopped after epoch {done}/{job.epochs} "
                                   f"with its checkpoint in {out}; rerun to resume")
        if stop_after is not None and done >= stop_after and done < job.epochs:
            bar.close()
            return False
    bar.close()
    if start >= job.epochs or job.epochs == 0:
        save(job.epochs)
    return True


def _fdr_or_blank(feats: torch.Tensor, labels: torch.Tensor) -> float | str:
    """The Fisher ratio rounded for history.csv, or "" where it is undefined (a class with one sample)."""
    try:
        return round(fisher_ratio(feats, labels), 4)
    except ValueError:
        return ""


def stage1_feature_analysis(model: nn.Module, data: LTData, test_feats: torch.Tensor, test_y: torch.Tensor,
                            precision: str) -> dict:
    """Fisher ratio and cone effect of the (plain) test features and the un-augmented training features."""
    train_x = torch.as_tensor(data.train_x, device=test_y.device)
    train_y = torch.as_tensor(data.train_y, device=test_y.device)
    train_feats = extract_features(model, train_x, dtype=autocast_dtype(precision))
    out: dict = {}
    for split, (feats, y) in (("test", (test_feats, test_y)), ("train", (train_feats, train_y))):
        try:
            out[split] = feature_analysis(feats, y)
        except ValueError as exc:  # a class with one sample (tiny synthetic data): say why, no NaN
            out[split] = {"error": str(exc)}
    return out


def _finish(
    out: Path,
    model: nn.Module,
    data: LTData,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    precision: str,
    extra: dict,
    predict: Callable[[bool], torch.Tensor] | None = None,
) -> dict:
    """Evaluate the last epoch and write metrics.json, which marks the run as finished."""
    dev = test_x.device
    metrics = evaluate(
        model,
        test_x,
        test_y,
        data.counts,
        torch.as_tensor(data.val_idx, device=dev),
        torch.as_tensor(data.heldout_idx, device=dev),
        dtype=autocast_dtype(precision),
        predict=predict,
    )
    metrics.update(extra)
    metrics["precision"] = precision
    # Figures and tables label runs on synthetic files, so they cannot pass for paper results.
    metrics["synthetic_data"] = data.synthetic
    if dist.is_main():
        write_json(out / "metrics.json", metrics)
    return metrics


def _sgd(job: _Job, fused: bool) -> torch.optim.SGD:
    kwargs = dict(lr=job.lr, momentum=job.momentum, weight_decay=job.wd)
    if fused:
        try:
            return torch.optim.SGD(job.params, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):  # an older torch without this device's fused kernel
            pass
    return torch.optim.SGD(job.params, **kwargs)


def _prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _claim(out: Path, stage: str, config: dict, inert: tuple[str, ...] = ()) -> dict | None:
    """claim_run_dir, reading a field that an older config.json lacks as its default (LATER_DEFAULTS).

    inert: fields that do not change this run (stage2_inert_fields); they match whatever was recorded.
    """
    if (out / "config.json").exists():
        prev = read_json(out / "config.json").get("config", {})
        missing = object()
        config = {k: v for k, v in config.items()
                  if k in prev or (k not in inert and LATER_DEFAULTS.get(k, missing) != v)}
        config.update({k: prev[k] for k in inert if k in prev})
    return claim_run_dir(out, stage, config)


# ---------------------------------------------------------------- stage 1


def train_stage1(
    cfg: Stage1Config,
    out: str | os.PathLike | None = None,
    root: str | os.PathLike = "data",
    device: str | torch.device = "auto",
    data: LTData | None = None,
    download: bool = False,
    compile: bool = False,
    precision: str = "auto",
    progress: bool = True,
    ckpt_every: int | None = None,
    stop_after: int | None = None,
    compile_mode: str = "default",
) -> dict:
    """Feature learning: train (or resume, or reuse) a stage-1 run and return its metrics.

    compile: torch.compile the step (compile_mode default | reduce-overhead = CUDA graphs), falling back
    to eager with a warning. ckpt_every: epochs between checkpoints (default: default_ckpt_every).

    precision: auto (bf16 on GPUs with native bf16, fp16 with a GradScaler on older GPUs, fp32 on CPU and
    with fidelity "official") | bf16 | fp16 | fp32; the choice is recorded in config.json.
    """
    validate_stage1(cfg)
    out = Path(out) if out is not None else Path("exp/stage1") / run_name(cfg)
    config = asdict(cfg)
    done = _claim(out, "stage1", config)
    if done is not None:
        return done
    check_precision(precision)
    check_compile_mode(compile_mode)
    dev = dist.init(resolve_device(device))
    asked, precision = precision, resolve_precision(precision, dev, cfg.fidelity)
    backend = set_backend_flags(dev, precision)
    ckpt_every = default_ckpt_every(dev) if ckpt_every is None else ckpt_every
    dist.check_batch(cfg.batch_size)
    rank, world = dist.world()
    if data is None:
        data = load_cifar_lt(root, cfg.dataset, cfg.imbalance, download=download)
    main = dist.is_main()
    if main:
        out.mkdir(parents=True, exist_ok=True)
    with RunLock(out) if main else contextlib.nullcontext():
        if main and not (out / "config.json").exists():
            runtime = {**runtime_info(dev, precision, compile, str(root)), "precision_asked": asked,
                       "processes": world, "compile_mode": compile_mode if compile else None, **backend}
            write_json(out / "config.json", {"stage": "stage1", "config": config, "runtime": runtime})
        dist.barrier()
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model, data.num_classes)
        loaders = [DeviceLoader(
            data.train_x, data.train_y, cfg.batch_size, dev, seed=cfg.seed,
            num_classes=data.num_classes, shard=(rank, world),
        )]
        step = plain_step(make_loss("ce", data.counts, dev))
        if cfg.method == "aux-balanced":
            # Built after the backbone, so its initial weights equal those of a CE run with this seed.
            add_aux_heads(model, data.num_classes, cfg.ssl)
            balanced = DeviceLoader(
                data.train_x, data.train_y, cfg.batch_size, dev, seed=cfg.seed + BALANCED_SEED_OFFSET,
                sampling="balanced", num_classes=data.num_classes, shard=(rank, world),
            )
            loaders = [balanced, loaders[0]]
            step = aux_balanced_step(cfg.aux_weight, cfg.ssl == "rotation")
        elif cfg.method == "etf-fr":
            # Hasegawa & Sato: a fixed simplex-ETF classifier (its own generator: the backbone's initial
            # weights equal those of a CE run with this seed), a learnable bias, feature regularisation.
            fix_etf_classifier(model, cfg.seed)
            step = feature_regularized_step(make_loss("ce", data.counts, dev), cfg.feature_reg)
        if world > 1 and dev.type == "cuda":
            # Batch statistics over the whole global batch, as in a single process (NCCL only).
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = _prepare_model(model, dev)
        test_x = torch.as_tensor(data.test_x, device=dev)
        test_y = torch.as_tensor(data.test_y, device=dev)
        job = _Job(
            model=model,
            # Every trained parameter, all under the weight decay (etf-fr's fixed classifier weight is not).
            params=[p for p in model.parameters() if p.requires_grad],
            loaders=loaders,
            step=step,
            epochs=cfg.epochs,
            lr=cfg.lr,
            momentum=cfg.momentum,
            wd=cfg.wd,
            fidelity=cfg.fidelity,
            eval_every=cfg.eval_every,
            train_mode=True,
        )
        t0 = time.perf_counter()
        finished = _fit(
            job, data, test_x, test_y, out, dev, precision, compile, progress,
            f"stage1 {out.name}", ckpt_every, stop_after, compile_mode,
        )
        if not finished:
            return {"finished": False, "epoch": stop_after}
        train_seconds = round(time.perf_counter() - t0, 2)
        # One pass over the test images (plain and mirrored) serves the last epoch's history row, the
        # metrics, the feature analysis and every classifier-only stage 2 on this run (cached here).
        feats = job.final_features or view_features(model, test_x, precision)
        if dist.is_main():
            save_test_features(out, feats, precision)
        return _finish(
            out, model, data, test_x, test_y, precision,
            {"stage": "stage1", "name": out.name, "epochs": cfg.epochs, "method": cfg.method,
             "train_seconds": train_seconds, "compile_error": job.compile_error,
             "features": stage1_feature_analysis(model, data, feats["plain"], test_y, precision)},
            feature_predictor(model, feats),
        )


# ---------------------------------------------------------------- stage 2


def load_stage1(run_dir: str | os.PathLike, num_classes: int | None = None,
                device: str | torch.device = "cpu") -> tuple[nn.Module, Stage1Config]:
    """The finished stage-1 model of a run directory, with its config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise LtrError(
            f"{run_dir} is not a stage-1 run directory (no config.json); train one with "
            "`python -m ltr stage1 --out DIR` and pass that DIR to --from"
        )
    info = read_json(run_dir / "config.json")
    if info.get("stage") != "stage1":
        raise LtrError(f"{run_dir} holds a {info.get('stage')} run; --from needs a stage-1 run")
    if not (run_dir / "metrics.json").exists() or not (run_dir / "ckpt.pt").exists():
        raise LtrError(
            f"the stage-1 run in {run_dir} is not finished (no metrics.json or ckpt.pt); "
            f"rerun its stage1 command to resume it, then retry"
        )
    names = {f.name for f in fields(Stage1Config)}
    cfg = Stage1Config(**{k: v for k, v in info["config"].items() if k in names})
    ckpt = load_checkpoint(run_dir / "ckpt.pt", "cpu")
    # Stage 2 starts from the backbone and its main head; aux-balanced's extra heads are left behind.
    state = {k: v for k, v in ckpt["model"].items() if not k.startswith(AUX_PREFIX)}
    fc_w = state.get("fc.weight")
    classes = int(fc_w.shape[0]) if fc_w is not None else -1
    if num_classes is not None and classes != num_classes:
        raise LtrError(
            f"the checkpoint in {run_dir} has a {classes}-class classifier but the data has "
            f"{num_classes} classes; use a stage-1 run trained on the same dataset"
        )
    model = build_model(cfg.model, classes if classes > 0 else dataset_info(cfg.dataset).num_classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise LtrError(
            f"the checkpoint in {run_dir} does not match a {cfg.model} "
            f"({str(exc).splitlines()[0]}); was it trained with another --model?"
        ) from None
    if cfg.method == "etf-fr":
        model.fc.weight.requires_grad_(False)  # the checkpoint's fixed ETF; stage 2 decides what trains
    return _prepare_model(model, resolve_device(device)), cfg


FEATURES_FILE = "test_features.pt"


@torch.no_grad()
def view_features(model: nn.Module, test_x: torch.Tensor, precision: str = "fp32",
                  batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Pooled features of the test images, plain and mirrored (eval mode, float32): one pass per view."""
    was_training = model.training
    model.eval()
    plain, mirror = [], []
    for start in range(0, len(test_x), batch_size):
        x = normalize(test_x[start : start + batch_size])
        with autocast(x.device.type, autocast_dtype(precision)):
            plain.append(model.features(x).float())
            mirror.append(model.features(torch.flip(x, dims=[3])).float())
    model.train(was_training)
    return {"plain": torch.cat(plain), "mirror": torch.cat(mirror)}


def save_test_features(run_dir: str | os.PathLike, feats: dict[str, torch.Tensor], precision: str) -> None:
    """Cache a stage-1 model's test features in its run directory (atomically; what test_features reads)."""
    cpu = {k: v.cpu() for k, v in feats.items()}
    save_torch(Path(run_dir) / FEATURES_FILE, {**cpu, "precision": precision})


def test_features(run_dir: str | os.PathLike, model: nn.Module, test_x: torch.Tensor,
                  precision: str = "fp32", batch_size: int = 1024) -> dict[str, torch.Tensor]:
    """Pooled test-set features of a finished stage-1 model, plain and mirrored; cached in its run dir.

    With the backbone frozen in eval mode, every test evaluation of a classifier-only stage 2 (and of
    the post-hoc normalisers) is then one matrix product instead of a pass over 10,000 images. Stage 1
    writes the cache when it finishes; runs made before that get it here. The cache records the
    precision it was computed in; another precision computes (and caches) them again. Concurrent
    writers (parallel stage-2 runs) are safe: the file is replaced atomically.
    """
    path = Path(run_dir) / FEATURES_FILE
    if path.exists():
        try:
            cached = torch.load(path, map_location=test_x.device, weights_only=True)
            if (cached.get("precision", "fp32") == precision
                    and cached["plain"].shape[0] == len(test_x) == cached["mirror"].shape[0]):
                return {k: cached[k] for k in ("plain", "mirror")}
        except Exception:  # a damaged cache is only a cache: compute it again
            pass
    feats = view_features(model, test_x, precision, batch_size)
    save_test_features(run_dir, feats, precision)
    return feats


def feature_predictor(model: nn.Module, feats: dict[str, torch.Tensor]) -> Callable[[bool], torch.Tensor]:
    """predict(flip) -> test logits of model.fc on cached features (flip: mean with the mirror's)."""

    @torch.no_grad()
    def predict(flip: bool) -> torch.Tensor:
        logits = model.fc(feats["plain"]).float()
        return 0.5 * (logits + model.fc(feats["mirror"]).float()) if flip else logits

    return predict


def stage1_data_root(run_dir: str | os.PathLike) -> Path:
    """The data root a stage-1 run trained on, as its config.json recorded it."""
    runtime = read_json(Path(run_dir) / "config.json").get("runtime", {})
    for key in ("root_resolved", "root"):
        if runtime.get(key) and Path(runtime[key]).is_dir():
            return Path(runtime[key])
    return Path(runtime.get("root_resolved") or runtime.get("root") or "data")


def trainable_layers(model: nn.Module, which: str) -> list[nn.Module]:
    """The layers stage 2 retrains: fc, or (last2) the final conv and fc."""
    return [model.fc] if which == "fc" else [model.last_conv(), model.fc]


def _stage2_job(cfg: Stage2Config, model: nn.Module, data: LTData,
                dev: torch.device) -> tuple[_Job, Callable[[], dict]]:
    """The job of a stage-2 recipe, and a function giving what metrics.json records about it at the end."""
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    if cfg.reinit:
        # cRT (Kang et al.): a fresh classifier, drawn from the run's seed, retrained on balanced batches.
        model.fc.reset_parameters()
    layers = trainable_layers(model, cfg.trainable)
    params = [p for layer in layers for p in layer.parameters()]
    loss_fn = make_loss(cfg.loss, data.counts, dev, cfg.cb_variant, cfg.cb_beta, cfg.la_tau)
    step = plain_step(loss_fn)
    weights = [layer.weight for layer in layers]
    after_step = after_epoch = before_epoch = class_norms = None
    thresholds: list[float] = []
    report: dict = {}
    if cfg.lws:
        # Only the per-class scales learn; fc.weight and fc.bias stay the stage-1 tensors, bit for bit.
        model.fc = ScaledLinear(model.fc)
        params = [model.fc.scale]

        def class_norms() -> torch.Tensor:
            return model.fc.scale.detach().abs().float() * weight_norms(model)

    elif cfg.loss == "ldam-drw":
        # A cosine classifier (Cao et al.'s NormedLinear) kept in fc as unit rows with a zero bias: fc's
        # logits |f| cos then rank classes as s cos does, so evaluation needs no special case.
        with torch.no_grad():
            model.fc.bias.zero_()
        project_unit_norm(model.fc.weight)
        params = [p for p in params if p is not model.fc.bias]

        def after_step() -> None:
            project_unit_norm(model.fc.weight)

        # DRW: plain LDAM for the first half of the epochs, class-balanced weights (beta) for the second
        # half (Cao et al. switch at epoch 160 of 200 end-to-end; stage 2 here is 10 epochs: epochs 6..10).
        drw_from = cfg.epochs // 2
        cb = class_balanced_weights(data.counts, cfg.cb_beta).to(dev)
        report["drw_from_epoch"] = drw_from + 1

        def before_epoch(epoch: int) -> None:
            loss_fn.weight = cb if epoch >= drw_from else None

        step = cosine_step(loss_fn)
    elif cfg.maxnorm is not None:
        # One threshold per layer, from the stage-1 weights, computed once (SPEC 4).
        thresholds = [maxnorm_threshold(w, cfg.maxnorm) for w in weights]

        def project() -> None:
            for w, delta in zip(weights, thresholds, strict=True):
                project_max_norm(w, delta)

        if cfg.pgd_every == "step":
            after_step = project
        else:
            after_epoch = project
    elif cfg.unit_norm:
        project_unit_norm(model.fc.weight)

        def after_step() -> None:
            project_unit_norm(model.fc.weight)

    report["maxnorm_thresholds"] = thresholds
    for p in params:
        p.requires_grad_(True)
    loader = DeviceLoader(
        data.train_x, data.train_y, cfg.batch_size, dev, seed=cfg.seed,
        sampling=cfg.sampling, num_classes=data.num_classes,
    )
    job = _Job(
        model=model,
        params=params,
        loaders=[loader],
        step=step,
        epochs=cfg.epochs,
        lr=cfg.lr,
        momentum=cfg.momentum,
        wd=cfg.wd,
        fidelity=cfg.fidelity,
        eval_every=cfg.eval_every,
        train_mode=cfg.bn == "train",
        after_step=after_step,
        after_epoch=after_epoch,
        before_epoch=before_epoch,
        class_norms=class_norms,
    )

    def final() -> dict:
        if not cfg.lws:
            return report
        # The classifier that predicts is s_c * (w_c, b_c): report its norms, and the scales themselves.
        return {**report, "weight_norms": class_norms().cpu().tolist(),
                "lws_scales": model.fc.scale.detach().cpu().tolist()}

    return job, final


def train_stage2(
    cfg: Stage2Config,
    out: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    data: LTData | None = None,
    download: bool = False,
    compile: bool = False,
    precision: str = "auto",
    progress: bool = True,
    ckpt_every: int | None = None,
    stop_after: int | None = None,
    compile_mode: str = "default",
) -> dict:
    """Classifier learning (or a post-hoc normaliser) on a stage-1 run; returns its metrics.

    root=None reads the data from where the stage-1 run found it (its config.json). precision as in
    train_stage1 (auto: bf16 / fp16 by GPU, fp32 on CPU).
    """
    validate_stage2(cfg)
    if not cfg.from_run:
        raise LtrError("stage 2 needs --from: the directory of a finished stage-1 run")
    if out is None:
        out = Path("exp/stage2") / Path(cfg.from_run).name / stage2_name(cfg)
    out = Path(out)
    config = asdict(cfg)
    done = _claim(out, "stage2", config, stage2_inert_fields(cfg))
    if done is not None:
        return done
    check_precision(precision)
    check_compile_mode(compile_mode)
    dev = resolve_device(device)
    asked, precision = precision, resolve_precision(precision, dev, cfg.fidelity)
    backend = set_backend_flags(dev, precision)
    ckpt_every = default_ckpt_every(dev) if ckpt_every is None else ckpt_every
    model, s1 = load_stage1(cfg.from_run, None, dev)
    if root is None:
        root = stage1_data_root(cfg.from_run)
    if data is None:
        try:
            data = load_cifar_lt(root, s1.dataset, s1.imbalance, download=download)
        except LtrError as exc:
            raise LtrError(f"{exc} (data root taken from {cfg.from_run}/config.json; pass --root "
                           "to read it from elsewhere)") from None
    if model.fc.out_features != data.num_classes:
        raise LtrError(
            f"the stage-1 classifier has {model.fc.out_features} classes but the data has "
            f"{data.num_classes}; use a stage-1 run trained on this dataset"
        )
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        if not (out / "config.json").exists():
            write_json(
                out / "config.json",
                {"stage": "stage2", "config": config, "stage1": asdict(s1),
                 "runtime": {**runtime_info(dev, precision, compile, str(root)), "precision_asked": asked,
                             "compile_mode": compile_mode if compile else None, **backend}},
            )
        test_x = torch.as_tensor(data.test_x, device=dev)
        test_y = torch.as_tensor(data.test_y, device=dev)
        extra = {"stage": "stage2", "name": out.name, "from_run": str(cfg.from_run), "loss": cfg.loss,
                 "cb_variant": cfg.cb_variant if cfg.loss == "cb" else None}
        predict = None
        if cfg.trainable == "fc" and cfg.bn == "eval":
            # The backbone never changes here, so its test features are computed once per stage-1 run.
            predict = feature_predictor(model, test_features(cfg.from_run, model, test_x, precision))
        if cfg.posthoc is not None:
            if cfg.posthoc == "l2norm":
                l2_normalize(model.fc.weight)
            elif cfg.posthoc == "tau-norm":
                tau_normalize(model.fc.weight, cfg.tau)
            elif cfg.posthoc == "mla":
                # Rows and bias divided by prior_c ** tau: every evaluation sees logit_c / prior_c ** tau.
                multiplicative_logit_adjust(model.fc, data.counts, cfg.tau)
            else:
                # In the bias, so that every evaluation (plain, flip, marginal likelihood) sees it.
                logit_adjust_bias(model.fc.bias, data.counts, cfg.la_tau)
            save_torch(out / "ckpt.pt", {"model": model.state_dict(), "epoch": 0, "history": []})
            return _finish(out, model, data, test_x, test_y, precision,
                           {**extra, "epochs": 0, "posthoc": cfg.posthoc, "train_seconds": 0.0}, predict)

        job, report = _stage2_job(cfg, model, data, dev)
        # LWS swaps model.fc for a scaled copy: predict through whatever fc is now.
        job.predict = predict
        t0 = time.perf_counter()
        finished = _fit(
            job, data, test_x, test_y, out, dev, precision, compile, progress,
            f"stage2 {out.name}", ckpt_every, stop_after, compile_mode,
        )
        if not finished:
            return {"finished": False, "epoch": stop_after}
        return _finish(
            out, model, data, test_x, test_y, precision,
            {**extra, "epochs": cfg.epochs, **report(),
             "train_seconds": round(time.perf_counter() - t0, 2)},
            predict,
        )


def stage2_from(run: str | os.PathLike, preset: str = "paper", **fields_: object) -> Stage2Config:
    """A stage-2 config on top of a stage-1 run directory, from a preset plus fields."""
    cfg = preset_config("stage2", preset, **fields_)
    return replace(cfg, from_run=str(run))
