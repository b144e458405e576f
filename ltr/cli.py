"""Command line: argument parsing only; every subcommand turns flags into a config and calls ltr."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from .config import CB_VARIANTS, FIDELITIES, PRESETS, stage2_recipe_fields
from .data import check_imbalance, load_cifar_lt
from .engine.checkpoint import DEADLINE_ENV
from .engine.cifar_files import dataset_info, download, verify
from .engine.dist import is_main
from .engine.precision import PRECISIONS
from .engine.step import COMPILE_MODES
from .errors import LtrError, RunInterrupted, TimeLimitReached

PRESET_NAMES = " | ".join(PRESETS)


def _add_io(p: argparse.ArgumentParser, root: str | None, root_note: str, out_help: str) -> None:
    """Flags every command that trains shares (stage1, stage2, compare, table1, sweep)."""
    p.add_argument("--root", default=root, help=f"data root holding cifar-100-python/ (default: {root_note})")
    p.add_argument("--download", action="store_true", help="fetch the dataset if it is missing")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (CUDA)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto (default): bf16 on GPUs of compute capability >= 8.0, fp16 + GradScaler on "
                        "older ones, fp32 on CPU and with --fidelity official")
    p.add_argument("--preset", default="paper", help=f"{PRESET_NAMES} (explicit flags override it)")
    p.add_argument("--out", default=None, help=out_help)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_runtime(p: argparse.ArgumentParser, root: str | None = "data", root_note: str = "data") -> None:
    """Flags every single-run command shares (stage1, stage2)."""
    _add_io(p, root, root_note, "run directory (default: derived from the config)")
    _add_compile_mode(p, "")
    p.add_argument("--json", action="store_true", help="print the final metrics as one JSON object")


def _add_compile_mode(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--compile-mode", default=None, choices=COMPILE_MODES,
                   help=f"implies --compile{what}: default or reduce-overhead (CUDA graphs)")


def _add_time_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="checkpoint, exit (code 3) at the first epoch boundary after SECONDS; rerun resumes")


def _add_general(p: argparse.ArgumentParser, epochs: str, every: str) -> None:
    """The training flags stage 1 and stage 2 share (defaults: the paper preset's)."""
    p.add_argument("--epochs", type=int, default=None, help=f"epochs (paper: {epochs})")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (paper: 64)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (paper: 0.01)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    p.add_argument("--eval-every", type=int, default=None, help=f"epochs between test evaluations ({every})")


def _add_plan(p: argparse.ArgumentParser, name: str, out_note: str) -> None:
    """Flags shared by the planned multi-run commands (table1, compare, sweep)."""
    _add_io(p, "data", "data", f"output folder (default: exp/{name}[-PRESET]){out_note}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in a worker (default 1)")
    p.add_argument("--allow-cpu", action="store_true", help="run the paper preset without a GPU")
    p.add_argument("--no-figures", action="store_true", help="skip the figures")


def _add_tuned(p: argparse.ArgumentParser, table: str) -> None:
    p.add_argument("--tuned", nargs="+", default=None, metavar="SWEEP_DIR",
                   help=f"use the values these sweeps chose on validation; writes {table}-tuned.md / .csv")


def build_parser() -> argparse.ArgumentParser:
    """The `ltr` argument parser."""
    parser = argparse.ArgumentParser(
        prog="ltr", description="Long-tailed recognition via weight balancing (WB, CVPR 2022) on CIFAR-LT.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_data_command, _add_stage1_command, _add_stage2_command, _add_compare_command,
                _add_table1_command, _add_sweep_command):
        add(sub)
    from .experiments import bench

    bench.add_arguments(sub.add_parser("bench", help="time ltr's step against a DataLoader/PIL loop"))
    return parser


def _add_data_command(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="build CIFAR-LT and print its split sizes, groups and profile")
    d.add_argument("--root", default="data", help="data root (default: data)")
    d.add_argument("--dataset", default="cifar100", help="cifar100 | cifar10")
    d.add_argument("--imbalance", default="100", help="imbalance factor n_max / n_min (>= 1)")
    d.add_argument("--download", action="store_true", help="fetch the dataset if it is missing")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--verify", action="store_true", help="check the files' md5 values (exit 2 on a mismatch)")


def _add_stage1_command(sub: argparse._SubParsersAction) -> None:
    s1 = sub.add_parser("stage1", help="feature learning: train a backbone (CE, or aux-balanced)")
    s1.add_argument("--method", default=None, help="ce (WB) | aux-balanced | etf-fr (Hasegawa & Sato)")
    s1.add_argument("--feature-reg", type=float, default=None, help="etf-fr: weight of ||f||^2 / 2 (0.01)")
    s1.add_argument("--aux-weight", type=float, default=None, help="aux-balanced: weight of CE_instance (1)")
    s1.add_argument("--ssl", default=None, help="aux-balanced: rotation = add a 4-way rotation head")
    s1.add_argument("--dataset", default=None, help="cifar100 | cifar10")
    s1.add_argument("--imbalance", default=None, help="imbalance factor (default 100)")
    s1.add_argument("--model", default=None, help="resnet34 | resnet32 | resnet8")
    s1.add_argument("--wd", type=float, default=None, help="weight decay (paper: 5e-3; naive: 0)")
    _add_general(s1, "200", "10")
    s1.add_argument("--fidelity", default=None, help="corrected | official (the official quirks)")
    s1.add_argument("--ckpt-every", type=int, default=None, help="epochs between checkpoints (CPU 1, GPU 10)")
    _add_runtime(s1)
    _add_time_limit(s1)


def _add_stage2_command(sub: argparse._SubParsersAction) -> None:
    s2 = sub.add_parser("stage2", help="classifier learning on a finished stage-1 run")
    s2.add_argument("--from", dest="from_run", required=True, help="stage-1 run directory")
    s2.add_argument("--loss", default=None, help="ce | cb | la (logit-adjusted) | bs | ldam-drw")
    s2.add_argument("--cb-variant", default=None, choices=CB_VARIANTS,
                    help="official (default): WB's BCE on softmax | standard: weighted cross-entropy")
    s2.add_argument("--wd", type=float, default=None, help="weight decay on the classifier (0.1)")
    s2.add_argument("--maxnorm", type=float, default=None, help="MaxNorm thresh in (0, 1] (0.1)")
    s2.add_argument("--pgd-every", default=None, help="step | epoch: when MaxNorm projects")
    s2.add_argument("--unit-norm", action="store_true", default=None, help="keep rows at unit norm")
    s2.add_argument("--posthoc", default=None,
                    help="l2norm | tau-norm | logit-adjust | mla (multiplicative): adjust fc, no training")
    s2.add_argument("--tau", type=float, default=None, help="tau of tau-norm (1.9) or --posthoc mla (0.65)")
    s2.add_argument("--la-tau", type=float, default=None, help="tau of --posthoc logit-adjust, --loss la (1)")
    s2.add_argument("--lws", action="store_true", default=None, help="learn only a per-class logit scale")
    s2.add_argument("--reinit", action="store_true", default=None, help="re-initialise fc first")
    s2.add_argument("--crt", action="store_true", help="cRT: shorthand for --sampling balanced --reinit")
    s2.add_argument("--trainable", default=None, help="fc | last2 (last conv + fc)")
    s2.add_argument("--bn", default=None, help="eval | train (train = the official code's drift)")
    s2.add_argument("--sampling", default=None, help="instance | balanced")
    s2.add_argument("--fidelity", default=None, choices=FIDELITIES,
                    help="corrected (default): per-step cosine | official: WB's stage 2 as its code runs it")
    _add_general(s2, "10", "1")
    _add_runtime(s2, None, "the root its stage-1 run recorded")


def _add_compare_command(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("compare", help="WB beside aux-balanced and cRT, LWS, LA, BS, LDAM-DRW baselines")
    _add_plan(c, "compare", "; a table1 folder of the same preset reuses its stage-1 runs")
    _add_tuned(c, "compare")


def _add_table1_command(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("table1", help="regenerate WB Table 1 (and Table 2) with every run it needs")
    _add_plan(t, "table1", "")
    t.add_argument("--imbalance", nargs="+", default=["100"], help="imbalance factors (default: 100)")
    t.add_argument("--dataset", default="cifar100", help="cifar100 | cifar10 (WB's tables: cifar100)")
    _add_compile_mode(t, " (stage 1 only)")
    _add_time_limit(t)
    _add_tuned(t, "table1")
    t.add_argument("--cb-variant", default=None, choices=[*CB_VARIANTS, "both"],
                   help="the CB rows' loss: official (WB's, default) | standard | both, side by side")
    t.add_argument("--fidelity", default="corrected", choices=FIDELITIES,
                   help="stage 2's: corrected (default) | official (writes table1-official.md)")


def _add_sweep_command(sub: argparse._SubParsersAction) -> None:
    from .experiments.tuning import KINDS

    w = sub.add_parser("sweep", help="tune weight decay, tau or MaxNorm on validation (WB Figure 4)")
    w.add_argument("kind", choices=list(KINDS), help="what to tune (docs/cli.md describes each)")
    w.add_argument("--values", type=float, nargs="*", default=None,
                   help="grid values (default: the kind's grid); with --search bayes, min and max: the range")
    w.add_argument("--search", default="grid", choices=["grid", "bayes"],
                   help="grid (default) or bayes: Optuna's TPE, resumable (pip install 'ltr[tune]')")
    w.add_argument("--trials", type=int, default=20, help="--search bayes: trials (default 20)")
    w.add_argument("--from", dest="from_run", default=None,
                   help="start from this finished stage-1 run (default: the preset's, trained if missing)")
    w.add_argument("--imbalance", default="100", help="imbalance factor (default 100)")
    w.add_argument("--dataset", default="cifar100", help="cifar100 | cifar10")
    w.add_argument("--tta", default="flip", choices=["flip", "plain"],
                   help="evaluation the choice uses (default flip, as Table 1)")
    w.add_argument("--sweep-dir", default=None, help="where sweep.csv / .md / .json / .png go")
    _add_plan(w, "table1", "; the runs live beside Table 1's, so its finished runs are reused")
    # argparse takes "-1e-3" for an option (only "-1" / "-0.5" count as numbers); let it reach the
    # value check, which names the problem, instead of "unrecognized arguments".
    w._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.IGNORECASE)


def _data(args: argparse.Namespace) -> int:
    dataset_info(args.dataset)  # an unknown name: a clear error
    if args.verify:
        return _verify(args)
    imbalance = check_imbalance(args.imbalance)
    info = load_cifar_lt(args.root, args.dataset, imbalance, download=args.download).summary()
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{args.dataset}-LT, imbalance factor {imbalance:g}: {info['classes']} classes")
    print(f"train {info['train']} images (long-tailed), test {info['test']} "
          f"(validation {info['val']} + held-out {info['heldout']})")
    g = info["groups"]
    print(f"groups: many {g['many']} (>100 images), medium {g['medium']} (20..100), few {g['few']} (<20)")
    print("images per class:")
    counts = info["counts"]
    for start in range(0, len(counts), 10):
        print(f"  {start:3d}-{min(start + 9, len(counts) - 1):3d}: "
              + " ".join(f"{n:5d}" for n in counts[start : start + 10]))
    return 0


def _verify(args: argparse.Namespace) -> int:
    if args.download:
        download(args.root, args.dataset)  # verifies what it unpacks
    checks = verify(args.root, args.dataset)
    for c in checks:
        state = "ok" if c.ok else ("missing" if c.got is None else f"DIFFERS (md5 {c.got})")
        print(f"{c.file}: {state}" + ("" if c.ok else f", expected md5 {c.expected}"))
    bad = [c for c in checks if not c.ok]
    if bad:
        folder = Path(args.root) / dataset_info(args.dataset).folder
        raise LtrError(
            f"{len(bad)} of {len(checks)} files differ from the official {args.dataset} "
            f"({', '.join(Path(c.file).name for c in bad)}): delete {folder} and run "
            f"`python -m ltr data --root {args.root} --dataset {args.dataset} --download`"
        )
    print(f"all {len(checks)} files of {args.dataset} match the official md5 values")
    return 0


def _report(metrics: dict, out: Path, as_json: bool) -> None:
    if as_json:
        keys = ("plain", "flip", "heldout", "val", "name", "epochs", "train_seconds")
        print(json.dumps({"out": str(out), **{k: metrics.get(k) for k in keys}}))
        return
    print(f"run: {out}")
    for kind in ("plain", "flip"):
        m = {k: "n/a" if v is None else f"{v:.2f}" for k, v in metrics[kind].items()}
        print(f"  {kind:5s} all {m['all']}  many {m['many']}  medium {m['medium']}  few {m['few']}")


def _stage(args: argparse.Namespace) -> int:
    from . import train

    stage = args.command
    skip = {"command", "root", "download", "device", "compile", "precision", "preset", "out", "json", "quiet",
            "compile_mode", "ckpt_every", "time_limit"}
    fields = {k: v for k, v in vars(args).items() if k not in skip}
    if stage == "stage1" and fields.get("imbalance") is not None:
        fields["imbalance"] = check_imbalance(fields["imbalance"])
    if stage == "stage2":
        fields = stage2_recipe_fields(fields)
    cfg = train.preset_config(stage, args.preset, **fields)
    _set_time_limit(args)
    common = dict(root=args.root, device=args.device, download=args.download,
                  compile=args.compile or args.compile_mode is not None,
                  compile_mode=args.compile_mode or "default", precision=args.precision,
                  progress=not args.quiet, ckpt_every=getattr(args, "ckpt_every", None))
    if stage == "stage1":
        out = Path(args.out or Path("exp/stage1") / train.run_name(cfg))
        metrics = train.train_stage1(cfg, out, **common)
    else:
        out = Path(args.out or Path("exp/stage2") / Path(cfg.from_run).name / train.stage2_name(cfg))
        metrics = train.train_stage2(cfg, out, **common)
    if is_main():  # under torchrun the other ranks have nothing to report
        from . import plots

        plots.run_figures(out)
        _report(metrics, out, args.json)
    return 0


def _set_time_limit(args: argparse.Namespace) -> None:
    """--time-limit as the deadline every run (and every worker process) reads from the environment."""
    limit = getattr(args, "time_limit", None)
    if limit is not None:
        if not limit > 0:
            raise LtrError(f"--time-limit must be a positive number of seconds, got {limit}")
        os.environ[DEADLINE_ENV] = f"{time.time() + limit:.3f}"


def _plan_out(args: argparse.Namespace, name: str) -> Path:
    return Path(args.out or (f"exp/{name}" if args.preset == "paper" else f"exp/{name}-{args.preset}"))


def _plan_kwargs(args: argparse.Namespace) -> dict:
    return dict(root=args.root, preset=args.preset, seeds=args.seeds, device=args.device, jobs=args.jobs,
                download=args.download, compile=args.compile, progress=not args.quiet,
                allow_cpu=args.allow_cpu, figures=not args.no_figures, precision=args.precision)


def _print_plan(table: Path, files: dict[str, Path]) -> int:
    print(table.read_text())
    print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def _table1(args: argparse.Namespace) -> int:
    from .experiments.tables import run_table

    imbalances = [check_imbalance(i) for i in args.imbalance]
    out = _plan_out(args, "table1")
    _set_time_limit(args)
    kwargs = {**_plan_kwargs(args), "compile": args.compile or args.compile_mode is not None}
    files = run_table(out=out, imbalances=imbalances, dataset=args.dataset, tuned=args.tuned or (),
                      cb_variant=args.cb_variant, fidelity=args.fidelity,
                      compile_mode=args.compile_mode or "default", **kwargs)
    suffix = ("-tuned" if args.tuned else "") + ("-official" if args.fidelity == "official" else "")
    return _print_plan(out / f"table1{suffix}.md", files)


def _sweep(args: argparse.Namespace) -> int:
    from .experiments.sweep import run_sweep

    files = run_sweep(args.kind, values=args.values, out=_plan_out(args, "table1"),
                      imbalance=check_imbalance(args.imbalance), dataset=args.dataset, from_run=args.from_run,
                      search=args.search, trials=args.trials, tta=args.tta, sweep_dir=args.sweep_dir,
                      **_plan_kwargs(args))
    return _print_plan(files["sweep.md"], files)


def _compare(args: argparse.Namespace) -> int:
    from .experiments.compare import run_compare

    out = _plan_out(args, "compare")
    files = run_compare(out=out, tuned=args.tuned or (), **_plan_kwargs(args))
    return _print_plan(out / ("compare-tuned.md" if args.tuned else "compare.md"), files)


def _bench(args: argparse.Namespace) -> int:
    from .experiments import bench

    return bench.run_cli(args)


COMMANDS = {"data": _data, "stage1": _stage, "stage2": _stage, "table1": _table1, "compare": _compare,
            "sweep": _sweep, "bench": _bench}


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m ltr` and `ltr`; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except TimeLimitReached as exc:
        print(f"ltr {args.command}: stopped: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as exc:  # Ctrl-C: every run keeps its last checkpoint, so no traceback
        said = str(exc) if isinstance(exc, RunInterrupted) else "interrupted; run the same command to resume"
        print(f"ltr {args.command}: {said}", file=sys.stderr)
        return 130
    except LtrError as exc:
        print(f"ltr {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
