"""Configs, the one training loop shared by both stages, run directories, checkpoints and resume."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .data import DeviceLoader, LTData, LtrError, dataset_info, load_cifar_lt, resolve_device
from .losses import make_loss
from .metrics import evaluate, per_class_accuracy, predict_logits, weight_norms
from .models import MODELS, build_model
from .regularizers import (
    l2_normalize,
    maxnorm_threshold,
    project_max_norm,
    project_unit_norm,
    tau_normalize,
)

# ---------------------------------------------------------------- configs


@dataclass
class Stage1Config:
    """Feature learning (WB stage 1); defaults are the paper's tuned weight-decay recipe."""

    dataset: str = "cifar100"  # cifar100 | cifar10
    imbalance: float = 100.0  # imbalance factor n_max / n_min (ratio)
    model: str = "resnet34"  # backbone name (resnet34 | resnet32 | resnet8)
    method: str = "ce"  # ce = WB stage 1 (cross-entropy on instance batches)
    epochs: int = 200  # passes over the long-tailed training set
    batch_size: int = 64  # images per optimizer step
    lr: float = 0.01  # peak learning rate; cosine to 0
    momentum: float = 0.9  # SGD momentum
    wd: float = 5e-3  # weight decay on every parameter, BN included (0 = the naive model)
    seed: int = 0  # seeds initialisation and batch order
    fidelity: str = "corrected"  # corrected = per-step cosine; official = epoch-stepped, fp32
    eval_every: int = 10  # epochs between test evaluations shown in the progress bar


@dataclass
class Stage2Config:
    """Classifier learning (WB stage 2) on top of a finished stage-1 run."""

    from_run: str = ""  # stage-1 run directory to start from
    loss: str = "ce"  # ce | cb (class-balanced, effective number)
    cb_variant: str = "standard"  # standard = weighted CE; official = softmax + BCE
    cb_beta: float = 0.9999  # beta of the effective number (1 - beta^n) / (1 - beta)
    wd: float = 0.0  # weight decay on the trainable layers (0.1 in the "WD" rows)
    maxnorm: float | None = None  # MaxNorm thresh in (0, 1]; None = no MaxNorm
    pgd_every: str = "step"  # step = project after every step (paper); epoch = official code
    unit_norm: bool = False  # keep classifier rows at unit norm (the "& L2norm" rows)
    posthoc: str | None = None  # l2norm | tau-norm: no training, normalise fc.weight
    tau: float = 1.9  # exponent of tau-norm
    trainable: str = "fc"  # fc | last2 (last conv + fc; our reading of "last two layers")
    bn: str = "eval"  # eval = frozen BN statistics; train = the official code's drift
    sampling: str = "instance"  # instance | balanced (class-uniform batches)
    epochs: int = 10  # passes over the long-tailed training set
    batch_size: int = 64  # images per optimizer step
    lr: float = 0.01  # peak learning rate; cosine to 0
    momentum: float = 0.9  # SGD momentum
    seed: int = 0  # seeds batch order
    eval_every: int = 1  # epochs between test evaluations shown in the progress bar


PRESETS: dict[str, dict[str, dict]] = {
    "paper": {"stage1": {}, "stage2": {}},
    # Well under a minute on a 2-core CPU on the synthetic test data; not a paper result.
    "smoke": {
        "stage1": {"model": "resnet8", "epochs": 3, "batch_size": 128, "lr": 0.05, "eval_every": 1},
        "stage2": {"epochs": 2, "batch_size": 128},
    },
}


def preset_config(stage: str, preset: str = "paper", **overrides: object) -> Stage1Config | Stage2Config:
    """A stage's config from a preset, with explicit fields taking precedence."""
    if preset not in PRESETS:
        raise LtrError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    cls = Stage1Config if stage == "stage1" else Stage2Config
    values = {**PRESETS[preset][stage], **{k: v for k, v in overrides.items() if v is not None}}
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise LtrError(f"unknown {stage} config fields {unknown}")
    return cls(**values)


