"""Configs, the one training loop shared by both stages, run directories, checkpoints and resume."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from .config import (
    Stage1Config,
    Stage2Config,
    preset_config,
    run_name,
    stage2_name,
    validate_stage1,
    validate_stage2,
)
from .data import DeviceLoader, LTData, LtrError, dataset_info, load_cifar_lt, resolve_device
from .losses import make_loss
from .metrics import evaluate, per_class_accuracy, predict_logits, weight_norms
from .models import build_model
from .regularizers import (
    l2_normalize,
    maxnorm_threshold,
    project_max_norm,
    project_unit_norm,
    tau_normalize,
)
from .rundir import (
    RunLock,
    claim_run_dir,
    load_checkpoint,
    read_json,
    runtime_info,
    save_torch,
    write_history,
    write_json,
)

# ---------------------------------------------------------------- schedule


def lr_factor(step: int, steps_per_epoch: int, epochs: int, fidelity: str = "corrected") -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): cosine from 1 to 0."""
    if fidelity == "official":
        # The official code steps CosineAnnealingLR(T_max=epochs) at the START of each epoch,
        # so epoch e (0-based) runs at the rate meant for e + 1.
        epoch = step // max(steps_per_epoch, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch + 1, epochs) / epochs))
    total = max(steps_per_epoch * epochs, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))


# ---------------------------------------------------------------- the loop


@dataclass
class _Job:
    """What one run trains: everything the shared loop needs, built by a stage."""

    model: nn.Module  # the full model (evaluated as a whole)
    params: list[nn.Parameter]  # what the optimizer updates
    loader: DeviceLoader  # training batches
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, targets) -> loss
    epochs: int  # passes over the loader
    lr: float  # peak learning rate
    momentum: float  # SGD momentum
    wd: float  # weight decay
    fidelity: str  # lr schedule flavour
    eval_every: int  # epochs between test evaluations
    train_mode: bool  # model.train() during steps (False keeps BN statistics frozen)
    after_step: Callable[[], None] | None = None  # projection after every optimizer step
    after_epoch: Callable[[], None] | None = None  # projection after every epoch


def _fit(
    job: _Job,
    data: LTData,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    out: Path,
    device: torch.device,
    amp: bool,
    compile: bool,
    progress: bool,
    desc: str,
    ckpt_every: int,
    stop_after: int | None,
) -> bool:
    """Train job for its epochs, resuming from out/ckpt.pt; True when all epochs are done."""
    from tqdm.auto import tqdm

    model = job.model
    opt = torch.optim.SGD(
        job.params,
        lr=job.lr,
        momentum=job.momentum,
        weight_decay=job.wd,
        # One fused kernel for the whole update on CUDA: at batch 64 launches, not FLOPs, dominate.
        **({"fused": True} if device.type == "cuda" else {}),
    )
    spe = len(job.loader)
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
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        job.loader.load_state_dict({"generator": ckpt["loader_rng"].cpu()})
        history = list(ckpt.get("history", []))
        start = int(ckpt["epoch"])
    step_model = torch.compile(model) if compile else model

    def save(epoch: int) -> None:
        save_torch(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "loader_rng": job.loader.state_dict()["generator"],
                "epoch": epoch,
                "history": history,
            },
        )
        write_history(out / "history.csv", history)

    bar = tqdm(total=job.epochs, initial=start, desc=desc, disable=not progress, unit="ep")
    for epoch in range(start, job.epochs):
        t0 = time.perf_counter()
        model.train(job.train_mode)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for x, y in job.loader:
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = step_model(x)
            loss = job.loss_fn(logits, y)
            loss.backward()
            opt.step()
            sched.step()
            if job.after_step is not None:
                job.after_step()
            # Accumulate on the device: reading a number here would stall the GPU every step.
            loss_sum += loss.detach() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if job.after_epoch is not None:
            job.after_epoch()
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
            "lr": opt.param_groups[0]["lr"],
            "train_loss": round(train_loss, 6),
            "train_acc": round(100.0 * float(correct) / max(seen, 1), 4),
            "test_acc": "",
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if (epoch + 1) % job.eval_every == 0 or epoch + 1 == job.epochs:
            preds = predict_logits(model, test_x, amp=amp).argmax(1)
            row["test_acc"] = round(
                float(per_class_accuracy(preds, test_y, data.num_classes).nanmean()), 4
            )
        norms = weight_norms(model).cpu().tolist()
        row.update({f"wn_{c}": round(v, 6) for c, v in enumerate(norms)})
        history.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", train=f"{row['train_acc']:.1f}", test=row["test_acc"])
        done = epoch + 1
        if done % ckpt_every == 0 or done == job.epochs or done == stop_after:
            save(done)
        if stop_after is not None and done >= stop_after and done < job.epochs:
            bar.close()
            return False
    bar.close()
    if start >= job.epochs or job.epochs == 0:
        save(job.epochs)
    return True


