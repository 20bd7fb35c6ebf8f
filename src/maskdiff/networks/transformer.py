"""The sequence denoiser: a bidirectional transformer over the vocabulary plus a MASK symbol.

The denoiser maps a partially masked sequence ``z`` (B, L) and, optionally, the diffusion time
``t`` (B,) to logits (B, L, V) over the clean tokens at every position:

* Token ids lie in ``[0, V]``; ``V = vocab_size`` is the MASK id. The embedding therefore has
  ``V + 1`` rows, while the output head has ``V`` outputs (the mask is never predicted).
* Positions are encoded with rotary embeddings (RoPE) on queries and keys, so any length
  ``L <= seq_len`` works without padding.
* Blocks are pre-norm (RMSNorm) with softmax attention (``F.scaled_dot_product_attention``,
  bidirectional by default, causal for an autoregressive baseline) and a SwiGLU MLP.
* With ``time_conditioning=True`` every block is modulated by adaLN-zero (DiT, Peebles & Xie
  2023): a sinusoidal embedding of ``1000 t`` goes through an MLP to a vector ``c`` (B, cond_dim)
  from which each block computes shift/scale/gate for its attention and MLP branches; the
  modulation layers start at zero, so every block starts as the identity. The final norm is
  modulated too. With ``time_conditioning=False`` the model has no time pathway and ignores ``t``.
* The output head starts at fan-in scale (``head_init="fan_in"``, the default) or at zero
  (``"zero"``, maskdiff 0.1/0.2: an exactly uniform first prediction).

Its hyper-parameters, :class:`TransformerConfig`, and the size presets live in
:mod:`maskdiff.networks.transformer_config` (re-exported here).

Checkpoints use the Hugging Face Hub layout: ``config.json`` plus ``model.safetensors``
(see :meth:`Transformer.save_pretrained` / :meth:`Transformer.from_pretrained`); nothing is
ever unpickled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdiff.networks.base import DenoiserBase, TimeEmbedding
from maskdiff.networks.transformer_config import MODEL_PRESETS, TransformerConfig, model_preset
from maskdiff.networks.variants import (
    init_linear_fan_in,
    make_mlp,
    make_norm,
    modulation_activation,
)

__all__ = ["TransformerConfig", "Transformer", "MODEL_PRESETS", "model_preset"]

MODEL_TYPE = "maskdiff-transformer"
_INIT_STD = 0.02


# ----------------------------------------------------------------------------------------------
# Building blocks


def rope_tables(length: int, head_dim: int, base: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """Rotary cos/sin tables, each (length, head_dim // 2), always in float32.

    They are recomputed per forward pass (a few thousand elements) rather than stored as
    buffers, so casting the model to bf16 never rounds the angles.
    """
    dims = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)  # (hd/2,)
    inv_freq = base ** (-dims / head_dim)  # (hd/2,)
    positions = torch.arange(length, device=device, dtype=torch.float32)  # (L,)
    angles = torch.outer(positions, inv_freq)  # (L, hd/2)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate feature pairs (i, i + hd/2) of ``x`` (B, H, L, hd) by position; computed in float32."""
    x1, x2 = x.float().chunk(2, dim=-1)  # 2 × (B, H, L, hd/2)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (B, H, L, hd)
    return rotated.type_as(x)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: ``x * (1 + scale) + shift`` with x (B, L, D) and shift/scale (B, 1, D)."""
    return x * (1 + scale) + shift


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on queries and keys."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.causal = cfg.causal
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x (B, L, D), cos/sin (L, hd/2) → (B, L, D)."""
        B, L, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=-1)  # 3 × (B, L, D)
        q = q.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, L, hd)
        k = k.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, L, hd)
        v = v.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2)  # (B, H, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, L, hd)
        y = y.transpose(1, 2).reshape(B, L, D)  # (B, L, D)
        return self.proj(y)