def _fmt(x: float) -> str:
    return f"{x:g}".replace("e-0", "e-")


def run_name(cfg: Stage1Config) -> str:
    """A stage-1 run directory name that says what it is, e.g. cifar100-if100-resnet34-wd5e-3-s0."""
    parts = [cfg.dataset, f"if{_fmt(cfg.imbalance)}", cfg.model]
    if cfg.method != "ce":
        parts.append(cfg.method)
    parts += [f"wd{_fmt(cfg.wd)}", f"e{cfg.epochs}"]
    if cfg.fidelity != "corrected":
        parts.append(cfg.fidelity)
    return "-".join(parts + [f"s{cfg.seed}"])


def validate_stage1(cfg: Stage1Config) -> None:
    """Reject configs that cannot run, naming the field and the fix."""
    dataset_info(cfg.dataset)
    from .data import check_imbalance

    check_imbalance(cfg.imbalance)
    if cfg.model not in MODELS:
        raise LtrError(f"unknown model {cfg.model!r}; choose one of {sorted(MODELS)}")
    if cfg.method != "ce":
        raise LtrError(f"unknown stage-1 method {cfg.method!r}; use 'ce'")
    if cfg.fidelity not in ("corrected", "official"):
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
    choices = {
        "loss": ("ce", "cb"),
        "cb_variant": ("standard", "official"),
        "pgd_every": ("step", "epoch"),
        "trainable": ("fc", "last2"),
        "bn": ("eval", "train"),
        "sampling": ("instance", "balanced"),
        "posthoc": (None, "l2norm", "tau-norm"),
    }
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise LtrError(f"{name}={getattr(cfg, name)!r} is not one of {allowed}")
    if cfg.maxnorm is not None and not (0 < cfg.maxnorm <= 1):
        raise LtrError(f"--maxnorm must be in (0, 1] (the thresh of SPEC 4), got {cfg.maxnorm}")
    if cfg.tau < 0:
        raise LtrError(f"--tau must be >= 0, got {cfg.tau}")
    if cfg.maxnorm is not None and cfg.unit_norm:
        raise LtrError("--maxnorm and --unit-norm both constrain the rows; pick one")
    if cfg.posthoc is not None:
        trained = {
            "--loss cb": cfg.loss != "ce",
            "--wd": cfg.wd != 0,
            "--maxnorm": cfg.maxnorm is not None,
            "--unit-norm": cfg.unit_norm,
            "--trainable last2": cfg.trainable != "fc",
            "--bn train": cfg.bn != "eval",
            "--sampling balanced": cfg.sampling != "instance",
        }
        clash = [flag for flag, on in trained.items() if on]
        if clash:
            raise LtrError(
                f"--posthoc {cfg.posthoc} normalises a trained classifier without training; "
                f"it cannot be combined with {', '.join(clash)}. Drop those flags, or drop "
                "--posthoc to retrain"
            )


def stage2_name(cfg: Stage2Config) -> str:
    """A stage-2 run directory name from its recipe, e.g. cb-wd0.1-max0.1-s0."""
    if cfg.posthoc:
        return cfg.posthoc + (f"{_fmt(cfg.tau)}" if cfg.posthoc == "tau-norm" else "")
    parts = [cfg.loss] if cfg.loss == "ce" or cfg.cb_variant == "standard" else ["cb-official"]
    if cfg.trainable != "fc":
        parts.insert(0, cfg.trainable)
    if cfg.sampling != "instance":
        parts.append(cfg.sampling)
    if cfg.wd:
        parts.append(f"wd{_fmt(cfg.wd)}")
    if cfg.maxnorm is not None:
        parts.append(f"max{_fmt(cfg.maxnorm)}" + ("-epoch" if cfg.pgd_every == "epoch" else ""))
    if cfg.unit_norm:
        parts.append("unitnorm")
    if cfg.bn != "eval":
        parts.append("bntrain")
    return "-".join(parts + [f"e{cfg.epochs}", f"s{cfg.seed}"])


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


