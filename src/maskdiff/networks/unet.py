"""A convolutional denoiser for pixel data: a U-Net with a self-attention middle.

The sequence transformer (:mod:`maskdiff.networks.transformer`) treats an image as a flat sequence of
H·W·C sub-pixel tokens and must learn locality from data. This network works on the image grid
itself, which is what the MD4 paper used for CIFAR-10 and ImageNet 64×64:

* Input: every sub-pixel token ``z`` (V = 256 grey levels + MASK) becomes a learned embedding
  (``embed_dim``) plus two fixed features, its normalised value ``2 z / (V - 1) - 1`` (0 when
  masked) and a mask flag. The features of a pixel's C channels are concatenated, giving a
  (B, C·(embed_dim + 2), H, W) feature map. The value feature lets neighbouring grey levels
  share what is learned; the embedding can still tell them apart.
* Body: a U-Net (Ronneberger et al. 2015, in the form of Ho et al. 2020): ``res_blocks``
  residual blocks per resolution with widths ``base_channels · channel_mult[i]``, stride-2
  downsampling between resolutions, a middle of ``mid_attention_layers`` × (multi-head
  self-attention over the H'·W' positions + residual block) at the lowest resolution, and an
  upsampling path with skip connections. Every residual branch ends in a zero-initialised
  convolution, so every block starts as the identity.
* Conditioning: a vector ``c`` (B, cond_dim) — the time embedding when ``time_conditioning``,
  plus a label embedding for class-conditional models (last id = "no label", for
  classifier-free guidance) — scales and shifts every residual block's features (FiLM). With
  neither, ``c`` does not exist and the network is a plain function of ``z``.
* Output: a 3×3 convolution to C·``token_dim`` channels gives one ``token_dim`` feature vector
  per sub-pixel, in raster order (row, column, channel) like the data; RMSNorm and a shared,
  zero-initialised linear head map it to V logits. The hidden states and ``head_weight`` have the
  same meaning as the transformer's, so the chunked cross-entropy works unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdiff.networks.base import DenoiserBase, TimeEmbedding

__all__ = ["UNetConfig", "UNet"]

MODEL_TYPE = "maskdiff-unet"


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet`.

    Attributes:
        vocab_size: V levels per sub-pixel (256 for 8-bit images); id V is MASK.
        seq_len: H·W·C, the number of sub-pixel tokens of one image.
        image_shape: (H, W, C); H and W must be divisible by ``2 ** (len(channel_mult) - 1)``.
        base_channels, channel_mult: the width at resolution i is ``base_channels * channel_mult[i]``.
        res_blocks: residual blocks per resolution on the way down (one more on the way up).
        mid_attention_layers: (self-attention + residual block) pairs at the lowest resolution.
        n_heads: attention heads (the lowest-resolution width must be divisible by it).
        embed_dim: learned embedding width per sub-pixel token.
        token_dim: feature width per sub-pixel before the output head.
        time_conditioning: FiLM conditioning on t; False gives a time-agnostic network.
        num_classes: > 0 adds a label embedding (num_classes + 1 rows; the last means "no label").
        dropout: dropout inside the residual blocks.
        cond_dim, time_embed_dim: width of the conditioning vector and of t's sinusoidal features.
        norm_eps: epsilon of the output RMSNorm.
    """

    vocab_size: int
    seq_len: int
    image_shape: tuple[int, int, int]
    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 2)
    res_blocks: int = 2
    mid_attention_layers: int = 1
    n_heads: int = 4
    embed_dim: int = 32
    token_dim: int = 64
    time_conditioning: bool = False
    num_classes: int = 0
    dropout: float = 0.0
    cond_dim: int = 128
    time_embed_dim: int = 128
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "base_channels", "res_blocks", "n_heads", "embed_dim", "token_dim",
                     "cond_dim", "time_embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (grey levels), got {self.vocab_size}")
        if isinstance(self.mid_attention_layers, bool) or not isinstance(self.mid_attention_layers, int) \
                or self.mid_attention_layers < 0:
            raise ValueError(f"mid_attention_layers must be a non-negative integer, got {self.mid_attention_layers!r}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {self.num_classes!r}")
        mult = tuple(int(m) for m in self.channel_mult)
        if not mult or min(mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive integers, got {self.channel_mult!r}")
        self.channel_mult = mult
        shape = tuple(int(v) for v in self.image_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape!r}")
        self.image_shape = shape  # type: ignore[assignment]
        h, w, c = shape
        if h * w * c != self.seq_len:
            raise ValueError(f"image_shape {shape} holds {h * w * c} values but seq_len is {self.seq_len}")
        factor = 2 ** (len(mult) - 1)
        if h % factor or w % factor:
            fits = 1
            while fits < len(mult) and h % 2 ** fits == 0 and w % 2 ** fits == 0:
                fits += 1
            raise ValueError(
                f"a U-Net with {len(mult)} resolutions halves the image {len(mult) - 1} times, so H and W must be "
                f"divisible by {factor}; got {h}×{w}. Use at most {fits} entries in channel_mult "
                f"(e.g. model.unet_channel_mult={','.join(map(str, mult[:fits]))})"
            )
        lowest = self.base_channels * mult[-1]
        if self.mid_attention_layers and lowest % self.n_heads:
            raise ValueError(f"the lowest-resolution width {lowest} must be divisible by n_heads={self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict, tagged ``architecture: "unet"``."""
        data = dataclasses.asdict(self)
        data["image_shape"] = list(self.image_shape)
        data["channel_mult"] = list(self.channel_mult)
        return {"architecture": "unet", **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        """Build a config from :meth:`to_dict` output; unknown or missing keys raise ValueError."""
        data = {k: v for k, v in data.items() if k != "architecture"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown UNetConfig key(s) {unknown}; valid keys are {sorted(fields)}")
        missing = [n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in data]
        if missing:
            raise ValueError(f"UNetConfig needs key(s) {missing}")
        return cls(**data)


def _groups(channels: int) -> int:
    """GroupNorm groups: 32 where the width allows, else the largest divisor of it up to 32."""
    return math.gcd(32, channels)


class ResBlock(nn.Module):
    """``skip(x) + conv(silu(FiLM(norm(conv(silu(norm(x)))))))``; the last conv starts at zero."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int | None, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.film = nn.Linear(cond_dim, 2 * c_out) if cond_dim else None  # c → (scale, shift); zero-init
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        """x (B, c_in, H, W), c (B, cond_dim) or None → (B, c_out, H, W)."""
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.film is not None:
            scale, shift = self.film(F.silu(c))[:, :, None, None].chunk(2, dim=1)  # 2 × (B, c_out, 1, 1)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class SpatialAttention(nn.Module):
    """Multi-head self-attention over the H·W positions of a feature map, pre-norm, residual."""

    def __init__(self, channels: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)  # zero-init

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        """x (B, C, H, W) → (B, C, H, W)."""
        B, C, H, W = x.shape
        qkv = self.qkv(self.norm(x)).view(B, 3, self.n_heads, C // self.n_heads, H * W)
        q, k, v = (qkv[:, i].transpose(-1, -2) for i in range(3))  # 3 × (B, heads, HW, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, hd)
        y = y.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj(y)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class UNet(DenoiserBase):
    """Image denoiser ``model(z (B, H·W·C), t (B,) | None, labels) -> logits (B, H·W·C, V)``.

    Same interface as :class:`maskdiff.networks.Transformer` (checks, labels, ``return_hidden``,
    ``head_weight``, ``save_pretrained``/``from_pretrained``), but only whole images: L must
    equal H·W·C.
    """

    config_class = UNetConfig
    model_type = MODEL_TYPE

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.mask_id = config.vocab_size
        self.seq_len = config.seq_len
        self.time_conditioning = config.time_conditioning
        self.causal = False
        self.num_classes = config.num_classes
        self.null_label = config.num_classes
        h, w, ch = config.image_shape
        self.tok_emb = nn.Embedding(config.vocab_size + 1, config.embed_dim)
        self.label_emb = nn.Embedding(config.num_classes + 1, config.cond_dim) if config.num_classes else None
        self.time_embed = TimeEmbedding(config.time_embed_dim, config.cond_dim) if config.time_conditioning else None
        cond = config.cond_dim if (config.time_conditioning or config.num_classes) else None

        widths = [config.base_channels * m for m in config.channel_mult]
        self.conv_in = nn.Conv2d(ch * (config.embed_dim + 2), widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        skip_widths = [widths[0]]
        current = widths[0]
        for i, width in enumerate(widths):
            for _ in range(config.res_blocks):
                self.down.append(ResBlock(current, width, cond, config.dropout))
                current = width
                skip_widths.append(current)
            if i < len(widths) - 1:
                self.down.append(Downsample(current))
                skip_widths.append(current)
        self.mid = nn.ModuleList([ResBlock(current, current, cond, config.dropout)])
        for _ in range(config.mid_attention_layers):
            self.mid.append(SpatialAttention(current, config.n_heads))
            self.mid.append(ResBlock(current, current, cond, config.dropout))
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            for _ in range(config.res_blocks + 1):
                self.up.append(ResBlock(current + skip_widths.pop(), width, cond, config.dropout))
                current = width
            if i > 0:
                self.up.append(Upsample(current))
        self.norm_out = nn.GroupNorm(_groups(current), current)
        self.conv_out = nn.Conv2d(current, ch * config.token_dim, 3, padding=1)
        self.norm_f = nn.RMSNorm(config.token_dim, eps=config.norm_eps)
        self.head = nn.Linear(config.token_dim, config.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        """Default conv init; N(0, 0.02) embeddings and linears; zeros where a block should start
        as the identity (last conv of each residual branch, attention output, FiLM) and for the
        head (uniform initial prediction)."""
        for module in self.modules():
            if isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        zero = [self.head]
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero += [module.conv2, module.film]
            elif isinstance(module, SpatialAttention):
                zero.append(module.proj)
        for module in zero:
            if module is not None:
                nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def head_weight(self) -> Tensor:
        """The output head's weight (V, token_dim)."""
        return self.head.weight

    def shard_units(self) -> list[nn.Module]:
        """The submodules FSDP shards one by one."""
        return [*self.down, *self.mid, *self.up]

    def forward(
        self,
        z: Tensor,
        t: Tensor | float | None = None,
        labels: Tensor | None = None,
        *,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits over the clean sub-pixel values.

        Args:
            z: (B, L) token ids in [0, V] with L = H·W·C (raster order: row, column, channel).
            t: (B,) times in [0, 1]; required when time-conditioned, ignored otherwise.
            labels: (B,) class ids of a class-conditional model (None: no label).
            return_hidden: return (B, L, token_dim) features instead of logits; ``hidden @
                head_weight.T`` are the logits.

        Returns:
            (B, L, V) logits (or (B, L, token_dim) hidden states).
        """
        z = self._check_tokens(z)
        B, L = z.shape
        h, w, ch = self.config.image_shape
        if L != self.seq_len:
            raise ValueError(f"the U-Net takes whole images of {self.seq_len} = {h}×{w}×{ch} tokens, got length {L}")
        c = None
        if self.time_embed is not None:
            c = self.time_embed(self._check_time(t, B, z.device))  # (B, cond_dim)
        label = self._label_embedding(labels, B, z.device)
        if label is not None:
            c = label[:, 0] if c is None else c + label[:, 0]  # (B, cond_dim)
        masked = z == self.mask_id  # (B, L)
        emb = self.tok_emb(z)  # (B, L, E)
        value = torch.where(masked, 0.0, z.float() * (2.0 / (self.vocab_size - 1)) - 1.0)  # (B, L)
        features = torch.cat([emb, value[..., None].to(emb.dtype), masked[..., None].to(emb.dtype)], dim=-1)
        x = features.view(B, h, w, ch * features.shape[-1]).permute(0, 3, 1, 2)  # (B, C·(E+2), H, W)
        x = self.conv_in(x)
        skips = [x]
        for module in self.down:
            x = module(x, c)
            skips.append(x)
        for module in self.mid:
            x = module(x, c)
        for module in self.up:
            if isinstance(module, ResBlock):
                x = module(torch.cat([x, skips.pop()], dim=1), c)
            else:
                x = module(x, c)
        x = self.conv_out(F.silu(self.norm_out(x)))  # (B, C·token_dim, H, W)
        x = x.permute(0, 2, 3, 1).reshape(B, L, self.config.token_dim)  # (B, L, token_dim), raster order
        x = self.norm_f(x)
        if return_hidden:
            return x
        return self.head(x)  # (B, L, V)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters; ``non_embedding`` leaves out the token embedding and the head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.head.weight.numel()
        return n
