"""`ltr bench`: result keys and types, the --json output, the FLOP counter. No timing asserts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import pytest
import torch

from ltr.data import LtrError
from ltr.engine.step import COMPILE_MODES as TRAINER_COMPILE_MODES
from ltr.engine.step import StepRunner
from ltr.experiments.bench import (
    COMPILE_MODES,
    add_arguments,
    benchmark,
    estimate_flops,
    format_result,
    gpu_peak,
    run_cli,
)
from ltr.models import build_model


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a busy 2-core machine, two threads per process thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def result() -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return benchmark(model="resnet8", device="cpu", steps=3, warmup=1, batch_size=16)
    finally:
        torch.set_num_threads(before)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltr bench")
    add_arguments(parser)
    return parser


def test_benchmark_keys_types_and_positivity(result: dict) -> None:
    for key in ("ltr_img_s", "reference_img_s", "ratio", "ltr_step_ms", "reference_step_ms"):
        assert isinstance(result[key], float), key
        assert result[key] > 0, key
    assert result["device"] == "cpu"
    assert (result["model"], result["batch_size"], result["steps"], result["warmup"]) == (
        "resnet8", 16, 3, 1)
    assert result["synthetic"] is True and result["data"].startswith("synthetic data")
    assert result["ltr_settings"]["compile_mode"] == "none"
    assert result["est_mfu"] is None and result["reference_est_mfu"] is None  # no CPU peak table
    [variant] = result["variants"]  # CPU default: fp32 eager
    assert (variant["precision"], variant["compile_mode"], variant["est_mfu"]) == ("fp32", "none", None)
    assert result["recommended"]["trainer_flags"] == "--precision fp32"
    assert result["auto_precision"] == "fp32"
    json.dumps(result)  # plain JSON types only


def test_text_report(result: dict) -> None:
    text = format_result(result)
    assert "img/s" in text and "ratio ltr / reference" in text and "synthetic data" in text
    assert "est. MFU" in text and "n/a" in text  # no peak known for a CPU
    assert "recommended for the trainer: --precision fp32" in text


def test_every_precision_and_compile_mode_is_a_variant(monkeypatch: pytest.MonkeyPatch,
                                                      one_thread: None) -> None:
    compiled = []

    def eager_compile(model, **kwargs):  # counts the compiles, runs eagerly (no C++ toolchain needed)
        compiled.append(kwargs)
        return model

    monkeypatch.setattr(torch, "compile", eager_compile)
    r = benchmark(model="resnet8", device="cpu", steps=2, warmup=1, batch_size=8,
                  precision=["fp32", "fp16", "auto"], compile_mode=["none", "default"])
    got = [(v["precision"], v["compile_mode"]) for v in r["variants"]]
    # auto is fp32 on a CPU: listed once.
    assert got == [("fp32", "none"), ("fp32", "default"), ("fp16", "none"), ("fp16", "default")]
    assert compiled == [{"dynamic": False}, {"dynamic": False}]
    assert all(v["img_s"] > 0 and v["step_ms"] > 0 and v["est_mfu"] is None for v in r["variants"])
    assert r["variants"][2]["settings"]["optimizer"] == "SGD fused"  # fp16: the scaler's fused step
    fastest = max(r["variants"], key=lambda v: v["img_s"])
    rec = r["recommended"]
    assert (rec["precision"], rec["compile_mode"]) == (fastest["precision"], fastest["compile_mode"])
    assert rec["trainer_flags"].startswith(f"--precision {fastest['precision']}")
    assert rec["trainer_flags"].endswith("--compile") == (fastest["compile_mode"] == "default")
    assert r["ltr_img_s"] == fastest["img_s"]
    with pytest.raises(LtrError, match="unknown precision"):
        benchmark(model="resnet8", device="cpu", steps=1, precision="fp8")


def test_gpu_peaks_by_name_and_precision() -> None:
    assert gpu_peak("NVIDIA H100 80GB HBM3", "bf16")[0] == pytest.approx(989.4e12)
    assert gpu_peak("NVIDIA H100 PCIe", "fp16")[0] == pytest.approx(756e12)
    assert gpu_peak("NVIDIA A100-SXM4-80GB", "fp32")[0] == pytest.approx(156e12)  # TF32
    assert gpu_peak("NVIDIA L4", "bf16")[0] == pytest.approx(121e12)
    assert gpu_peak("NVIDIA L40S", "bf16")[0] == pytest.approx(362e12)
    assert gpu_peak("Tesla T4", "fp16")[0] == pytest.approx(65e12)
    peak, why = gpu_peak("Tesla T4", "bf16")
    assert peak is None and "no bf16" in why  # emulated: no MFU against a peak it does not have
    assert gpu_peak("Tesla V100-PCIE-32GB", "fp16")[0] == pytest.approx(112e12)
    assert gpu_peak("Tesla V100-SXM2-16GB", "fp16")[0] == pytest.approx(125e12)
    peak, why = gpu_peak("Some Future GPU", "bf16")
    assert peak is None and "--peak-tflops" in why


def test_cli_json_output(capsys: pytest.CaptureFixture[str], tmp_path, one_thread: None) -> None:
    args = _parser().parse_args([
        "--device", "cpu", "--model", "resnet8", "--steps", "1", "--warmup", "0",
        "--batch-size", "4", "--root", str(tmp_path), "--json",
    ])
    assert run_cli(args) == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON object
    for key in ("ltr_img_s", "reference_img_s", "ratio", "device", "model", "batch_size", "steps"):
        assert key in out
    assert out["ratio"] > 0 and out["synthetic"] is True
    assert str(tmp_path) in out["data"]  # says why it fell back to synthetic data


def test_cli_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(_parser().parse_args(["--device", "cpu", "--steps", "0"])) == 2
    assert "--steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parser().parse_args(["--model", "vgg"])


def test_estimate_flops_resnet34_cifar() -> None:
    with torch.device("meta"):  # shapes only, no arithmetic
        model = build_model("resnet34", 100)
    est = estimate_flops(model, (1, 3, 32, 32))
    # Measured 1,159,448,576 MACs (FlopCounterMode; forward hooks on the convs and fc count the same):
    # the 1.16 GMACs of a CIFAR-stem ResNet-34 forward.
    assert est["macs"] == 1_159_448_576
    assert est["flops"] == 2 * est["macs"]
    assert model.training  # the mode is restored
    assert estimate_flops(model, (2, 3, 32, 32))["macs"] == 2 * est["macs"]


def test_estimate_flops_real_tensors_match_meta() -> None:
    small = build_model("resnet8", 10)
    with torch.device("meta"):
        ghost = build_model("resnet8", 10)
    assert estimate_flops(small)["macs"] == estimate_flops(ghost)["macs"] > 0


def test_compile_failure_falls_back_to_eager(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    calls = []

    def broken_compile(model, **kwargs):
        calls.append(kwargs)

        def run(x):
            raise RuntimeError("inductor exploded\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):  # the trainer's own warning
        r = benchmark(model="resnet8", device="cpu", steps=2, warmup=1, batch_size=4,
                      compile_mode="reduce-overhead")
    assert calls == [{"dynamic": False, "mode": "reduce-overhead"}]
    assert r["compile_error"] == "RuntimeError: inductor exploded"
    assert r["ltr_settings"]["compile_mode"] == "none"  # what was actually timed
    assert r["variants"][0]["compile_error"] == r["compile_error"]
    assert r["ltr_img_s"] > 0
    assert "torch.compile failed" in format_result(r)


def test_cuda_default_compiles_at_most_twice() -> None:
    """On CUDA every precision runs eager and only the auto precision compiles (default, reduce-overhead)."""
    from ltr.engine.precision import resolve_precision
    from ltr.experiments.bench import bench_variants

    cuda = torch.device("cuda")
    auto = resolve_precision("auto", cuda)  # bf16 on a GPU with it; fp16 here, where CUDA is absent
    pairs = bench_variants(None, None, cuda)
    compiled = [p for p in pairs if p[1] != "none"]
    assert compiled == [(auto, "default"), (auto, "reduce-overhead")]
    assert {p for p, m in pairs if m == "none"} >= {"fp32", "fp16"}
    assert bench_variants(None, None, torch.device("cpu")) == [("fp32", "none")]
    asked = bench_variants(["fp32", "fp16"], ["none", "default"], cuda)  # asked for: every combination
    assert len([p for p in asked if p[1] != "none"]) == 2 and len(asked) == 4
    assert bench_variants(None, ["default"], cuda) == [(auto, "default")]


def test_times_the_trainers_step_runner(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """Every ltr step is StepRunner.forward_backward, then .update: the trainer's code, not a copy."""
    calls = []
    forward_backward, update = StepRunner.forward_backward, StepRunner.update

    def counted_forward_backward(self, batches):
        calls.append("forward_backward")
        return forward_backward(self, batches)

    def counted_update(self, opt):
        calls.append("update")
        return update(self, opt)

    monkeypatch.setattr(StepRunner, "forward_backward", counted_forward_backward)
    monkeypatch.setattr(StepRunner, "update", counted_update)
    r = benchmark(model="resnet8", device="cpu", steps=2, warmup=1, batch_size=4)
    assert calls == ["forward_backward", "update"] * 3  # 1 warm-up + 2 timed steps
    assert r["ltr_img_s"] > 0
    # Only modes the trainer runs: a recommendation is always a command the trainer takes.
    assert COMPILE_MODES == ("none", *TRAINER_COMPILE_MODES)
    with pytest.raises(SystemExit):
        _parser().parse_args(["--compile-mode", "max-autotune-no-cudagraphs"])


def test_compile_failure_while_timed_is_timed_again(monkeypatch: pytest.MonkeyPatch,
                                                   one_thread: None) -> None:
    """Without warm-up the first timed step compiles and fails: those steps are discarded and redone eager."""

    def broken_compile(model, **kwargs):
        def run(x):
            raise RuntimeError("inductor exploded")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        r = benchmark(model="resnet8", device="cpu", steps=2, warmup=0, batch_size=4, compile_mode="default")
    [variant] = r["variants"]
    assert variant["compile_mode"] == "none" and variant["compile_error"] == "RuntimeError: inductor exploded"
    assert variant["img_s"] > 0
