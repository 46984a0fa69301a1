"""Fast inference modes: reduced-precision weights and int8 dynamic quantization, and the ``auto`` choice.

Each mode converts the weights once, up front, so no call re-casts them. float32 stays the reference path: no
loader applies a fast mode, only the callers that ask (``birder-predict``, ``birder-serve``, this module).

``auto`` picks bfloat16 where it is native (CUDA from Ampere on, CPUs with AMX or AVX512-BF16) and float32
elsewhere: on a CPU without native bf16 its matmuls are emulated, several times slower than float32. The
environment variable ``BIRDER_DTYPE`` (float32, bfloat16 or float16) overrides the automatic choice, and only it:
the test suite pins float32 with it so exact comparisons hold on every machine.
"""

import logging
import os
import platform
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from birder.errors import BirderError

logger = logging.getLogger(__name__)

FLOAT_MODES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *FLOAT_MODES)
INFERENCE_MODES = (*DTYPE_CHOICES, "int8")
# Mixed precision (``--amp``): autocast in one of these; "auto" (a bare --amp) is float16 on GPUs, bfloat16 on the CPU
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ENV = "BIRDER_DTYPE"
# CPU flags (as Linux names them) of a native bf16 matmul: AMX tiles, or AVX512 dot products of bf16 pairs.
NATIVE_BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype an inference run uses and why (printed once, recorded in run.json and /v1/models)."""

    dtype: str  # float32, bfloat16 or float16
    reason: str

    def __str__(self) -> str:
        return f"{self.dtype} ({self.reason})"


def autocast_dtype(name: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp NAME`` on ``device``: None (no autocast), ``auto``, ``bf16`` or ``fp16``."""
    if name is None:
        return None
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" else torch.float16
    if name not in AMP_DTYPES:
        raise BirderError(f"unknown AMP dtype '{name}' (choose one of: {', '.join(AMP_DTYPES)})")

    return AMP_DTYPES[name]


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags as Linux names them (``avx512_bf16``, ``amx_int8``, ...); empty where unknown.

    Only Linux tells them this way; elsewhere the set is empty and ``auto`` stays on float32 (safe, if slower).
    """
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what the platform says when that is not there."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16(flags: Iterable[str]) -> list[str]:
    """The flags among ``flags`` that make bf16 matmuls native on a CPU (empty: bf16 is emulated)."""
    return sorted(NATIVE_BF16_FLAGS.intersection(flags))


def choose_dtype(
    requested: str,
    device: torch.device | str,
    *,
    flags: Iterable[str] | None = None,
    cuda_capability: tuple[int, int] | None = None,
) -> DtypeChoice:
    """Resolve ``requested`` (``auto`` or a float mode) for ``device``.

    ``flags`` (the CPU's, default: read from the machine) and ``cuda_capability`` (default: asked from the GPU)
    can be given, so the choice can be checked for machines other than this one.
    """
    if requested != "auto":
        if requested not in FLOAT_MODES:
            raise BirderError(f"unknown dtype '{requested}'; choose one of: {', '.join(DTYPE_CHOICES)}")
        return DtypeChoice(requested, "asked for")

    pinned = os.environ.get(DTYPE_ENV)
    if pinned:
        if pinned not in FLOAT_MODES:
            raise BirderError(f"{DTYPE_ENV}={pinned} is not a dtype; use one of: {', '.join(FLOAT_MODES)}")
        return DtypeChoice(pinned, f"{DTYPE_ENV}={pinned}")

    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_choice(cuda_capability or torch.cuda.get_device_capability(device))
    if device.type != "cpu":
        return DtypeChoice("float32", f"auto: float32 on {device.type}")

    native = native_bf16(cpu_flags() if flags is None else flags)
    if native:
        return DtypeChoice("bfloat16", f"auto: native bf16 on this CPU ({', '.join(native)})")
    return DtypeChoice("float32", "auto: this CPU has no native bf16 (no AMX or AVX512-BF16), bf16 would be emulated")


def _cuda_choice(capability: tuple[int, int]) -> DtypeChoice:
    # bf16 tensor cores came with Ampere (8.0); Volta and Turing have float16 ones only.
    if capability >= (8, 0):
        return DtypeChoice("bfloat16", f"auto: CUDA compute capability {capability[0]}.{capability[1]}")
    return DtypeChoice("float16", f"auto: CUDA compute capability {capability[0]}.{capability[1]} (no bf16 cores)")


def _net_device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def optimize_for_inference(net: nn.Module, mode: str = "float32") -> nn.Module:
    """Put ``net`` in eval mode without gradients and convert it for ``mode``; returns the network to use.

    - ``auto``: bfloat16 or float32 as :func:`choose_dtype` decides for the device the network is on (move it to
      its device first); the choice is logged.
    - ``float32`` / ``bfloat16`` / ``float16``: weights and activations in that dtype (inputs are cast by
      ``infer_batch``); half precision pays off on GPUs and on CPUs with native bf16 support.
    - ``int8``: dynamic quantization of every linear layer (weights int8, activations quantized on the fly);
      CPU only. Returns a new module: the float network is left as it was.
    """
    if mode not in INFERENCE_MODES:
        raise BirderError(f"unknown inference mode '{mode}'; choose one of: {', '.join(INFERENCE_MODES)}")

    net.eval()
    net.requires_grad_(False)
    if mode == "auto":
        choice = choose_dtype(mode, _net_device(net))
        logger.info("inference dtype: %s", choice)
        mode = choice.dtype
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


def quantize_int8_static(net: nn.Module, calibration: tuple[torch.Tensor, ...]) -> nn.Module:
    """Static int8 (weights and activations) through PyTorch 2 export quantization, for x86 CPUs.

    torchao's ``X86InductorQuantizer`` annotates ``torch.export``'s graph of ``net.forward``, observers calibrate
    the activation ranges on ``calibration`` (the forward's inputs: real images give the real ranges), and
    ``torch.compile`` (inductor, freezing on) lowers the result to oneDNN int8 kernels (VNNI, AMX-INT8). Returns a
    compiled module computing ``net.forward`` (the logits): the first call compiles (minutes for a ViT-L on a
    few cores). Needs the ``int8`` extra (torchao), imported only here.

    Measured against bfloat16 by ``python -m benchmarks.inference --modes bfloat16 int8-static``: on a CPU without
    AMX it does not beat bfloat16 (README, "Performance"), so ``--quantize int8`` stays the dynamic path.
    """
    try:
        import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    except ImportError as err:
        raise BirderError(f"static int8 needs torchao: pip install 'birder[int8]' ({err})") from None
    if _net_device(net).type != "cpu":
        raise BirderError("static int8 runs on the CPU only; use bfloat16 on GPUs")

    net = optimize_for_inference(net, "float32")
    quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
    with torch.no_grad():
        # Any batch size: the first dimension of every input is dynamic.
        batch = torch.export.Dim.AUTO
        graph = torch.export.export(net, calibration, dynamic_shapes=[{0: batch} for _ in calibration]).module()
        prepared = prepare_pt2e(graph, quantizer)
        prepared(*calibration)
        converted = convert_pt2e(prepared)
    return _FrozenCompiled(torch.compile(converted))


class _FrozenCompiled(nn.Module):
    """Runs a compiled graph with inductor's freezing on, without gradients.

    Freezing folds the int8 weights into the graph as constants, which oneDNN's packed int8 kernels need; it is
    read whenever a call compiles (the first, and a new batch size), so it is set around every call rather than
    for the whole process.
    """

    def __init__(self, compiled: nn.Module) -> None:
        super().__init__()
        self.compiled = compiled

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        with torch.no_grad(), inductor_config.patch(freezing=True):
            return self.compiled(*inputs)
