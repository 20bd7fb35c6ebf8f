"""Typed run configuration, named presets, and ``key=value`` overrides.

A run is described by one :class:`RunConfig` made of small sections (:mod:`.schema`). Presets are
plain functions returning a RunConfig (:mod:`.presets`); ``--set section.key=value`` overrides any
field (:mod:`.overrides`: values are parsed to the field's type; unknown keys are rejected with the
list of valid ones). The resolved config is written as ``config.json`` in every run folder so that
a run can be rebuilt from it.
"""

from maskdiff.config.overrides import apply_overrides, config_from_dict, valid_keys
from maskdiff.config.presets import PRESETS, get_preset
from maskdiff.config.schema import (
    ARCHITECTURES,
    PARALLEL_MODES,
    RANGES,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    check_ranges,
    check_types,
    unet_channel_mult,
)

__all__ = [
    "DataConfig",
    "ModelConfig",
    "DiffusionConfig",
    "OptimConfig",
    "TrainConfig",
    "RunConfig",
    "PRESETS",
    "get_preset",
    "apply_overrides",
    "config_from_dict",
    "valid_keys",
    "PARALLEL_MODES",
    "ARCHITECTURES",
    "RANGES",
    "check_types",
    "check_ranges",
    "unet_channel_mult",
]
