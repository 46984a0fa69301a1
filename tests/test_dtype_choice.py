"""``--dtype auto``: bfloat16 where the hardware does it natively, float32 elsewhere; pinned to float32 in tests.

The choice is checked on faked CPU flag sets and GPU capabilities, so it is tested the same on every machine.
"""

import json
from pathlib import Path

import httpx
import pytest
import torch
from conftest import make_tiny_vit
from serve_support import running_server, saved_and_loaded_tiny_model
from test_predict import make_photo_folder, save_tiny_model

from birder.errors import BirderError
from birder.inference import optimize
from birder.inference.optimize import DTYPE_ENV, DtypeChoice, choose_dtype, cpu_flags, optimize_for_inference
from birder.scripts.predict import main as predict_main

# Flag sets as Linux reports them (a relevant excerpt of each machine's /proc/cpuinfo)
AMX = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
AVX512_BF16_ONLY = {"avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni"}
AVX2_ONLY = {"avx", "avx2", "fma", "f16c"}


@pytest.fixture
def unpinned(monkeypatch: pytest.MonkeyPatch) -> None:
    """The automatic choice as a user gets it (the suite pins float32 otherwise)."""
    monkeypatch.delenv(DTYPE_ENV, raising=False)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [(AMX, "bfloat16"), (AVX512_BF16_ONLY, "bfloat16"), (AVX2_ONLY, "float32"), (set(), "float32")],
)
def test_auto_on_cpu_follows_native_bf16(unpinned: None, flags: set[str], expected: str) -> None:
    choice = choose_dtype("auto", "cpu", flags=flags)
    assert choice.dtype == expected
    if expected == "bfloat16":
        assert "avx512_bf16" in choice.reason
    else:
        assert "no native bf16" in choice.reason


@pytest.mark.parametrize(("capability", "expected"), [((9, 0), "bfloat16"), ((8, 0), "bfloat16"), ((7, 5), "float16")])
def test_auto_on_cuda(unpinned: None, capability: tuple[int, int], expected: str) -> None:
    # Whatever the CPU: the network runs on the GPU.
    assert choose_dtype("auto", "cuda", flags=AVX2_ONLY, cuda_capability=capability).dtype == expected


def test_auto_elsewhere_is_float32(unpinned: None) -> None:
    assert choose_dtype("auto", "mps", flags=AMX).dtype == "float32"


def test_an_explicit_dtype_is_kept_and_the_pin_only_changes_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DTYPE_ENV, "bfloat16")
    assert choose_dtype("float32", "cpu", flags=AMX) == DtypeChoice("float32", "asked for")
    assert choose_dtype("auto", "cpu", flags=AVX2_ONLY) == DtypeChoice("bfloat16", f"{DTYPE_ENV}=bfloat16")
    monkeypatch.setenv(DTYPE_ENV, "int3")
    with pytest.raises(BirderError, match="int3"):
        choose_dtype("auto", "cpu")
    with pytest.raises(BirderError, match="float64"):
        choose_dtype("float64", "cpu")


def test_the_suite_is_pinned_to_float32() -> None:
    assert choose_dtype("auto", "cpu", flags=AMX).dtype == "float32"
    assert choose_dtype("auto", "cuda", cuda_capability=(9, 0)).dtype == "float32"


def test_cpu_flags_are_read_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\n")
    assert cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_bf16"}
    assert optimize.cpu_model(cpuinfo) == "Some CPU"
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_optimize_for_inference_auto_converts_for_the_machine(unpinned: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(optimize, "cpu_flags", lambda: frozenset(AVX512_BF16_ONLY))
    assert next(optimize_for_inference(make_tiny_vit(), "auto").parameters()).dtype == torch.bfloat16
    monkeypatch.setattr(optimize, "cpu_flags", lambda: frozenset(AVX2_ONLY))
    assert next(optimize_for_inference(make_tiny_vit(), "auto").parameters()).dtype == torch.float32


def test_no_loader_applies_it(unpinned: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(optimize, "cpu_flags", lambda: frozenset(AMX))
    (net, _) = saved_and_loaded_tiny_model(tmp_path)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_predict_prints_and_records_the_choice(
    unpinned: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setattr(optimize, "cpu_flags", lambda: frozenset(AVX512_BF16_ONLY))
    model = save_tiny_model(tmp_path / "tiny.pt")
    photos = make_photo_folder(tmp_path / "photos")
    base = ["--weights", str(model), str(photos), "-j", "0", "--no-progress", "--device", "cpu"]
    assert predict_main([*base, "--output-dir", str(tmp_path / "auto")]) == 0
    assert capsys.readouterr().out.count("dtype         bfloat16 (auto: native bf16") == 1
    info = json.loads((tmp_path / "auto" / "run.json").read_text())
    assert (info["dtype"], info["settings"]["dtype"]) == ("bfloat16", "bfloat16")
    assert "avx512_bf16" in info["dtype_reason"]

    assert predict_main([*base, "--dtype", "float32", "--output-dir", str(tmp_path / "fp32")]) == 0
    info = json.loads((tmp_path / "fp32" / "run.json").read_text())
    assert (info["dtype"], info["dtype_reason"]) == ("float32", "asked for")


def test_serve_reports_the_choice(unpinned: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from birder.scripts.serve import apply_dtype
    from birder.serve.app import create_app

    monkeypatch.setattr(optimize, "cpu_flags", lambda: frozenset(AMX))
    (net, model_info) = saved_and_loaded_tiny_model(tmp_path)
    (net, choice) = apply_dtype(net, "auto")
    assert choice.dtype == "bfloat16" and next(net.parameters()).dtype == torch.bfloat16
    with running_server(create_app(net, model_info, name="tiny", dtype=choice)) as url:
        described = httpx.get(f"{url}/v1/models").json()["models"][0]
    assert described["dtype"] == "bfloat16" and "amx_bf16" in described["dtype_reason"]
