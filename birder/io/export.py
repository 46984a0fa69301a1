"""Portable model formats: TorchScript (``.pts``), ``torch.export`` (``.pt2``) and ONNX (``.onnx``).

Every export carries the checkpoint metadata (docs/compatibility.md, "Checkpoint files": ``birder_version``, ``task``,
``class_to_idx``, ``signature``, ``rgb_stats``, plus the network name and config override, which Birder ignores): as
extra files inside ``.pts`` and ``.pt2`` archives, and for ONNX in a sidecar ``<name>.onnx_metadata.json`` (also copied
into the model's own ``metadata_props``, so a lone ``.onnx`` file still loads).

A loaded export behaves like a birder network where inference is concerned: ``forward(x)`` gives logits,
``embedding(x)`` the embedding, ``classify(embedding)`` the head, and ``parameters()`` says where it runs, so
:func:`birder.inference.classification.infer_batch` (and the server) take it as they take a network.

Exports are traced at the signature's input size with a dynamic batch dimension: other image sizes need a new
export. ``.pts`` and ``.pt2`` files contain code: load only files you trust.
"""

import contextlib
import json
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from birder.errors import BirderError, CheckpointError, one_line
from birder.io.atomic import fsync_path
from birder.io.calibration import CALIBRATION_KEY, calibration_from_metadata
from birder.io.checkpoint import (
    EXPORT_FORMATS,
    ModelInfo,
    build_metadata,
    get_channels_from_signature,
    get_size_from_signature,
    metadata_from_strings,
    metadata_to_strings,
    model_info_from_metadata,
    require_model_file,
)

ONNX_METADATA_SUFFIX = ".onnx_metadata.json"
T = TypeVar("T")

_METADATA_KEYS = (
    "birder_version",
    "task",
    "class_to_idx",
    "signature",
    "rgb_stats",
    "network",
    "config",
    CALIBRATION_KEY,
)
_REQUIRED_KEYS = ("class_to_idx", "signature", "rgb_stats")
# torch.export specialises a dimension of size 1, so the example batch has two images.
_EXAMPLE_BATCH = 2
_ONNX_INPUT = "input"
_ONNX_OUTPUTS = ("logits", "embedding")


