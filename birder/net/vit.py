"""Vision Transformer (ViT) family.

Structure and state-dict keys follow Birder's current layout (docs/compatibility.md, "ViT layouts"), so Birder
checkpoints load as they are; the legacy layout (Birder 0.3.x and earlier, the model card's file) is renamed on load by
:meth:`ViT.upgrade_state_dict`.

Token order is ``[registers..., class, patches...]``; the position embedding covers all of them.
"""

import math
import re
from collections.abc import Mapping
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from birder.errors import BirderError
from birder.model_registry import registry
from birder.net.base import BaseNet, FSDPUnit, NetOptions


class StochasticDepth(nn.Module):
    """Drops the whole residual branch of a sample with probability ``p`` (training only)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x

        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (rows stacked q, k, v)."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise BirderError(f"hidden_dim {dim} is not divisible by num_heads {num_heads}")

        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # Explanation maps only (birder.introspection sets it, then clears it): compute the weights explicitly
        # and keep them in `attention_weights`. Off, the fused kernel below runs, untouched.
        self.record_attention = False
        self.attention_weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (batch, tokens, dim) = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        (q, k, v) = qkv.unbind(0)
        if self.record_attention:
            x = self._explicit_attention(q, k, v)
        else:
            # The fused kernel (flash / memory-efficient / CPU flash) never materialises the [N, N] matrix.
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(x)

    def _explicit_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``softmax(q k^T / sqrt(d)) v`` with the ``[B, heads, N, N]`` weights kept (no dropout: eval only)."""
        weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)
        self.attention_weights = weights
        return weights @ v


class EncoderBlock(FSDPUnit):
    """Pre-norm residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_dim: int,
        *,
        drop_path: float = 0.0,
        dropout: float = 0.0,
        attn_dropout: float = 0.0,
        layer_scale_init_value: float | None = None,
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, attn_drop=attn_dropout)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        # Index layout (0: fc1, 3: fc2) is part of the state-dict key names: keep it.
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(mlp_dim, dim),
            nn.Dropout(dropout),
        )
        if layer_scale_init_value is not None:
            self.layer_scale_1 = LayerScale(dim, layer_scale_init_value)
            self.layer_scale_2 = LayerScale(dim, layer_scale_init_value)
        else:
            self.layer_scale_1 = nn.Identity()
            self.layer_scale_2 = nn.Identity()

        self.drop_path = StochasticDepth(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1(self.attn(self.norm1(x))))
        x = x + self.drop_path(self.layer_scale_2(self.mlp(self.norm2(x))))
        return x


class Encoder(nn.Module):
    """The blocks, preceded by ``pre_block``: the pre-norm LayerNorm of ``_pn`` variants, else nothing.

    The pre-norm lives here (not on the ViT) so that its keys are Birder's, ``encoder.pre_block.0.{weight,bias}``.
    """

    def __init__(
        self, num_layers: int, dpr: list[float], *, pre_norm_eps: float | None = None, **block_kwargs: Any
    ) -> None:
        super().__init__()
        dim = block_kwargs["dim"]
        self.pre_block = nn.Sequential(nn.LayerNorm(dim, eps=pre_norm_eps)) if pre_norm_eps else nn.Identity()
        self.block = nn.ModuleList([EncoderBlock(drop_path=dpr[i], **block_kwargs) for i in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_block(x)
        for block in self.block:
            x = block(x)

        return x


def resize_pos_embedding(
    pos_embedding: torch.Tensor,
    old_grid: tuple[int, int],
    new_grid: tuple[int, int],
    num_special_tokens: int,
    antialias: bool,
) -> torch.Tensor:
    """Resize the patch part of a ``[1, S + h*w, D]`` position embedding to a new grid ("ViT layouts").

    The special-token rows (registers, class token) are kept as they are. Interpolation runs in float32 whatever
    the embedding's dtype, so bf16 models resize the same way as the reference.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embedding

    special = pos_embedding[:, :num_special_tokens]
    patches = pos_embedding[:, num_special_tokens:]
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False, antialias=antialias)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embedding.dtype)
    return torch.cat([special, patches], dim=1)


