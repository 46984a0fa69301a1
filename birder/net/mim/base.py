"""A small registry for masked-image-modelling (MIM) networks.

MIM networks wrap an encoder (a registered classification network built with ``num_classes=0``) and train it
without labels, so they do not fit :func:`registry.net_factory` (which builds a network from an input size and a
class count). They register here instead, the same way: a name, a class and a config.
"""

import fnmatch
from collections.abc import Mapping
from typing import Any, Protocol

from torch import nn

from birder.errors import BirderError, UnknownModelError


class MIMNetClass(Protocol):
    default_config: Mapping[str, Any]

    def __call__(self, encoder: nn.Module, *, config: Mapping[str, Any] | None = None) -> nn.Module: ...


class MIMRegistry:
    def __init__(self) -> None:
        self._networks: dict[str, tuple[MIMNetClass, dict[str, Any]]] = {}

    def register(self, name: str, net_class: MIMNetClass, config: Mapping[str, Any] | None = None) -> None:
        if name in self._networks:
            raise BirderError(f"MIM network '{name}' is already registered")

        self._networks[name] = (net_class, dict(config or {}))

    def list_models(self, filter: str | None = None) -> list[str]:
        names = sorted(self._networks)
        return names if filter is None else fnmatch.filter(names, filter)

    def exists(self, name: str) -> bool:
        return name in self._networks

    def net_factory(self, name: str, encoder: nn.Module, *, config: Mapping[str, Any] | None = None) -> nn.Module:
        """Wrap ``encoder`` in MIM network ``name``; ``config`` overrides its registered config for this call."""
        try:
            (net_class, registered) = self._networks[name]
        except KeyError:
            known = ", ".join(self.list_models())
            raise UnknownModelError(f"unknown MIM network '{name}' (known: {known})") from None

        net = net_class(encoder, config={**registered, **(config or {})})
        net.network_name = name
        net.config_override = dict(config) if config else None
        return net


mim_registry = MIMRegistry()
