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
from typing import TYPE_CHECKING, Any

from birder.errors import BirderError, UnknownModelError
from birder.model_registry.manifest import PRETRAINED_MODELS
from birder.tasks import DEFAULT_TASK

if TYPE_CHECKING:
    from birder.net.base import BaseNet

# Importing these registers the built-in network families.
_BUILTIN_NETWORK_MODULES = ("birder.net",)

logger = logging.getLogger(__name__)


def _unknown_name_error(kind: str, name: str, known: list[str]) -> UnknownModelError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return UnknownModelError(f"unknown {kind} '{name}'{hint} (list them with birder.list_models / list-models)")


class ModelRegistry:
    def __init__(self) -> None:
        self._networks: dict[str, tuple[type[BaseNet], dict[str, Any]]] = {}
        self._pretrained: dict[str, dict[str, Any]] = {}
        self._builtins_loaded = False

    def _load_builtin_networks(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in _BUILTIN_NETWORK_MODULES:
                importlib.import_module(module)

    # Networks

    def register_model(self, name: str, net_class: type["BaseNet"], config: Mapping[str, Any] | None = None) -> None:
        if name in self._networks:
            raise BirderError(f"network '{name}' is already registered")

        self._networks[name] = (net_class, dict(config or {}))

    def list_models(self, filter: str | None = None) -> list[str]:
        """Registered network names, optionally matching a shell-style pattern (``"vit_reg4_*"``)."""
        self._load_builtin_networks()
        names = sorted(self._networks)
        if filter is not None:
            names = fnmatch.filter(names, filter)

        return names

    def exists(self, name: str) -> bool:
        self._load_builtin_networks()
        return name in self._networks

    def network_config(self, name: str) -> dict[str, Any]:
        """The registered config of ``name`` (a copy)."""
        return dict(self._lookup_network(name)[1])

    def _lookup_network(self, name: str) -> tuple[type["BaseNet"], dict[str, Any]]:
        self._load_builtin_networks()
        try:
            return self._networks[name]
        except KeyError:
            raise _unknown_name_error("network", name, list(self._networks)) from None

    def net_factory(
        self,
        name: str,
        num_classes: int,
        input_channels: int = 3,
        *,
        config: Mapping[str, Any] | None = None,
        size: tuple[int, int] | None = None,
    ) -> "BaseNet":
        """Build network ``name``; ``config`` overrides keys of its registered config for this call only."""
        (net_class, registered) = self._lookup_network(name)
        merged = {**registered, **(config or {})}
        net = net_class(input_channels, num_classes, config=merged, size=size)
        net.network_name = name
        net.config_override = dict(config) if config else None
        return net

    # Pretrained weights

    def register_weights(self, name: str, metadata: Mapping[str, Any]) -> None:
        """Add (or replace, with a warning) a pretrained entry; the schema is SPEC section 2."""
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
