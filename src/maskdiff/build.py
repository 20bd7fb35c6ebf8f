"""From a run's config to objects: its data, its schedule, its network and its trainable model.

The only place a :class:`~maskdiff.config.RunConfig` becomes objects: :func:`run_data` loads the
run's data; :func:`network_config_for` translates the ``model`` section for the chosen
architecture and :func:`maskdiff.networks.build_network` builds it (the trainer, ``maskdiff.load``
and the checkpoint export all go through these).
"""

from __future__ import annotations

import os
from typing import Any

from maskdiff.config import DiffusionConfig, RunConfig, unet_channel_mult
from maskdiff.data import ImageSplits, TokenSplits, load_data, read_run_tokenizer
from maskdiff.model import MaskedDiffusion
from maskdiff.networks import TransformerConfig, UNetConfig, build_network
from maskdiff.schedules import Schedule, get_schedule

__all__ = ["build_schedule", "network_config_for", "build_model", "model_from_network", "run_data"]


def build_schedule(diffusion: DiffusionConfig, vocab_size: int) -> Schedule:
    """The schedule of a :class:`~maskdiff.config.DiffusionConfig` (per-token for GenMD4)."""
    if diffusion.method == "genmd4":
        return get_schedule("genmd4", vocab_size=vocab_size, init_exponent=diffusion.init_exponent, eps=diffusion.eps)
    name = diffusion.schedule
    params: dict[str, Any] = {"eps": diffusion.eps}
    if name == "polynomial":
        params["exponent"] = diffusion.exponent
    elif name == "geometric":
        params.update(beta_min=diffusion.beta_min, beta_max=diffusion.beta_max)
    return get_schedule(name, **params)


def network_config_for(
    config: RunConfig,
    vocab_size: int,
    *,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int = 0,
) -> TransformerConfig | UNetConfig:
    """The network config a run needs for a vocabulary of V tokens.

    ``image_shape`` (H, W, C) adds row/column/channel embeddings for pixel data (and is needed by
    ``model.architecture="unet"``); ``num_classes`` is used when ``model.class_conditional`` is set.
    """
    m = config.model
    if m.class_conditional and num_classes < 1:
        raise ValueError("model.class_conditional=true needs a labelled data set (this one has no labels)")
    num_classes = num_classes if m.class_conditional else 0
    if m.architecture == "unet":
        if image_shape is None:
            raise ValueError("model.architecture=unet needs image data (image_shape)")
        return UNetConfig(
            vocab_size=vocab_size, seq_len=config.data.seq_len, image_shape=image_shape,
            base_channels=m.d_model, channel_mult=unet_channel_mult(m), res_blocks=m.unet_res_blocks,
            mid_attention_layers=m.unet_attention_layers, n_heads=m.n_heads,
            time_conditioning=m.time_conditioning, num_classes=num_classes, dropout=m.dropout,
        )
    return TransformerConfig(
        vocab_size=vocab_size, seq_len=config.data.seq_len, n_layers=m.n_layers, d_model=m.d_model,
        n_heads=m.n_heads, mlp_ratio=m.mlp_ratio, time_conditioning=m.time_conditioning, causal=m.causal,
        dropout=m.dropout, num_classes=num_classes, image_shape=image_shape, head_init=m.head_init,
    )


def model_from_network(config: RunConfig, network: Any) -> MaskedDiffusion:
    """Wrap a built network with the run's schedule and objective."""
    d, m = config.diffusion, config.model
    return MaskedDiffusion(network, build_schedule(d, network.vocab_size), d.method, t1=d.t1,
                           antithetic=d.antithetic, label_dropout=m.label_dropout if m.class_conditional else 0.0)


def build_model(
    config: RunConfig,
    vocab_size: int,
    *,
    image_shape: tuple[int, int, int] | None = None,
    num_classes: int = 0,
) -> MaskedDiffusion:
    """The freshly initialised :class:`~maskdiff.model.MaskedDiffusion` of a run config."""
    net_cfg = network_config_for(config, vocab_size, image_shape=image_shape, num_classes=num_classes)
    return model_from_network(config, build_network(net_cfg))


def run_data(config: RunConfig, run_dir: str | os.PathLike | None = None) -> TokenSplits | ImageSplits:
    """The data a run trains and is evaluated on (its ``data`` section, through
    :func:`maskdiff.data.load_data`): the trainer, evaluation and plots all call this.

    ``run_dir``: the run's folder, when it exists. A run on ``data.corpus=files`` keeps its tokenizer
    there (``tokenizer.json``), and the data is then encoded with exactly that vocabulary, even if the
    files have changed since training.
    """
    d = config.data
    vocabulary = read_run_tokenizer(run_dir) if run_dir is not None and d.corpus.lower() == "files" else None
    return load_data(d.corpus, seq_len=d.seq_len, path=d.path, cache_dir=d.cache_dir, val_size=d.val_size,
                     tokenizer=d.tokenizer, records=d.records, vocabulary=vocabulary)
