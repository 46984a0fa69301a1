"""The contract of masked-image-modelling (MIM) networks.

A MIM network wraps an encoder (a registered classification network built with ``num_classes=0``) and trains it
without labels. MIM networks register in the one registry with ``task=masked_image_modeling`` and are built with
``registry.mim_net_factory(name, encoder, config=...)``; only the encoder is kept after pretraining.
"""

from collections.abc import Mapping
from typing import Any

from torch import nn

from birder.net.base import BaseNet, ConfigOverride, resolve_config
from birder.tasks import Task


class MIMBaseNet(nn.Module):
    """Base class of MIM networks: config resolution, the registry's bookkeeping and the training hooks.

    Subclasses set ``default_config``, assign ``self.encoder`` in the order their state dict needs, and
    implement ``forward``.
    """

    default_config: Mapping[str, Any] = {}
    task: str = Task.MASKED_IMAGE_MODELING.value
    encoder: BaseNet

    def __init__(self, *, config: ConfigOverride = None) -> None:
        super().__init__()
        self.config = resolve_config(type(self).__name__, self.default_config, config)
        # Set by the registry, written into checkpoints (as for classifiers).
        self.network_name: str | None = None
        self.config_override: dict[str, Any] | None = None

    def no_weight_decay(self) -> set[str]:
        """The encoder's undecayed parameters (under ``encoder.``), plus the wrapper's own learned tokens."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | self.own_no_weight_decay()

    def own_no_weight_decay(self) -> set[str]:
        return set()

    def set_drop_path_rate(self, rate: float) -> None:
        self.encoder.set_drop_path_rate(rate)
