"""The sequence transformer's hyper-parameters: :class:`TransformerConfig` (what ``network.json``
records, with its checks and the values an older file loads with) and the model-size presets.

The network itself is :class:`maskdiff.networks.transformer.Transformer`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from maskdiff.networks.variants import CHOICES, LEGACY_VALUES

__all__ = ["TransformerConfig", "MODEL_PRESETS", "model_preset"]


@dataclass
class TransformerConfig:
    """Hyper-parameters of :class:`Transformer`.

    Attributes:
        vocab_size: V, the number of real tokens. Id V is the MASK symbol.
        seq_len: maximum sequence length; shorter inputs are fine.
        n_layers, d_model, n_heads: depth, width and number of attention heads.
        mlp_ratio: SwiGLU sizing: the hidden width is ``mlp_ratio * d_model * 2/3`` rounded up
            to a multiple of 8 (``mlp_ratio=4`` matches a 4x GELU MLP in parameters).
        mlp_hidden: explicit SwiGLU hidden width; overrides ``mlp_ratio`` when set.
        time_conditioning: adaLN-zero conditioning on t. False gives a time-agnostic model that
            ignores ``t`` (which makes caching the denoiser across sampling steps exact).
        causal: causal attention (an autoregressive baseline) instead of bidirectional.
        dropout: dropout on the embedding, attention probabilities and residual branches.
        rope_base: rotary embedding base θ.
        tie_embeddings: use the first V rows of the token embedding as the output head. The
            head can then not start at zero; with ``head_init="zero"`` the final RMSNorm gain
            starts at zero instead, which keeps the initial prediction uniform.
        cond_dim: width of the time embedding ``c`` fed to the modulation layers.
        residual_gates: for a time-agnostic model, multiply each residual branch by a learned
            per-channel gate initialised at zero (the time-free analogue of adaLN-zero's gates:
            every block starts as the identity). Measured on character-level Wikipedia, a small
            model without them stalls near the unigram entropy for hundreds of steps.
        num_classes: > 0 adds a label embedding (num_classes + 1 rows; the last is the "no
            label" id used for classifier-free guidance) added to every position's input.
        image_shape: (H, W, C) for pixel data flattened in raster order (row, column, channel):
            adds learned row, column and channel embeddings to the input, next to the rotary
            positions of the flat sequence (which only know 1-D distance).
        time_embed_dim: number of sinusoidal features of ``1000 t`` (even).
        norm_eps: epsilon of the norms.
        mlp, norm, mod_activation, init: recorded variants (:mod:`maskdiff.networks.variants`):
            the MLP (``"swiglu"`` | ``"glu"``), the norms (``"rms"`` | ``"layer"``), the activation
            before the adaLN modulation layers (``"silu"`` | ``"sigmoid"``) and the
            initialisation (``"gpt2"`` | ``"fan_in"``). A ``network.json`` without them loads
            with the values of maskdiff 0.2.
        head_init: how the (untied) output head starts: ``"fan_in"`` (default, truncated
            normal with variance 1/d_model) or ``"zero"`` (maskdiff 0.1/0.2, a uniform first
            prediction; what a ``network.json`` without the key was built with). It only sets the
            initial values, so it never matters for loading or resuming a trained network.
        time_mlp_hidden: hidden width of the time-embedding MLP (None: ``cond_dim``).
    """

    vocab_size: int
    seq_len: int
    n_layers: int = 12
    d_model: int = 768
    n_heads: int = 12
    mlp_ratio: float = 4.0
    mlp_hidden: int | None = None
    time_conditioning: bool = True
    causal: bool = False
    dropout: float = 0.0
    rope_base: float = 10000.0
    tie_embeddings: bool = False
    cond_dim: int = 128
    time_embed_dim: int = 256
    norm_eps: float = 1e-6
    num_classes: int = 0
    image_shape: tuple[int, int, int] | None = None
    residual_gates: bool = True
    mlp: str = "swiglu"
    norm: str = "rms"
    mod_activation: str = "silu"
    init: str = "gpt2"
    time_mlp_hidden: int | None = None
    head_init: str = "fan_in"

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.time_mlp_hidden is not None and (
            isinstance(self.time_mlp_hidden, bool) or not isinstance(self.time_mlp_hidden, int)
            or self.time_mlp_hidden < 1
        ):
            raise ValueError(f"time_mlp_hidden must be a positive integer or None, got {self.time_mlp_hidden!r}")
        for name in ("vocab_size", "seq_len", "n_layers", "d_model", "n_heads", "cond_dim", "time_embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("time_conditioning", "causal", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.head_dim % 2:
            raise ValueError(
                f"rotary embeddings need an even head dimension, got d_model/n_heads = {self.head_dim}"
            )
        if self.time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {self.time_embed_dim}")
        if self.mlp_hidden is not None and (
            isinstance(self.mlp_hidden, bool) or not isinstance(self.mlp_hidden, int) or self.mlp_hidden < 1
        ):
            raise ValueError(f"mlp_hidden must be a positive integer or None, got {self.mlp_hidden!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not self.rope_base > 0:
            raise ValueError(f"rope_base must be > 0, got {self.rope_base}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be a non-negative integer, got {self.num_classes!r}")
        if self.image_shape is not None:
            shape = tuple(int(v) for v in self.image_shape)
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"image_shape must be (H, W, C) with positive sizes, got {self.image_shape!r}")
            if shape[0] * shape[1] * shape[2] != self.seq_len:
                raise ValueError(f"image_shape {shape} holds {shape[0] * shape[1] * shape[2]} values but seq_len is "
                                 f"{self.seq_len}; set seq_len = H * W * C")
            self.image_shape = shape

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        """SwiGLU hidden width: ``mlp_hidden`` or ``mlp_ratio * d_model * 2/3`` rounded up to 8."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        return 8 * math.ceil(self.mlp_ratio * self.d_model * 2 / 3 / 8)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TransformerConfig:
        """Build a config from :meth:`to_dict` output; unknown or missing keys raise ValueError."""
        data = {k: v for k, v in data.items() if k != "architecture"}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown TransformerConfig key(s) {unknown}; valid keys are {sorted(fields)}")
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        # Saved before an option existed: the network that was built then.
        data = {**{k: v for k, v in LEGACY_VALUES.items() if k not in data}, **data}
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"TransformerConfig needs key(s) {missing}")
        return cls(**data)


MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # For unit tests: a few thousand parameters.
    "tiny": dict(
        vocab_size=32, seq_len=32, n_layers=2, d_model=64, n_heads=4, cond_dim=32, time_embed_dim=32
    ),
    # Quick experiments and benchmarks with the GPT-2 vocabulary.
    "small": dict(vocab_size=50257, seq_len=256, n_layers=6, d_model=384, n_heads=6),
    # MD4 paper sizes (GPT-2 tokenizer, OpenWebText context of 1024).
    "md4-s": dict(vocab_size=50257, seq_len=1024, n_layers=12, d_model=768, n_heads=12),
    "md4-m": dict(vocab_size=50257, seq_len=1024, n_layers=24, d_model=1024, n_heads=16),
}


def model_preset(name: str, **overrides: Any) -> TransformerConfig:
    """The config of a named preset (``"tiny"``, ``"small"``, ``"md4-s"``, ``"md4-m"``).

    Keyword arguments override preset fields, e.g. ``model_preset("md4-s", time_conditioning=False)``.
    """
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}")
    return TransformerConfig.from_dict({**MODEL_PRESETS[name], **overrides})
