"""Fast inference modes stay close to the float32 reference."""

import numpy as np
import pytest
import torch
from conftest import make_tiny_vit

from birder.errors import BirderError
from birder.inference.classification import infer_batch
from birder.inference.optimize import optimize_for_inference, quantize_int8_static


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randn(16, 3, 32, 48, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize(
    ("mode", "tolerance"), [("float32", 0.0), ("bfloat16", 0.03), ("float16", 0.01), ("int8", 0.03)]
)
def test_mode_agrees_with_float32(batch: torch.Tensor, mode: str, tolerance: float) -> None:
    reference = make_tiny_vit(num_classes=10)
    (expected, expected_embedding) = infer_batch(reference, batch, return_embedding=True)
    fast = optimize_for_inference(make_tiny_vit(num_classes=10), mode)
    (probs, embedding) = infer_batch(fast, batch, return_embedding=True)
    assert probs.dtype == np.float32 and probs.shape == expected.shape
    assert np.abs(probs - expected).max() <= tolerance
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-3)
    assert embedding.shape == expected_embedding.shape
    if mode == "float32":
        np.testing.assert_array_equal(probs, expected)


def test_float_modes_convert_weights_once() -> None:
    net = optimize_for_inference(make_tiny_vit(), "bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_int8_quantizes_every_linear_layer() -> None:
    float_net = make_tiny_vit()
    linears = {name: m for (name, m) in float_net.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"encoder.block.0.attn.qkv", "encoder.block.1.mlp.3", "classifier"} <= set(linears)
    quantized = optimize_for_inference(float_net, "int8")
    dynamic_linear = torch.ao.nn.quantized.dynamic.Linear
    # Every float linear layer is replaced, at the same place, by a dynamically quantized one with int8 weights.
    for name, linear in linears.items():
        replacement = quantized.get_submodule(name)
        assert type(replacement) is dynamic_linear, name
        assert replacement.weight().dtype == torch.qint8, name
        assert (replacement.in_features, replacement.out_features) == (linear.in_features, linear.out_features)
    # ... and nothing else: no float linear layer is left, no other layer became a quantized one.
    assert not [name for (name, m) in quantized.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {name for (name, m) in quantized.named_modules() if isinstance(m, dynamic_linear)} == set(linears)
    # Layers that are not linear stay float (the patch embedding is a convolution).
    assert type(quantized.conv_proj) is torch.nn.Conv2d and quantized.conv_proj.weight.dtype == torch.float32
    # A new module: the float network is left as it was.
    assert all(type(float_net.get_submodule(name)) is torch.nn.Linear for name in linears)


def test_unknown_mode_is_a_clear_error() -> None:
    with pytest.raises(BirderError, match="int4"):
        optimize_for_inference(make_tiny_vit(), "int4")


def test_static_int8_without_torchao_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if the int8 extra were not installed
    with pytest.raises(BirderError, match=r"birder\[int8\]"):
        quantize_int8_static(make_tiny_vit(), (torch.randn(2, 3, 32, 48),))


@pytest.mark.slow
def test_static_int8_agrees_with_float32_at_any_batch_size(batch: torch.Tensor) -> None:
    # About 40 s on 2 cores: export, calibration, then inductor compiles once per batch-size kind.
    pytest.importorskip("torchao")
    with torch.no_grad():
        expected = torch.softmax(make_tiny_vit(num_classes=10)(batch), dim=1)
    quantized = quantize_int8_static(make_tiny_vit(num_classes=10), (batch,))
    for rows in (16, 5, 1):
        probs = torch.softmax(quantized(batch[:rows]), dim=1)
        assert probs.shape == (rows, 10)
        assert (probs - expected[:rows]).abs().max() <= 0.03
