"""The registry: names -> networks, and names -> pretrained weights.

Network families register their named configs at the bottom of their module (``birder/net/vit.py``); the
pretrained manifest (``manifest.py``) is plain data. Users extend both at run time: ``register_weights`` points a
name at a mirror or a private model zoo.

This module does not import the networks (they import it to register themselves): the built-in families are
imported on the first look-up, so ``from birder.model_registry import registry`` alone is enough to use it.
"""

import copy
import difflib
import fnmatch
import importlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from birder.errors import BirderError, UnknownModelError
from birder.model_registry.manifest import PRETRAINED_MODELS
from birder.tasks import DEFAULT_TASK, Task

if TYPE_CHECKING:
    from torch import nn

    from birder.net.base import BaseNet

# Importing these registers the built-in network families.
_BUILTIN_NETWORK_MODULES = ("birder.net", "birder.net.detection")

logger = logging.getLogger(__name__)


def _unknown_name_error(kind: str, name: str, known: list[str]) -> UnknownModelError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownModelError(f"unknown {kind} '{name}'{hint} (list them with birder.list_models / list-models)")


@dataclass(frozen=True)
class RegisteredNetwork:
    """One registry entry: the class that builds the network, its named config and what it is for."""

    net_class: type
    config: dict[str, Any]
    task: str


class ModelRegistry:
    """One registry for every task: classifiers, masked-image-modelling wrappers and detectors."""

    def __init__(self) -> None:
        self._networks: dict[str, RegisteredNetwork] = {}
        self._pretrained: dict[str, dict[str, Any]] = {}
        self._builtins_loaded = False

    def _load_builtin_networks(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in _BUILTIN_NETWORK_MODULES:
                importlib.import_module(module)

    # Networks

    def register_model(
        self, name: str, net_class: type, config: Mapping[str, Any] | None = None, *, task: str | None = None
    ) -> None:
        """Register ``name`` -> ``net_class`` built with ``config``; ``task`` defaults to the class's ``task``."""
        if name in self._networks:
            raise BirderError(f"network '{name}' is already registered")

        task = Task(task or getattr(net_class, "task", DEFAULT_TASK)).value
        self._networks[name] = RegisteredNetwork(net_class, dict(config or {}), task)

    def list_models(self, filter: str | None = None, *, task: str | None = None) -> list[str]:
        """Registered network names, optionally matching a shell-style pattern (``"vit_reg4_*"``) and a task."""
        self._load_builtin_networks()
        names = sorted(name for (name, entry) in self._networks.items() if task is None or entry.task == task)
        if filter is not None:
            names = fnmatch.filter(names, filter)

        return names

    def exists(self, name: str, *, task: str | None = None) -> bool:
        self._load_builtin_networks()
        entry = self._networks.get(name)
        return entry is not None and (task is None or entry.task == task)

    def network_config(self, name: str) -> dict[str, Any]:
        """The registered config of ``name`` (a copy)."""
        return dict(self._lookup_network(name, None).config)

    def network_task(self, name: str) -> str:
        return self._lookup_network(name, None).task

    def _lookup_network(self, name: str, task: str | None) -> RegisteredNetwork:
        self._load_builtin_networks()
        entry = self._networks.get(name)
        if entry is None:
            raise _unknown_name_error("network", name, list(self._networks))
        if task is not None and entry.task != task:
            raise BirderError(f"network '{name}' is a {entry.task} network, not {task}")

        return entry

    def _build(self, name: str, entry: RegisteredNetwork, config: Mapping[str, Any] | None, *args: Any, **kwargs: Any):
        net = entry.net_class(*args, config={**entry.config, **(config or {})}, **kwargs)
        net.network_name = name
        net.config_override = dict(config) if config else None
        return net

    def net_factory(
        self,
        name: str,
        num_classes: int,
        input_channels: int = 3,
        *,
        config: Mapping[str, Any] | None = None,
        size: tuple[int, int] | None = None,
    ) -> "BaseNet":
        """Build classification network ``name``; ``config`` overrides its registered config for this call only."""
        entry = self._lookup_network(name, Task.IMAGE_CLASSIFICATION)
        return self._build(name, entry, config, input_channels, num_classes, size=size)

    def mim_net_factory(self, name: str, encoder: "BaseNet", *, config: Mapping[str, Any] | None = None) -> "nn.Module":
        """Wrap ``encoder`` (a headless classification network) in masked-image-modelling network ``name``."""
        entry = self._lookup_network(name, Task.MASKED_IMAGE_MODELING)
        return self._build(name, entry, config, encoder)

    def detection_net_factory(
        self,
        name: str,
        num_classes: int,
        backbone: "BaseNet",
        *,
        config: Mapping[str, Any] | None = None,
        size: tuple[int, int] | None = None,
    ) -> "nn.Module":
        """Build detector ``name`` for ``num_classes`` object classes on ``backbone`` (a classification network,
        its head dropped) at input ``size`` (default: the backbone's)."""
        entry = self._lookup_network(name, Task.OBJECT_DETECTION)
        return self._build(name, entry, config, num_classes, backbone, size=size)

    # Pretrained weights

    def register_weights(self, name: str, metadata: Mapping[str, Any]) -> None:
        """Add (or replace, with a warning) a pretrained entry; docs/compatibility.md, "Pretrained manifest"."""
        entry = copy.deepcopy(dict(metadata))
        _validate_weights_entry(name, entry)
        if name in self._pretrained:
            logger.warning("Pretrained model '%s' is already registered, replacing its entry", name)

        self._pretrained[name] = entry

    def get_pretrained_metadata(self, name: str) -> dict[str, Any]:
        try:
            entry = self._pretrained[name]
        except KeyError:
            raise _unknown_name_error("pretrained model", name, list(self._pretrained)) from None

        entry = copy.deepcopy(entry)
        entry.setdefault("task", DEFAULT_TASK)
        return entry

    def list_pretrained_models(self, filter: str | None = None) -> list[str]:
        names = sorted(self._pretrained)
        if filter is not None:
            names = fnmatch.filter(names, filter)

        return names

    def pretrained_exists(self, name: str) -> bool:
        return name in self._pretrained


def _validate_weights_entry(name: str, entry: dict[str, Any]) -> None:
    net = entry.get("net")
    if not isinstance(net, Mapping) or "network" not in net:
        raise BirderError(f"pretrained entry '{name}' needs 'net': {{'network': ..., 'tag': ...}}")

    formats = entry.get("formats")
    if not isinstance(formats, Mapping) or not formats:
        raise BirderError(f"pretrained entry '{name}' needs 'formats': {{format: {{'file_size': MB, 'sha256': hex}}}}")

    for file_format, info in formats.items():
        if not isinstance(info, Mapping) or "sha256" not in info:
            raise BirderError(f"pretrained entry '{name}' format '{file_format}' has no sha256")


registry = ModelRegistry()
for _name, _entry in PRETRAINED_MODELS.items():
    registry.register_weights(_name, _entry)