class Block(nn.Module):
    """Pre-norm transformer block, adaLN-zero modulated when the model is time-conditioned."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.hidden_dim)
        self.mod_activation = cfg.mod_activation
        self.drop = nn.Dropout(cfg.dropout)
        # c → (shift, scale, gate) for attention and for the MLP; zero-initialised.
        self.modulation = nn.Linear(cfg.cond_dim, 6 * cfg.d_model) if cfg.time_conditioning else None
        # Time-agnostic: learned zero-initialised gates on the two residual branches instead.
        use_gates = cfg.residual_gates and not cfg.time_conditioning
        self.gate_attn = nn.Parameter(torch.zeros(cfg.d_model)) if use_gates else None
        self.gate_mlp = nn.Parameter(torch.zeros(cfg.d_model)) if use_gates else None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, c: Tensor | None) -> Tensor:
        """x (B, L, D), c (B, cond_dim) or None → (B, L, D)."""
        if self.modulation is None:
            attn = self.drop(self.attn(self.norm1(x), cos, sin))
            x = x + (attn if self.gate_attn is None else self.gate_attn * attn)
            mlp = self.drop(self.mlp(self.norm2(x)))
            return x + (mlp if self.gate_mlp is None else self.gate_mlp * mlp)
        mod = self.modulation(modulation_activation(self.mod_activation, c)).unsqueeze(1)  # (B, 1, 6D)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)  # 6 × (B, 1, D)
        x = x + gate1 * self.drop(self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin))
        return x + gate2 * self.drop(self.mlp(modulate(self.norm2(x), shift2, scale2)))


class Transformer(DenoiserBase):
    """Masked-diffusion denoiser: ``model(z (B, L), t (B,) | None) -> logits (B, L, V)``.

    Logits come back in the compute dtype (bf16 under autocast); callers cast to float32.

    Attributes:
        config: the :class:`TransformerConfig`.
        vocab_size: V. ``mask_id``: V, the MASK token id.
        time_conditioning: whether the output depends on ``t`` (False: ``t`` is ignored, and a
            sampler may reuse the output while ``z`` is unchanged).
    """

    config_class = TransformerConfig
    model_type = MODEL_TYPE

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.mask_id = config.vocab_size
        self.seq_len = config.seq_len
        self.time_conditioning = config.time_conditioning
        self.causal = config.causal

        self.tok_emb = nn.Embedding(config.vocab_size + 1, config.d_model)  # V real tokens + MASK
        self.num_classes = config.num_classes
        self.null_label = config.num_classes  # the "no label" id (classifier-free guidance)
        self.label_emb = nn.Embedding(config.num_classes + 1, config.d_model) if config.num_classes else None
        if config.image_shape is not None:
            h, w, ch = config.image_shape
            self.row_emb = nn.Embedding(h, config.d_model)
            self.col_emb = nn.Embedding(w, config.d_model)
            self.channel_emb = nn.Embedding(ch, config.d_model)
        else:
            self.row_emb = self.col_emb = self.channel_emb = None
        self.drop = nn.Dropout(config.dropout)
        self.time_embed = (
            TimeEmbedding(config.time_embed_dim, config.cond_dim, config.time_mlp_hidden)
            if config.time_conditioning else None
        )
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm_f = make_norm(config.norm, config.d_model, config.norm_eps)
        self.final_modulation = (
            nn.Linear(config.cond_dim, 2 * config.d_model) if config.time_conditioning else None
        )  # c → (shift, scale) of the final norm; zero-initialised
        self.head = (
            None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        )  # initialised by config.head_init
        self._init_weights()

    def _init_weights(self) -> None:
        """``config.init``: ``"gpt2"`` N(0, 0.02) weights with residual projections scaled by
        1/sqrt(2 n_layers); ``"fan_in"`` variance 1/fan_in (embeddings 1/d_model) with the MLP's
        scaled by 2/n_layers. Either way zeros where the network should start as identity
        (modulations). The head follows ``config.head_init``: variance 1/d_model, or zeros (a
        uniform first prediction)."""
        fan_in = self.config.init == "fan_in"
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if fan_in:
                    init_linear_fan_in(module)
                else:
                    nn.init.normal_(module.weight, std=_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=module.embedding_dim ** -0.5 if fan_in else _INIT_STD)
        for block in self.blocks:
            if fan_in:
                init_linear_fan_in(block.mlp.fc, gain=2 / self.config.n_layers)
                init_linear_fan_in(block.mlp.proj, gain=2 / self.config.n_layers)
            else:
                residual_std = _INIT_STD / math.sqrt(2 * self.config.n_layers)
                nn.init.normal_(block.attn.proj.weight, std=residual_std)
                nn.init.normal_(block.mlp.proj.weight, std=residual_std)
        zero_init = [block.modulation for block in self.blocks] + [self.final_modulation]
        if self.head is not None and self.config.head_init == "fan_in":
            init_linear_fan_in(self.head)
        else:
            zero_init.append(self.head)
        for module in zero_init:
            if module is not None:
                nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.head is None and self.config.head_init == "zero" and self.norm_f.weight is not None:
            # Tied head = embedding rows, which must not be zero; zero the final gain instead.
            nn.init.zeros_(self.norm_f.weight)

    # -- forward ---------------------------------------------------------------------------------

    def _image_positions(self, L: int, device: torch.device) -> Tensor:
        """Row + column + channel embeddings of the first L raster positions, (L, D)."""
        h, w, ch = self.config.image_shape  # type: ignore[misc]
        idx = torch.arange(L, device=device)
        return (self.row_emb(idx // (w * ch)) + self.col_emb((idx // ch) % w)  # type: ignore[misc]
                + self.channel_emb(idx % ch))  # type: ignore[misc]

    @property
    def head_weight(self) -> Tensor:
        """The output head's weight (V, D): the head itself or, tied, the first V embedding rows."""
        return self.tok_emb.weight[: self.vocab_size] if self.head is None else self.head.weight

    def forward(
        self,
        z: Tensor,
        t: Tensor | float | None = None,
        labels: Tensor | None = None,
        *,
        return_hidden: bool = False,
    ) -> Tensor:
        """Logits over the clean tokens.

        Args:
            z: (B, L) token ids in [0, V], V = MASK; 1 <= L <= seq_len.
            t: (B,) diffusion times in [0, 1] (a scalar is broadcast). Required when the model is
                time-conditioned, ignored otherwise.
            labels: (B,) class ids for a class-conditional model (``num_classes`` = no label;
                None means no label for every sequence).

            return_hidden: return the final hidden states (B, L, D) (after the last norm and its
                modulation) instead of the logits; ``hidden @ head_weight.T`` are the logits. The
                memory-lean loss applies the head to masked positions only
                (:func:`maskdiff.cross_entropy.linear_cross_entropy`).

        Returns:
            (B, L, V) logits in the compute dtype (or (B, L, D) hidden states).
        """
        z = self._check_tokens(z)
        B, L = z.shape
        c = None
        if self.time_embed is not None:
            c = self.time_embed(self._check_time(t, B, z.device))  # (B, cond_dim)
        cos, sin = rope_tables(L, self.config.head_dim, self.config.rope_base, z.device)  # 2 × (L, hd/2)
        x = self.tok_emb(z)  # (B, L, D)
        if self.row_emb is not None:
            x = x + self._image_positions(L, z.device)  # (L, D) broadcast over B
        label = self._label_embedding(labels, B, z.device)
        if label is not None:
            x = x + label  # (B, 1, D) broadcast over L
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, cos, sin, c)  # (B, L, D)
        x = self.norm_f(x)  # (B, L, D)
        if self.final_modulation is not None:
            act = modulation_activation(self.config.mod_activation, c)
            shift, scale = self.final_modulation(act).unsqueeze(1).chunk(2, dim=-1)  # 2 × (B, 1, D)
            x = modulate(x, shift, scale)
        if return_hidden:
            return x  # (B, L, D)
        if self.head is None:
            return F.linear(x, self.tok_emb.weight[: self.vocab_size])  # (B, L, V)
        return self.head(x)  # (B, L, V)

    # -- accounting ------------------------------------------------------------------------------

    def shard_units(self) -> list[nn.Module]:
        """The submodules FSDP shards one by one (each gathered just before it runs)."""
        return list(self.blocks)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Number of parameters; ``non_embedding`` leaves out the token embedding and output head."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.head is not None:
                n -= self.head.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs (forward + backward) per token at sequence length ``seq_len``.

        ``6 N + 6 d_model V + 12 n_layers d_model seq_len`` (Kaplan et al. 2020; PaLM appendix B):
        N is the non-embedding parameter count less the time-conditioning parameters (time MLP
        and modulation layers run once per sequence, not per token), ``6 d_model V`` is the
        output head and the last term the attention scores and weighted sum (bidirectional; a
        causal model does about half that work but is counted the same, as is customary).
        """
        cfg = self.config
        seq_len = cfg.seq_len if seq_len is None else seq_len
        per_sequence = sum(
            p.numel()
            for module in [self.time_embed, self.final_modulation, *(b.modulation for b in self.blocks)]
            if module is not None
            for p in module.parameters()
        )
        n = self.num_parameters(non_embedding=True) - per_sequence
        return 6.0 * n + 6.0 * cfg.d_model * cfg.vocab_size + 12.0 * cfg.n_layers * cfg.d_model * seq_len