def export_format(path: str | os.PathLike) -> str:
    """The export format of ``path`` by its extension, or a :class:`CheckpointError` listing the known ones."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in EXPORT_FORMATS:
        known = ", ".join(f".{fmt}" for fmt in EXPORT_FORMATS)
        raise CheckpointError(f"{path}: unsupported export extension '.{suffix}' (expected one of: {known})")

    return suffix


def onnx_metadata_path(path: str | os.PathLike) -> Path:
    """The sidecar of an ONNX file: ``model.onnx`` -> ``model.onnx_metadata.json``."""
    return Path(path).with_suffix(ONNX_METADATA_SUFFIX)


def export_model(net: nn.Module, path: str | os.PathLike, model_info: ModelInfo, *, task: str | None = None) -> Path:
    """Write ``net`` to ``path`` as TorchScript, ``torch.export`` or ONNX (by extension), atomically.

    ``.safetensors`` and ``.pt`` are checkpoints, not exports: use :func:`birder.save_model` for them. The
    network is put in eval mode for tracing and given back in the mode it came in.
    """
    path = Path(path)
    file_format = export_format(path)
    metadata = build_metadata(net, model_info, task=task)
    signature = metadata["signature"]
    (height, width) = get_size_from_signature(signature)
    reference = next(net.parameters())
    example = torch.randn(
        _EXAMPLE_BATCH, get_channels_from_signature(signature), height, width, device=reference.device
    ).to(reference.dtype if reference.is_floating_point() else torch.float32)

    was_training = net.training
    net.eval()
    try:
        with _quiet_tracing():
            if file_format == "pts":
                _export_torchscript(net, path, example, metadata)
            elif file_format == "pt2":
                _export_program(net, path, example, metadata)
            else:
                _export_onnx(net, path, example, metadata)
    finally:
        net.train(was_training)

    return path


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    # The tracers warn about things that are fine for a fixed input size (a shape comparison treated as a
    # constant, the deprecation of torch.jit); the user cannot act on them.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")
        yield


@contextlib.contextmanager
def _atomic_export_path(path: Path) -> Iterator[Path]:
    """Yield ``path``'s name inside a private directory beside it; on success every file written there is
    moved into place, the model file last (so it is complete once it is seen).

    Not :func:`birder.io.atomic.atomic_write_path`: the writers name things after the file (the archive's
    inner folder, ONNX's external "<name>.data" weights of models over 2 GB), so the file needs its final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=path.parent) as tmp_dir:
        tmp_path = Path(tmp_dir) / path.name
        yield tmp_path
        for produced in sorted(Path(tmp_dir).iterdir(), key=lambda item: item == tmp_path):
            fsync_path(produced)
            os.replace(produced, path.parent / produced.name)


def _open_archive(path: Path, kind: str, load: Callable[[dict[str, str]], T]) -> tuple[T, dict[str, Any]]:
    """``load(extra_files)`` on a TorchScript or torch.export archive, and the metadata it found in it.

    Both archive kinds are zip files: checking that first gives one clear line instead of torch's logged traceback;
    any error of the loader on a damaged archive becomes one line too.
    """
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: truncated or not a {kind} file (not a zip archive)")

    extra = dict.fromkeys(_METADATA_KEYS, "")
    try:
        loaded = load(extra)
    except (RuntimeError, ValueError, OSError, KeyError, AssertionError, zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: truncated or not a {kind} file ({one_line(err)})") from None

    return (loaded, metadata_from_strings(path, extra))


def _load_jit(path: Path, device: torch.device | str, extra: dict[str, str]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, its files still load
        return torch.jit.load(str(path), map_location=device, _extra_files=extra)


def _check_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    missing = [key for key in _REQUIRED_KEYS if key not in metadata]
    if missing:
        raise CheckpointError(f"{path}: not a birder export (no {', '.join(missing)} metadata)")


# TorchScript


def _export_torchscript(net: nn.Module, path: Path, example: torch.Tensor, metadata: Mapping[str, Any]) -> None:
    with torch.no_grad():
        embedding = net.embedding(example)
        # One traced module with the three methods: they share the weights, and infer_batch can call them.
        scripted = torch.jit.trace_module(
            net, {"forward": example, "embedding": example, "classify": embedding}, check_trace=False
        )
    with _atomic_export_path(path) as tmp_path:
        torch.jit.save(scripted, str(tmp_path), _extra_files=metadata_to_strings(metadata))


def _load_torchscript(path: Path, device: torch.device | str) -> tuple[nn.Module, dict[str, Any]]:
    (model, metadata) = _open_archive(path, "TorchScript", lambda extra: _load_jit(path, device, extra))
    model.eval()
    for param in model.parameters():  # ScriptModules have no requires_grad_()
        param.requires_grad_(False)
    return (model, metadata)


# torch.export


def _export_program(net: nn.Module, path: Path, example: torch.Tensor, metadata: Mapping[str, Any]) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    with torch.no_grad():
        program = torch.export.export(net, (example,), dynamic_shapes=({0: batch},), strict=False)
    with _atomic_export_path(path) as tmp_path:
        torch.export.save(program, str(tmp_path), extra_files=metadata_to_strings(metadata))


def _load_program(path: Path, device: torch.device | str) -> tuple[nn.Module, dict[str, Any]]:
    (program, metadata) = _open_archive(
        path, "torch.export", lambda extra: torch.export.load(str(path), extra_files=extra)
    )
    model = ExportedProgramModel(program.module()).to(device)
    model.requires_grad_(False)
    return (model, metadata)


def _module_path(node: torch.fx.Node) -> str:
    # The innermost module a traced node came from ("" for the top-level network itself).
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else ""


class ExportedProgramModel(nn.Module):
    """A loaded ``.pt2`` program with the network's inference methods.

    The program itself only has ``forward`` (logits, so the file stays usable by plain ``torch.export.load``).
    ``embedding`` and ``classify`` are cut out of its graph: the embedding is the input of the ``classifier``
    module's first operation, the head is that module's operations. The pieces share the program's weights.
    """

    def __init__(self, program_module: torch.fx.GraphModule) -> None:
        super().__init__()
        self.program = program_module
        graph = program_module.graph
        head_nodes = [
            node
            for node in graph.nodes
            if node.op == "call_function"
            and (_module_path(node) == "classifier" or _module_path(node).startswith("classifier."))
        ]
        self._headless = not head_nodes  # a headless encoder: forward already returns the embedding
        if not self._headless:
            embedding_node = head_nodes[0].args[0]
            self.embedding_program = _truncated_module(program_module, embedding_node)
            self.head_program = _head_module(program_module, head_nodes, embedding_node)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x) if self._headless else self.embedding_program(x)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return embedding if self._headless else self.head_program(embedding)

    def train(self, mode: bool = True) -> "ExportedProgramModel":
        # Exported programs are frozen in the mode they were exported in (eval) and refuse train()/eval().
        return self


def _truncated_module(module: torch.fx.GraphModule, new_output: torch.fx.Node) -> torch.fx.GraphModule:
    """``module`` computing ``new_output`` instead of its own output (same inputs, shared weights)."""
    graph = torch.fx.Graph()
    graph._codegen = module.graph._codegen  # keeps the program's calling convention (pytree in, pytree out)
    value_map: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in module.graph.nodes:
        if node.op == "output":
            break
        value_map[node] = graph.node_copy(node, lambda arg: value_map[arg])
    graph.output((value_map[new_output],))
    truncated = torch.fx.GraphModule(module, graph)
    truncated.graph.eliminate_dead_code()  # drops the head; needs the graph to belong to a module first
    truncated.recompile()
    return truncated


def _head_module(
    module: torch.fx.GraphModule, head_nodes: list[torch.fx.Node], embedding_node: torch.fx.Node
) -> torch.fx.GraphModule:
    """The classifier operations of ``module`` as a module of their own: ``embedding -> logits``."""
    graph = torch.fx.Graph()
    value_map: dict[torch.fx.Node, torch.fx.Node] = {embedding_node: graph.placeholder("embedding")}

    def mapped(arg: torch.fx.Node) -> torch.fx.Node:
        if arg not in value_map:  # a weight of the head (get_attr), copied as it is needed
            value_map[arg] = graph.node_copy(arg, mapped)
        return value_map[arg]

    for node in head_nodes:
        value_map[node] = graph.node_copy(node, mapped)
    graph.output(value_map[head_nodes[-1]])
    return torch.fx.GraphModule(module, graph)


# ONNX


class _LogitsAndEmbedding(nn.Module):
    """One ONNX graph, two outputs: the logits first (what plain consumers take), then the embedding."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.net.embedding(x)
        return (self.net.classify(embedding), embedding)


def _export_onnx(net: nn.Module, path: Path, example: torch.Tensor, metadata: Mapping[str, Any]) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    wrapper = _LogitsAndEmbedding(net).eval()
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            None,
            input_names=[_ONNX_INPUT],
            output_names=list(_ONNX_OUTPUTS),
            dynamic_shapes=({0: batch},),
            dynamo=True,
            verbose=False,
        )
    program.model.metadata_props.update(metadata_to_strings(metadata))

    with _atomic_export_path(path) as tmp_path:
        program.save(str(tmp_path))
        sidecar = tmp_path.with_suffix(ONNX_METADATA_SUFFIX)
        sidecar.write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")


def _onnx_runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise BirderError("loading ONNX models needs onnxruntime: pip install 'birder[onnx]'") from None
    return onnxruntime


def _load_onnx(path: Path, device: torch.device | str) -> tuple[nn.Module, dict[str, Any]]:
    model = OnnxModel(path, device=device)
    sidecar = onnx_metadata_path(path)
    legacy_sidecar = Path(f"{path}{ONNX_METADATA_SUFFIX}")  # "model.onnx.onnx_metadata.json" also seen
    for candidate in (sidecar, legacy_sidecar):
        if candidate.is_file():
            try:
                metadata = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{candidate}: metadata sidecar is not valid JSON ({err})") from None
            if not isinstance(metadata, dict):
                raise CheckpointError(f"{candidate}: metadata sidecar must hold a JSON object")
            return (model, metadata)

    # No sidecar: the copy inside the model itself
    return (model, metadata_from_strings(path, model.session.get_modelmeta().custom_metadata_map))


class OnnxModel(nn.Module):
    """An ONNX file run by onnxruntime, with the network's inference methods.

    ``forward`` and ``embedding`` run the whole graph (which gives both); ``classify`` runs only the head, cut
    out of the graph the first time it is needed. Inputs and outputs are torch tensors; onnxruntime computes in
    float32 on the CPU, or on CUDA when ``device`` is a CUDA device and the GPU build of onnxruntime is there.
    """

    def __init__(self, path: str | os.PathLike, *, device: torch.device | str = "cpu") -> None:
        super().__init__()
        ort = _onnx_runtime()
        self.path = Path(path)
        self.device = torch.device(device)
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self._providers = providers
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as err:  # onnxruntime raises its own exception types, not exported under stable names
            raise CheckpointError(f"{path}: truncated or not an ONNX model ({one_line(err)})") from None

        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [output.name for output in self.session.get_outputs()]
        self._head_session: Any = None
        # infer_batch reads the device and dtype from the first parameter; this empty one says "CPU, float32".
        self._device_anchor = nn.Parameter(torch.empty(0), requires_grad=False)

    def _run(self, x: torch.Tensor, outputs: list[str]) -> list[torch.Tensor]:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        results = self.session.run(outputs, {self.input_name: array})
        return [torch.from_numpy(result) for result in results]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, [self.output_names[0]])[0]

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        name = _ONNX_OUTPUTS[1] if _ONNX_OUTPUTS[1] in self.output_names else self.output_names[0]
        return self._run(x, [name])[0]

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        if self._head_session is None:
            self._head_session = self._make_head_session()
        if self._head_session is False:  # headless encoder: the logits are the embedding
            return embedding
        array = np.ascontiguousarray(embedding.detach().to("cpu", torch.float32).numpy())
        (logits,) = self._head_session.run([_ONNX_OUTPUTS[0]], {_ONNX_OUTPUTS[1]: array})
        return torch.from_numpy(logits)

    def _make_head_session(self) -> Any:
        if self.output_names != list(_ONNX_OUTPUTS):
            raise BirderError(f"{self.path}: not a birder ONNX export (outputs {self.output_names}); no classify()")
        try:
            import onnx
            import onnx.utils
        except ImportError:
            raise BirderError("classify() on an ONNX model needs onnx: pip install 'birder[onnx]'") from None

        model = onnx.load(str(self.path))
        # A headless encoder's two outputs are one tensor, joined by an Identity node in either direction.
        identities = {
            (tuple(node.input), tuple(node.output)) for node in model.graph.node if node.op_type == "Identity"
        }
        if {(("logits",), ("embedding",)), (("embedding",), ("logits",))} & identities:
            return False
        head = onnx.utils.Extractor(model).extract_model([_ONNX_OUTPUTS[1]], [_ONNX_OUTPUTS[0]])
        del model
        return _onnx_runtime().InferenceSession(head.SerializeToString(), providers=self._providers)


# Loading


def load_exported(path: str | os.PathLike, *, device: torch.device | str | None = None) -> tuple[nn.Module, ModelInfo]:
    """Load a ``.pts``, ``.pt2`` or ``.onnx`` export: ``(model, model_info)``, the model ready for inference.

    The model has ``forward`` (logits), ``embedding`` and ``classify`` like a birder network, so it goes
    through :func:`birder.inference.classification.infer_batch` as one.
    """
    path = Path(path)
    file_format = export_format(path)
    require_model_file(path, "export it again")

    device = device if device is not None else "cpu"
    loaders = {"pts": _load_torchscript, "pt2": _load_program, "onnx": _load_onnx}
    (model, metadata) = loaders[file_format](path, device)
    _check_metadata(path, metadata)
    # Exported from the calibrated network itself: the calibration describes these weights
    model.calibration = calibration_from_metadata(metadata, path)
    return (model, model_info_from_metadata(metadata))


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of an export without building the model (for ``model-info``-style tools)."""
    path = Path(path)
    file_format = export_format(path)
    if file_format == "onnx":
        sidecar = onnx_metadata_path(path)
        if sidecar.is_file():
            return json.loads(sidecar.read_text(encoding="utf-8"))
        return metadata_from_strings(path, OnnxModel(path).session.get_modelmeta().custom_metadata_map)

    # Both archive kinds are zip files with the extra files stored under an "extra"/"extra_files" folder.
    try:
        with zipfile.ZipFile(path) as archive:
            extra = {}
            for name in archive.namelist():
                (folder, _, key) = name.rpartition("/")
                if folder.rsplit("/", 1)[-1] in ("extra", "extra_files") and key in _METADATA_KEYS:
                    extra[key] = archive.read(name).decode("utf-8")
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: truncated or not a {file_format} archive ({one_line(err)})") from None
    metadata = metadata_from_strings(path, extra)
    _check_metadata(path, metadata)
    return metadata