# ---------------------------------------------------------------- run directories


def git_commit() -> str:
    """The commit of the checkout this package runs from, or 'unknown'."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write a file by temp file + rename, so a reader never sees half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: object) -> None:
    """Atomic, indented JSON."""
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def save_torch(path: Path, obj: object) -> None:
    """Atomic torch.save."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_atomic(path, buf.getvalue())


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict:
    """torch.load with weights_only=True and an error that says what is wrong."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise LtrError(
            f"{path} is corrupt or not an ltr checkpoint ({type(exc).__name__}); delete it to "
            "retrain this run, or point to the right run directory"
        ) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise LtrError(f"{path} is not an ltr checkpoint (no 'model' entry)")
    return ckpt


def read_json(path: Path) -> dict:
    """Read a JSON file, with a clear error when it is damaged."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise LtrError(f"{path} is not valid JSON ({exc}); delete the run directory") from None


class RunLock:
    """An O_EXCL lock file, so two processes never write one run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self.held = False

    def __enter__(self) -> RunLock:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self._holder_alive():
                    raise LtrError(
                        f"another process ({self.path.read_text().strip()}) is writing "
                        f"{self.path.parent}; wait for it to finish or choose another --out"
                    ) from None
                self.path.unlink(missing_ok=True)  # left by a process that died
                continue
            os.write(fd, me.encode())
            os.close(fd)
            self.held = True
            return self
        raise LtrError(f"could not lock {self.path.parent}")

    def _holder_alive(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return False
        if host != socket.gethostname():
            return True  # cannot check another machine: assume it is alive
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def __exit__(self, *exc: object) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)


def _runtime(device: torch.device, amp: bool, compile: bool, root: str) -> dict:
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "amp_bf16": amp,
        "compile": compile,
        "root": str(root),
        "ltr_version": __version__,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _claim_run_dir(out: Path, stage: str, config: dict) -> dict | None:
    """Check an existing run directory: finished -> its metrics; another config -> refuse."""
    cfg_path = out / "config.json"
    if cfg_path.exists():
        old = read_json(cfg_path)
        if old.get("stage") != stage:
            raise LtrError(
                f"{out} holds a {old.get('stage')} run, not a {stage} run; choose another --out"
            )
        prev = old.get("config", {})
        diff = sorted(k for k in set(prev) | set(config) if prev.get(k) != config.get(k))
        if diff:
            detail = ", ".join(f"{k}: {prev.get(k)!r} -> {config.get(k)!r}" for k in diff)
            raise LtrError(
                f"{out} holds a run with a different config ({detail}); it is kept as it is. "
                "Choose another --out, or delete that directory to redo it"
            )
        if (out / "metrics.json").exists():
            return read_json(out / "metrics.json")
    return None


def _write_history(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, buf.getvalue())


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
        foreach=device.type == "cuda",
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
        _write_history(out / "history.csv", history)

    bar = tqdm(total=job.epochs, initial=start, desc=desc, disable=not progress, unit="ep")
    for epoch in range(start, job.epochs):
        t0 = time.perf_counter()
        model.train(job.train_mode)
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        for x, y in job.loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                logits = step_model(x)
            loss = job.loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
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
    done = _claim_run_dir(out, "stage1", config)
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
                {"stage": "stage1", "config": config, "runtime": _runtime(dev, amp, compile, str(root))},
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
    done = _claim_run_dir(out, "stage2", config)
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
                 "runtime": _runtime(dev, amp, compile, str(root))},
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


def iter_runs(root: str | os.PathLike) -> Iterable[Path]:
    """Every finished run directory (one holding metrics.json) below root."""
    return sorted(p.parent for p in Path(root).rglob("metrics.json"))