# Legacy (Birder <= 0.3) per-block names -> current names; pure renames, same shapes and q/k/v order.
_LEGACY_BLOCK_RENAMES = [
    (re.compile(r"\.ln1\.(weight|bias)$"), r".norm1.\1"),
    (re.compile(r"\.ln2\.(weight|bias)$"), r".norm2.\1"),
    (re.compile(r"\.self_attention\.in_proj_weight$"), ".attn.qkv.weight"),
    (re.compile(r"\.self_attention\.in_proj_bias$"), ".attn.qkv.bias"),
    (re.compile(r"\.self_attention\.out_proj\.(weight|bias)$"), r".attn.proj.\1"),
]


# Parameter names by layer, for layer-wise lr decay (ViT.layer_id).
_BLOCK_PARAM = re.compile(r"encoder\.block\.(\d+)\.")
_STEM_PARAMS = ("conv_proj.", "pos_embedding", "class_token", "reg_tokens", "encoder.pre_block.")

# Files written by birder before the pre-norm moved into the encoder (Birder's own name for it).
_OLD_PRE_NORM_KEY = re.compile(r"^pre_norm\.(weight|bias)$")


def rename_legacy_vit_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map legacy ViT keys (``ln1``, ``self_attention.in_proj_*``, ``pre_norm.*``, ...) to the current layout.

    Works on any prefix (``encoder.block.3.``, ``decoder.5.``), so MAE checkpoints use it too. Tensors are not
    copied: the result shares storage with the input.
    """
    renamed = {}
    for key, value in state_dict.items():
        for pattern, replacement in [*_LEGACY_BLOCK_RENAMES, (_OLD_PRE_NORM_KEY, r"encoder.pre_block.0.\1")]:
            (key, count) = pattern.subn(replacement, key)
            if count:
                break

        renamed[key] = value

    return renamed


class ViT(BaseNet):
    """Vision Transformer: patch stem, pre-norm residual blocks, final LayerNorm, linear head on the pooled token.

    Config keys (``registry.net_factory(name, n, config={...})`` overrides any of them for one build):

    - ``patch_size``: side of the square patches the stem cuts (14, 16 or 32 in the registered names).
    - ``num_layers``, ``num_heads``, ``hidden_dim``, ``mlp_dim``: depth, attention heads, token width and MLP width.
    - ``num_reg_tokens``: learned register tokens placed before the class token (0 = none).
    - ``class_token``: pool with a class token (True) or with the mean of the patch tokens (False).
    - ``layer_scale_init_value``: initial per-channel scale of each residual branch (None = no layer scale).
    - ``pre_norm``: a LayerNorm on the tokens before the first block (and no stem bias, which it would cancel).
    - ``norm_layer_eps``: epsilon of every LayerNorm.
    - ``drop_path_rate``: stochastic depth of the last block, growing linearly from 0 at the first (training only).
    - ``dropout``, ``attention_dropout``: dropout in the MLP and on the attention weights (0 in every named config).
    - ``out_indices``: blocks whose outputs :meth:`detection_features` returns as ``stage1..K``; None gives the
      card's single ``neck`` map.

    Registered names compose as ``vit_[reg{R}_]{size}{patch}[_ls][_pn][_avg]``: size ``t s m b l h`` sets the
    depth and widths (and drop-path 0.1 for b, l, h), ``reg1/4/8`` the register tokens, ``_ls`` layer scale 1e-5,
    ``_pn`` the pre-norm with LayerNorm eps 1e-5, ``_avg`` mean pooling instead of a class token. Suffixes combine
    in that order (``vit_reg4_b16_ls_pn_avg``).
    """

    default_config: Mapping[str, Any] = {
        "patch_size": 16,
        "num_layers": 12,
        "num_heads": 12,
        "hidden_dim": 768,
        "mlp_dim": 3072,
        "num_reg_tokens": 0,
        "class_token": True,
        "layer_scale_init_value": None,
        "pre_norm": False,
        "norm_layer_eps": 1e-6,
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        # Block indices whose outputs detection_features returns (negatives count from the end); None: the
        # card's single "neck" map.
        "out_indices": None,
    }
    default_size = (224, 224)

    def __init__(self, input_channels: int, num_classes: int, **options: Unpack[NetOptions]) -> None:
        super().__init__(input_channels, num_classes, **options)
        cfg = self.config
        self.patch_size: int = cfg["patch_size"]
        self.hidden_dim: int = cfg["hidden_dim"]
        self.num_layers: int = cfg["num_layers"]
        self.num_reg_tokens: int = cfg["num_reg_tokens"]
        self.class_token_enabled: bool = cfg["class_token"]
        self.num_special_tokens = self.num_reg_tokens + int(self.class_token_enabled)
        self.out_indices = self._resolve_out_indices(cfg["out_indices"])
        self._check_size(self.size)

        norm_eps = cfg["norm_layer_eps"]
        # Pre-norm variants (CLIP-style) drop the stem bias: the LayerNorm right after it would cancel it.
        self.conv_proj = nn.Conv2d(
            input_channels,
            self.hidden_dim,
            kernel_size=self.patch_size,
            stride=self.patch_size,
            bias=not cfg["pre_norm"],
        )
        if self.class_token_enabled:
            self.class_token = nn.Parameter(torch.zeros(1, 1, self.hidden_dim))
        if self.num_reg_tokens > 0:
            self.reg_tokens = nn.Parameter(torch.zeros(1, self.num_reg_tokens, self.hidden_dim))

        num_tokens = self.num_special_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embedding = nn.Parameter(torch.empty(1, num_tokens, self.hidden_dim))

        # Stochastic depth rate grows linearly over the blocks (plain floats: the net may be built on "meta").
        rate = cfg["drop_path_rate"]
        dpr = [rate * i / max(self.num_layers - 1, 1) for i in range(self.num_layers)]
        self.encoder = Encoder(
            self.num_layers,
            dpr,
            dim=self.hidden_dim,
            num_heads=cfg["num_heads"],
            mlp_dim=cfg["mlp_dim"],
            dropout=cfg["dropout"],
            attn_dropout=cfg["attention_dropout"],
            layer_scale_init_value=cfg["layer_scale_init_value"],
            norm_eps=norm_eps,
            pre_norm_eps=norm_eps if cfg["pre_norm"] else None,
        )
        self.norm = nn.LayerNorm(self.hidden_dim, eps=norm_eps)
        self.classifier = self.create_classifier()
        self._init_weights()

    def _resolve_out_indices(self, out_indices: list[int] | None) -> list[int] | None:
        if out_indices is None:
            return None

        resolved = []
        for idx in out_indices:
            if not -self.num_layers <= idx < self.num_layers:
                raise BirderError(f"out_indices entry {idx} is out of range for {self.num_layers} blocks")
            resolved.append(idx % self.num_layers)

        return resolved

    def _check_size(self, size: tuple[int, int]) -> None:
        if size[0] % self.patch_size != 0 or size[1] % self.patch_size != 0:
            raise BirderError(f"input size {tuple(size)} is not a multiple of the patch size {self.patch_size}")

    def _init_weights(self) -> None:
        if self.pos_embedding.is_meta:
            # Built on the meta device to receive a checkpoint: nothing to initialise (and random init on
            # "meta" would pull in torch._dynamo, 1.5 s of start-up).
            return

        nn.init.normal_(self.pos_embedding, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        # The stem as a linear layer on flattened patches (as in MAE).
        fan_in = self.conv_proj.in_channels * self.patch_size * self.patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
        if self.conv_proj.bias is not None:
            nn.init.zeros_(self.conv_proj.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return (self.size[0] // self.patch_size, self.size[1] // self.patch_size)

    @property
    def embedding_size(self) -> int:
        return self.hidden_dim

    def special_tokens(self, batch_size: int) -> list[torch.Tensor]:
        """The learned special tokens in sequence order: registers, then the class token."""
        tokens = []
        if self.num_reg_tokens > 0:
            tokens.append(self.reg_tokens.expand(batch_size, -1, -1))
        if self.class_token_enabled:
            tokens.append(self.class_token.expand(batch_size, -1, -1))

        return tokens

    def pos_embedding_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a patch grid; other grids are interpolated on the fly (no antialias)."""
        return resize_pos_embedding(self.pos_embedding, self.grid_size, grid, self.num_special_tokens, antialias=False)

    def patch_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Stem: image ``[B, C, H, W]`` -> patch tokens ``[B, h*w, D]`` and the grid ``(h, w)``."""
        x = self.conv_proj(x)
        grid = (x.shape[2], x.shape[3])
        return (x.flatten(2).transpose(1, 2), grid)

    def _tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Image -> full token sequence with position embeddings, ready for the encoder blocks."""
        (patches, grid) = self.patch_embed(x)
        x = torch.cat([*self.special_tokens(patches.shape[0]), patches], dim=1)
        x = x + self.pos_embedding_for(grid)
        return (x, grid)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """All tokens after the final norm, ``[B, special + h*w, D]``."""
        (x, _) = self._tokens(x)
        return self.norm(self.encoder(x))

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """Normed tokens -> embedding: the class token, or the mean of the patch tokens (``_avg`` variants)."""
        if self.class_token_enabled:
            return features[:, self.num_reg_tokens]

        return features[:, self.num_special_tokens :].mean(dim=1)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))

    def _to_feature_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches = tokens[:, self.num_special_tokens :]
        return patches.transpose(1, 2).reshape(tokens.shape[0], self.hidden_dim, grid[0], grid[1])

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Feature maps ``[B, D, H/p, W/p]`` for detection heads.

        Default (the card): ``{"neck": ...}``, the patch tokens after the final norm. With ``out_indices`` set:
        ``{"stage1": ..., "stageK": ...}``, the chosen blocks' outputs without the final norm.
        """
        (x, grid) = self._tokens(x)
        if self.out_indices is None:
            return {"neck": self._to_feature_map(self.norm(self.encoder(x)), grid)}

        stages = {}
        wanted = {idx: pos for pos, idx in enumerate(self.out_indices)}
        x = self.encoder.pre_block(x)
        for idx, block in enumerate(self.encoder.block):
            x = block(x)
            if idx in wanted:
                stages[wanted[idx]] = self._to_feature_map(x, grid)
            if len(stages) == len(wanted):
                break  # later blocks would not change any requested output

        return {f"stage{pos + 1}": stages[pos] for pos in range(len(self.out_indices))}

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        new_size = (int(new_size[0]), int(new_size[1]))
        if new_size == tuple(self.size):
            return

        self._check_size(new_size)
        new_grid = (new_size[0] // self.patch_size, new_size[1] // self.patch_size)
        with torch.no_grad():
            resized = resize_pos_embedding(
                self.pos_embedding, self.grid_size, new_grid, self.num_special_tokens, antialias=True
            )
        self.pos_embedding = nn.Parameter(resized, requires_grad=self.pos_embedding.requires_grad)
        self.size = new_size

    def count_flops(self, size: tuple[int, int] | None = None) -> int:
        """Floating-point operations of one forward pass on one image: 2 x every multiply-accumulate.

        Counts the stem, every linear layer, the attention's ``QK^T`` and ``AV`` products and the head; norms,
        GELU and softmax (under 1% for ViT-L) are left out. vit_l16 at 256 px: 162.1 GFLOP.
        """
        (height, width) = size if size is not None else self.size
        patches = (height // self.patch_size) * (width // self.patch_size)
        tokens = patches + self.num_special_tokens
        dim = self.hidden_dim
        mlp_dim = self.config["mlp_dim"]
        stem = patches * dim * self.input_channels * self.patch_size**2
        per_block = tokens * dim * 3 * dim + 2 * tokens * tokens * dim + tokens * dim * dim + 2 * tokens * dim * mlp_dim
        head = dim * self.num_classes
        return 2 * (stem + self.num_layers * per_block + head)

    def upgrade_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return rename_legacy_vit_keys(state_dict)

    def no_weight_decay(self) -> set[str]:
        return {name for name in ("pos_embedding", "class_token", "reg_tokens") if hasattr(self, name)}

    @property
    def num_layer_ids(self) -> int:
        return self.num_layers + 2

    def layer_id(self, param_name: str) -> int:
        """0: stem, position embedding, special tokens and pre-norm; 1..N: blocks; N + 1: final norm and head."""
        block = _BLOCK_PARAM.match(param_name)
        if block is not None:
            return int(block.group(1)) + 1
        if param_name.startswith(_STEM_PARAMS):
            return 0

        return self.num_layers + 1

    def set_drop_path_rate(self, rate: float) -> None:
        for index, block in enumerate(self.encoder.block):
            block.drop_path.p = rate * index / max(self.num_layers - 1, 1)

    def freeze_stages(self, up_to_block: int) -> None:
        """Freeze the stem, special tokens, position embedding and the first ``up_to_block`` blocks."""
        stem_params = [self.pos_embedding, *self.conv_proj.parameters(), *self.encoder.pre_block.parameters()]
        stem_params += [getattr(self, name) for name in ("class_token", "reg_tokens") if hasattr(self, name)]
        block_params = [p for block in self.encoder.block[:up_to_block] for p in block.parameters()]
        for param in stem_params + block_params:
            param.requires_grad_(False)


# Named configs (docs/compatibility.md, "ViT layouts"): size letter -> (layers, heads, width, mlp, drop-path rate).
_VIT_SIZES = {
    "t": (12, 3, 192, 768, 0.0),
    "s": (12, 6, 384, 1536, 0.0),
    "m": (12, 8, 512, 2048, 0.0),
    "b": (12, 12, 768, 3072, 0.1),
    "l": (24, 16, 1024, 4096, 0.1),
    "h": (32, 16, 1280, 5120, 0.1),
}
_PATCH_SIZES = (32, 16, 14)
_REGISTER_COUNTS = (0, 1, 4, 8)
# Name suffix -> config keys it sets. Suffixes combine in this order: _ls, _pn, _avg.
_VARIANTS = {
    "_ls": {"layer_scale_init_value": 1e-5},
    "_pn": {"pre_norm": True, "norm_layer_eps": 1e-5},
    "_avg": {"class_token": False},
}


def _variant_suffixes() -> list[tuple[str, dict[str, Any]]]:
    combos: list[tuple[str, dict[str, Any]]] = [("", {})]
    for suffix, settings in _VARIANTS.items():
        combos += [(name + suffix, {**cfg, **settings}) for (name, cfg) in combos]

    return combos


for _size, (_layers, _heads, _dim, _mlp, _dpr) in _VIT_SIZES.items():
    for _patch in _PATCH_SIZES:
        for _regs in _REGISTER_COUNTS:
            _prefix = "vit_" if _regs == 0 else f"vit_reg{_regs}_"
            for _suffix, _variant in _variant_suffixes():
                registry.register_model(
                    f"{_prefix}{_size}{_patch}{_suffix}",
                    ViT,
                    {
                        "patch_size": _patch,
                        "num_layers": _layers,
                        "num_heads": _heads,
                        "hidden_dim": _dim,
                        "mlp_dim": _mlp,
                        "num_reg_tokens": _regs,
                        "drop_path_rate": _dpr,
                        **_variant,
                    },
                )
