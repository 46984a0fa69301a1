"""The contract every birder network follows.

``forward(x) == classify(embedding(x))``: the embedding is the representation users search and cluster with,
the classifier a plain linear head on top of it, so both can be swapped independently (linear probes, new
species lists). Networks are built by ``birder.model_registry.registry.net_factory`` from a registered
config plus an optional per-call override.
"""

from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from torch import nn

from birder.errors import BirderError
from birder.tasks import DEFAULT_TASK

# A per-call override of a network's registered config (``{"hidden_dim": 64, ...}``), or None.
ConfigOverride = Mapping[str, Any] | None


class NetOptions(TypedDict, total=False):
    """The keyword arguments every network takes (see :class:`BaseNet`); a subclass passes them on unchanged."""

    config: ConfigOverride
    size: tuple[int, int] | None


# An input size (height, width), or None for the network's default.
InputSize = tuple[int, int] | None


class FSDPUnit(nn.Module):
    """A block a network names as a unit of its own: FSDP shards it separately and ``--activation-checkpointing``
    recomputes it (:mod:`birder.training.fsdp` finds every module of this kind in a model).

    The network says which of its blocks these are, so the training code needs to know no family.
    """


def resolve_config(owner: str, defaults: Mapping[str, Any], config: ConfigOverride) -> dict[str, Any]:
    """``defaults`` updated with ``config``; unknown keys are an error naming the valid ones, never ignored."""
    resolved = dict(defaults)
    if config:
        unknown = sorted(set(config) - set(resolved))
        if unknown:
            raise BirderError(f"unknown config key(s) {unknown} for {owner}; valid keys: {sorted(resolved)}")
        resolved.update(config)

    return resolved


class BaseNet(nn.Module):
    """Base class of classification networks.

    Subclasses set ``default_config`` (every config key they accept, with its default) and ``default_size``,
    build their body in ``__init__`` and implement :meth:`embedding`, :meth:`forward_features`,
    :meth:`detection_features` and :meth:`adjust_size`.
    """

    default_config: Mapping[str, Any] = {}
    default_size: tuple[int, int] = (224, 224)
    # What the network is for; a loaded model gets the task its file records (a MIM encoder stays one).
    task: str = DEFAULT_TASK

    def __init__(
        self,
        input_channels: int,
        num_classes: int,
        *,
        config: ConfigOverride = None,
        size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.input_channels = input_channels
        self.num_classes = num_classes
        self.size = tuple(size) if size is not None else self.default_size
        self.config = self.resolve_config(config)
        # Set by the registry: the name the network was built under and the per-call override it was given.
        # Both are written into checkpoints so a file knows how to rebuild its network.
        self.network_name: str | None = None
        self.config_override: dict[str, Any] | None = None

    @classmethod
    def resolve_config(cls, config: ConfigOverride) -> dict[str, Any]:
        return resolve_config(cls.__name__, cls.default_config, config)

    # The network contract

    @property
    def embedding_size(self) -> int:
        raise NotImplementedError

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled representation ``[B, embedding_size]`` the classifier reads."""
        raise NotImplementedError

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]``."""
        return self.classify(self.embedding(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        """Permanently change the input resolution the network expects."""
        raise NotImplementedError

    # Classifier head

    def create_classifier(self, num_classes: int | None = None) -> nn.Module:
        num_classes = self.num_classes if num_classes is None else num_classes
        if num_classes == 0:
            # A headless encoder (e.g. fresh from MIM pretraining): forward returns the embedding.
            return nn.Identity()

        return nn.Linear(self.embedding_size, num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` outputs."""
        reference = next(self.parameters())
        self.num_classes = num_classes
        self.classifier = self.create_classifier().to(device=reference.device, dtype=reference.dtype)

    # Freezing (linear probes, staged fine-tuning)

    def freeze(self, freeze_classifier: bool = True) -> None:
        """Stop gradients to the whole network, or to everything but the classifier."""
        for param in self.parameters():
            param.requires_grad_(False)

        if not freeze_classifier:
            for param in self.classifier.parameters():
                param.requires_grad_(True)

    def unfreeze(self) -> None:
        for param in self.parameters():
            param.requires_grad_(True)

    # Training hooks: trainers call these and know nothing of a family's parameter names or modules.

    def no_weight_decay(self) -> set[str]:
        """Parameter names never weight-decayed besides biases and norms (learned tokens, position embeddings)."""
        return set()

    @property
    def num_layer_ids(self) -> int:
        """How many layers :meth:`layer_id` distinguishes (layer-wise lr decay); 0 when the family has none."""
        return 0

    def layer_id(self, param_name: str) -> int:
        """The layer of parameter ``param_name`` for layer-wise lr decay: 0 (stem) to ``num_layer_ids - 1`` (head)."""
        raise BirderError(f"layer-wise lr decay is not supported by {type(self).__name__}")

    def set_drop_path_rate(self, rate: float) -> None:
        """Stochastic depth growing linearly from 0 (first block) to ``rate`` (last block)."""
        raise BirderError(f"stochastic depth is not supported by {type(self).__name__}")

    # Checkpoint compatibility

    def upgrade_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rename keys of older checkpoint layouts to the current one (identity unless a family overrides it)."""
        return state_dict