def _finish(
    out: Path,
    model: nn.Module,
    data: LTData,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    amp: bool,
    extra: dict,
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
        amp=amp,
    )
    metrics.update(extra)
    write_json(out / "metrics.json", metrics)
    return metrics


def _setup(device: str | torch.device, amp: bool | None, fidelity: str) -> tuple[torch.device, bool]:
    dev = resolve_device(device)
    if amp is None:
        amp = dev.type == "cuda"
    if fidelity == "official":
        amp = False  # the official code trains in fp32
    return dev, bool(amp and dev.type == "cuda")


def _prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


# ---------------------------------------------------------------- stage 1


def train_stage1(
    cfg: Stage1Config,
    out: str | os.PathLike | None = None,
    root: str | os.PathLike = "data",
    device: str | torch.device = "auto",
    data: LTData | None = None,
    download: bool = False,
    compile: bool = False,
    amp: bool | None = None,
    progress: bool = True,
    ckpt_every: int = 1,
    stop_after: int | None = None,
) -> dict:
    """Feature learning: train (or resume, or reuse) a stage-1 run and return its metrics."""
    validate_stage1(cfg)
    out = Path(out) if out is not None else Path("exp/stage1") / run_name(cfg)
    config = asdict(cfg)
    done = claim_run_dir(out, "stage1", config)
    if done is not None:
        return done
    dev, amp = _setup(device, amp, cfg.fidelity)
    if data is None:
        data = load_cifar_lt(root, cfg.dataset, cfg.imbalance, download=download)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):
        if not (out / "config.json").exists():
            write_json(
                out / "config.json",
                {"stage": "stage1", "config": config, "runtime": runtime_info(dev, amp, compile, str(root))},
            )
        torch.manual_seed(cfg.seed)
        model = _prepare_model(build_model(cfg.model, data.num_classes), dev)
        loader = DeviceLoader(
            data.train_x, data.train_y, cfg.batch_size, dev, seed=cfg.seed,
            num_classes=data.num_classes,
        )
        test_x = torch.as_tensor(data.test_x, device=dev)
        test_y = torch.as_tensor(data.test_y, device=dev)
        job = _Job(
            model=model,
            params=list(model.parameters()),
            loader=loader,
            loss_fn=make_loss("ce", data.counts, dev),
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
            job, data, test_x, test_y, out, dev, amp, compile, progress,
            f"stage1 {out.name}", ckpt_every, stop_after,
        )
        if not finished:
            return {"finished": False, "epoch": stop_after}
        return _finish(
            out, model, data, test_x, test_y, amp,
            {"stage": "stage1", "name": out.name, "epochs": cfg.epochs,
             "train_seconds": round(time.perf_counter() - t0, 2)},
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
    fc_w = ckpt["model"].get("fc.weight")
    classes = int(fc_w.shape[0]) if fc_w is not None else -1
    if num_classes is not None and classes != num_classes:
        raise LtrError(
            f"the checkpoint in {run_dir} has a {classes}-class classifier but the data has "
            f"{num_classes} classes; use a stage-1 run trained on the same dataset"
        )
    model = build_model(cfg.model, classes if classes > 0 else dataset_info(cfg.dataset).num_classes)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise LtrError(
            f"the checkpoint in {run_dir} does not match a {cfg.model} "
            f"({str(exc).splitlines()[0]}); was it trained with another --model?"
        ) from None
    return _prepare_model(model, resolve_device(device)), cfg


def trainable_layers(model: nn.Module, which: str) -> list[nn.Module]:
    """The layers stage 2 retrains: fc, or (last2) the final conv and fc."""
    return [model.fc] if which == "fc" else [model.last_conv(), model.fc]


def train_stage2(
    cfg: Stage2Config,
    out: str | os.PathLike | None = None,
    root: str | os.PathLike = "data",
    device: str | torch.device = "auto",
    data: LTData | None = None,
    download: bool = False,
    compile: bool = False,
    amp: bool | None = None,
    progress: bool = True,
    ckpt_every: int = 1,
    stop_after: int | None = None,
) -> dict:
    """Classifier learning (or a post-hoc normaliser) on a stage-1 run; returns its metrics."""
    validate_stage2(cfg)
    if not cfg.from_run:
        raise LtrError("stage 2 needs --from: the directory of a finished stage-1 run")
    if out is None:
        out = Path("exp/stage2") / Path(cfg.from_run).name / stage2_name(cfg)
    out = Path(out)
    config = asdict(cfg)
    done = claim_run_dir(out, "stage2", config)
    if done is not None:
        return done
    dev, amp = _setup(device, amp, "corrected")
    model, s1 = load_stage1(cfg.from_run, None, dev)
    if data is None:
        data = load_cifar_lt(root, s1.dataset, s1.imbalance, download=download)
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
                 "runtime": runtime_info(dev, amp, compile, str(root))},
            )
        test_x = torch.as_tensor(data.test_x, device=dev)
        test_y = torch.as_tensor(data.test_y, device=dev)
        extra = {"stage": "stage2", "name": out.name, "from_run": str(cfg.from_run),
                 "cb_variant": cfg.cb_variant if cfg.loss == "cb" else None}
        if cfg.posthoc is not None:
            if cfg.posthoc == "l2norm":
                l2_normalize(model.fc.weight)
            else:
                tau_normalize(model.fc.weight, cfg.tau)
            save_torch(out / "ckpt.pt", {"model": model.state_dict(), "epoch": 0, "history": []})
            return _finish(out, model, data, test_x, test_y, amp,
                           {**extra, "epochs": 0, "posthoc": cfg.posthoc, "train_seconds": 0.0})

        for p in model.parameters():
            p.requires_grad_(False)
        layers = trainable_layers(model, cfg.trainable)
        params = [p for layer in layers for p in layer.parameters()]
        for p in params:
            p.requires_grad_(True)
        weights = [layer.weight for layer in layers]
        after_step = after_epoch = None
        thresholds: list[float] = []
        if cfg.maxnorm is not None:
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

        torch.manual_seed(cfg.seed)
        loader = DeviceLoader(
            data.train_x, data.train_y, cfg.batch_size, dev, seed=cfg.seed,
            sampling=cfg.sampling, num_classes=data.num_classes,
        )
        job = _Job(
            model=model,
            params=params,
            loader=loader,
            loss_fn=make_loss(cfg.loss, data.counts, dev, cfg.cb_variant, cfg.cb_beta),
            epochs=cfg.epochs,
            lr=cfg.lr,
            momentum=cfg.momentum,
            wd=cfg.wd,
            fidelity="corrected",
            eval_every=cfg.eval_every,
            train_mode=cfg.bn == "train",
            after_step=after_step,
            after_epoch=after_epoch,
        )
        t0 = time.perf_counter()
        finished = _fit(
            job, data, test_x, test_y, out, dev, amp, compile, progress,
            f"stage2 {out.name}", ckpt_every, stop_after,
        )
        if not finished:
            return {"finished": False, "epoch": stop_after}
        return _finish(
            out, model, data, test_x, test_y, amp,
            {**extra, "epochs": cfg.epochs, "maxnorm_thresholds": thresholds,
             "train_seconds": round(time.perf_counter() - t0, 2)},
        )


def stage2_from(run: str | os.PathLike, preset: str = "paper", **fields_: object) -> Stage2Config:
    """A stage-2 config on top of a stage-1 run directory, from a preset plus fields."""
    cfg = preset_config("stage2", preset, **fields_)
    return replace(cfg, from_run=str(run))
