"""Denoiser networks and the one registry that maps an architecture name to its classes.

``network.json`` in a run folder names the architecture (absent = ``"transformer"``, as written by
0.1). Adding an architecture: write ``networks/<name>.py`` with a config dataclass (``to_dict``,
``from_dict``) and a :class:`~maskdiff.networks.base.DenoiserBase` subclass, then add one line to
:data:`ARCHITECTURES`.
"""

from __future__ import annotations

from typing import Any

from maskdiff.networks.base import CONFIG_NAME, WEIGHTS_NAME, DenoiserBase, TimeEmbedding
from maskdiff.networks.transformer import MODEL_PRESETS, Transformer, TransformerConfig, model_preset
from maskdiff.networks.unet import UNet, UNetConfig

__all__ = [
    "ARCHITECTURES",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "DenoiserBase",
    "MODEL_PRESETS",
    "TimeEmbedding",
    "Transformer",
    "TransformerConfig",
    "UNet",
    "UNetConfig",
    "build_network",
    "model_preset",
    "network_config_from_dict",
]

# name -> (config class, network class): the only place that lists the architectures.
ARCHITECTURES: dict[str, tuple[type, type[DenoiserBase]]] = {
    "transformer": (TransformerConfig, Transformer),
    "unet": (UNetConfig, UNet),
}


def network_config_from_dict(data: dict[str, Any]) -> Any:
    """The config object of a saved ``network.json`` (its ``"architecture"`` key picks the class;
    absent means ``"transformer"``)."""
    architecture = data.get("architecture", "transformer")
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown network architecture {architecture!r}; expected one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture][0].from_dict(data)


def build_network(config: Any) -> DenoiserBase:
    """The denoiser for a config of any registered architecture."""
    for config_class, network_class in ARCHITECTURES.values():
        if isinstance(config, config_class):
            return network_class(config)
    raise TypeError(f"no network for a config of type {type(config).__name__}; "
                    f"registered: {sorted(ARCHITECTURES)}")
