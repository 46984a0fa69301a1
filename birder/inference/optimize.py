"""Fast inference modes: reduced-precision weights and int8 dynamic quantization.

Each mode converts the weights once, up front, so no call re-casts them. float32 stays the reference path.
"""

import warnings

import torch
from torch import nn

from birder.errors import BirderError

INFERENCE_MODES = ("float32", "bfloat16", "float16", "int8")
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def optimize_for_inference(net: nn.Module, mode: str = "float32") -> nn.Module:
    """Put ``net`` in eval mode without gradients and convert it for ``mode``; returns the network to use.

    - ``float32`` / ``bfloat16`` / ``float16``: weights and activations in that dtype (inputs are cast by
      ``infer_batch``); half precision pays off on GPUs and on CPUs with native bf16 support.
    - ``int8``: dynamic quantization of every linear layer (weights int8, activations quantized on the fly);
      CPU only. Returns a new module: the float network is left as it was.
    """
    if mode not in INFERENCE_MODES:
        raise BirderError(f"unknown inference mode '{mode}'; choose one of: {', '.join(INFERENCE_MODES)}")

    net.eval()
    net.requires_grad_(False)
    if mode in _FLOAT_DTYPES:
        return net.to(_FLOAT_DTYPES[mode])

    device = next(net.parameters()).device
    if device.type != "cpu":
        raise BirderError(f"int8 quantization runs on the CPU only (the network is on {device}); use bfloat16 on GPUs")

    with warnings.catch_warnings():
        # torch.ao's eager dynamic quantization is deprecated in favour of torchao, but is still the fastest
        # int8 path for linear layers on x86 CPUs in this torch release.
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao.*")
        quantized = torch.ao.quantization.quantize_dynamic(net.float(), {nn.Linear}, dtype=torch.qint8)

    return quantized
