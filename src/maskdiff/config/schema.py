"""The run configuration's schema: typed sections, :class:`RunConfig`, and its validation.

A run is described by one :class:`RunConfig` made of small sections; ``validate`` checks every
value's type and range (the key named) and the cross-field rules. Overrides (``--set``) live in
:mod:`maskdiff.config.overrides`, named presets in :mod:`maskdiff.config.presets`.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from maskdiff.data.images import IMAGE_DATASETS
from maskdiff.networks import ARCHITECTURES as NETWORK_ARCHITECTURES
from maskdiff.networks.variants import CHOICES as NETWORK_CHOICES

PARALLEL_MODES = ("ddp", "fsdp")  # values of train.parallel


@dataclass
class DataConfig:
    """What to train on. ``corpus``: wiki-char, wiki-gpt2, text8, hf:<dataset or local files>, files (your own
    text files at ``path``: docs/own-data.md), or an image set (mnist, digits, cifar10, imagenet64: every
    sub-pixel is a token, seq_len = H·W·C)."""

    corpus: str = "wiki-char"
    path: str | None = None  # text8(.zip) file, or local files / dataset name for hf:
    seq_len: int = 128
    cache_dir: str | None = None  # default: $MASKDIFF_CACHE or ~/.cache/maskdiff
    val_size: int | None = None  # cifar10/imagenet64: training images held out for validation (None: 5,000/10,000)
    tokenizer: str | None = None  # files: byte (None), char, gpt2, or a Hugging Face tokenizer.json / its folder
    records: str | None = None  # files: None (a file is a document), lines, or jsonl:FIELD (one record per line)


@dataclass
class ModelConfig:
    """Denoiser size (vocabulary size and sequence length come from the data).

    ``architecture="unet"`` (image sets only) builds :class:`maskdiff.networks.UNet`: ``d_model`` is
    then its base channel width, ``n_heads`` the heads of its middle attention, and the
    ``unet_*`` fields give its shape; ``n_layers`` and ``mlp_ratio`` are unused."""

    architecture: str = "transformer"  # transformer | unet
    n_layers: int = 3
    d_model: int = 128
    n_heads: int = 4
    mlp_ratio: float = 4.0
    time_conditioning: bool = False  # False: time-agnostic denoiser (exact sampler caching)
    dropout: float = 0.0
    causal: bool = False  # True only for the autoregressive baseline
    class_conditional: bool = False  # label embedding (image sets with labels)
    label_dropout: float = 0.1  # P(label → "no label") in training, for classifier-free guidance
    unet_channel_mult: str = "1,2,2"  # width multiplier per resolution (comma-separated)
    unet_res_blocks: int = 2  # residual blocks per resolution
    unet_attention_layers: int = 1  # self-attention + residual block pairs at the lowest resolution
    head_init: str = "fan_in"  # transformer output head at start: fan_in | zero (0.1/0.2; uniform first prediction)


@dataclass
class DiffusionConfig:
    """Method and masking schedule (docs/math.md)."""

    method: str = "md4"  # md4 | genmd4
    schedule: str = "linear"  # linear | cosine | polynomial | geometric (md4 only)
    exponent: float = 1.0  # polynomial schedule exponent
    beta_min: float = 1e-5  # geometric schedule
    beta_max: float = 20.0
    eps: float = 1e-4  # clipping of α to [ε, 1 - ε]
    init_exponent: float = 1.0  # GenMD4's initial per-token exponent
    t1: float = 1e-3  # GenMD4's lower time limit
    antithetic: bool = True  # stratified time sampling across the batch


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay, global-norm clipping, EMA of weights."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.0  # final lr = lr * min_lr_ratio
    warmup_steps: int = 2000
    decay: str = "cosine"  # cosine | constant
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    ema_decay: float = 0.9999  # 0 disables the EMA (evaluation then uses the raw weights)


@dataclass
class TrainConfig:
    """Loop settings. ``batch_size`` is global: per step, over all processes and accumulation."""

    steps: int = 1_000_000
    batch_size: int = 512
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    compile: bool = False
    log_every: int = 50
    eval_every: int = 5000
    eval_batches: int = 20  # validation batches per periodic evaluation (0: whole split)
    save_every: int = 5000
    keep_checkpoints: int = 2
    num_threads: int = 0  # CPU threads for torch (0: leave torch's default)
    # Data parallelism under torchrun (no effect with one process): "ddp" replicates the model on
    # every process; "fsdp" shards parameters, gradients and optimiser state across processes
    # (FSDP2, for models that do not fit one device). Same results and checkpoints either way.
    parallel: str = "ddp"  # ddp | fsdp
    max_nonfinite_steps: int = 10  # steps in a row with a non-finite loss/gradient (skipped) before training stops


@dataclass
class RunConfig:
    name: str = "run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def validate(self) -> "RunConfig":
        """Check cross-field constraints; raise ValueError naming the field and the fix."""
        check_types(self)
        check_ranges(self)
        d, m, t, o = self.diffusion, self.model, self.train, self.optim
        if d.method not in ("md4", "genmd4", "ar"):
            raise ValueError(f"diffusion.method must be md4, genmd4 or ar, got {d.method!r}")
        if d.method == "ar" and not m.causal:
            raise ValueError("diffusion.method=ar needs model.causal=true")
        if d.method == "ar" and m.time_conditioning:
            raise ValueError("diffusion.method=ar has no diffusion time: set model.time_conditioning=false")
        if d.method != "ar" and m.causal:
            raise ValueError("model.causal=true is only for diffusion.method=ar (masked diffusion needs bidirectional attention)")
        if m.head_init not in HEAD_INITS:
            raise ValueError(f"model.head_init must be one of {', '.join(HEAD_INITS)}, got {m.head_init!r}")
        if m.architecture not in ARCHITECTURES:
            raise ValueError(f"model.architecture must be one of {', '.join(ARCHITECTURES)}, got {m.architecture!r}")
        if m.architecture == "unet":
            if self.data.corpus.lower() not in IMAGE_DATASETS:
                raise ValueError(f"model.architecture=unet is for image data ({', '.join(IMAGE_DATASETS)}); "
                                 f"data.corpus={self.data.corpus!r} needs model.architecture=transformer")
            if m.causal:
                raise ValueError("model.causal=true needs model.architecture=transformer")
            unet_channel_mult(m)  # raises on a malformed list
        if m.architecture == "transformer" and m.d_model % m.n_heads:
            raise ValueError(f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
        if t.batch_size % t.grad_accum:
            raise ValueError(f"train.batch_size={t.batch_size} must be divisible by train.grad_accum={t.grad_accum}")
        if o.decay not in ("cosine", "constant"):
            raise ValueError(f"optim.decay must be cosine or constant, got {o.decay!r}")
        if m.class_conditional and d.method == "ar":
            raise ValueError("model.class_conditional is for diffusion models, not the AR baseline")
        if t.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.dtype must be auto, bf16 or fp32, got {t.dtype!r}")
        if t.parallel not in PARALLEL_MODES:
            raise ValueError(f"train.parallel must be one of {', '.join(PARALLEL_MODES)}, got {t.parallel!r}")
        check_file_settings(self.data)
        return self


ARCHITECTURES = tuple(NETWORK_ARCHITECTURES)  # the names registered in maskdiff.networks
HEAD_INITS = NETWORK_CHOICES["head_init"]  # how the transformer's output head starts

# Ranges of the numeric fields: key -> (lowest, highest (excluded), whether the lowest is allowed).
# Every float must also be finite: inf and nan are refused for every key.
_INF = math.inf
RANGES: dict[str, tuple[float, float, bool]] = {
    **dict.fromkeys(("model.n_layers", "model.d_model", "model.n_heads", "model.unet_res_blocks", "train.steps",
                     "train.batch_size", "train.grad_accum", "train.log_every", "train.max_nonfinite_steps"),
                    (1, _INF, True)),
    **dict.fromkeys(("model.unet_attention_layers", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
                     "optim.min_lr_ratio", "train.eval_every", "train.eval_batches", "train.save_every",
                     "train.keep_checkpoints", "train.num_threads"), (0, _INF, True)),
    **dict.fromkeys(("model.mlp_ratio", "diffusion.exponent", "diffusion.init_exponent", "optim.lr"), (0, _INF, False)),
    **dict.fromkeys(("model.dropout", "model.label_dropout", "diffusion.t1", "optim.beta1", "optim.beta2",
                     "optim.ema_decay"), (0, 1, True)),
    "data.seq_len": (2, _INF, True),
    "diffusion.eps": (0, 0.5, True),
}
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _field_types() -> dict[str, tuple[str, str, type, bool]]:
    """key -> (section, field, type, None allowed) for every field of every section."""
    out = {}
    for sec, cls in _section_classes().items():
        for name, hint in typing.get_type_hints(cls).items():
            args = typing.get_args(hint)
            optional = type(None) in args
            base = next(a for a in args if a is not type(None)) if optional else hint
            out[f"{sec}.{name}"] = (sec, name, base, optional)
    return out


def check_types(config: "RunConfig") -> None:
    """Every field holds a value of its type (a config.json edited by hand may not): ValueError naming the key."""
    if not isinstance(config.name, str):
        raise ValueError(f"name={config.name!r}: expected a string")
    for key, (sec, name, kind, optional) in _field_types().items():
        value = getattr(getattr(config, sec), name)
        if value is None and optional:
            continue
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(f"{key}={value!r}: expected {_TYPE_NAMES.get(kind, kind.__name__)}")


def check_ranges(config: "RunConfig") -> None:
    """Every number is finite and inside its range (:data:`RANGES`): ValueError naming the key, the value and the range."""
    for key, (sec, name, kind, _) in _field_types().items():
        value = getattr(getattr(config, sec), name)
        if kind is float and value is not None and not math.isfinite(value):
            raise ValueError(f"{key}={value}: must be a finite number")
        if key not in RANGES or value is None:
            continue
        lo, hi, lo_ok = RANGES[key]
        if value < lo or (value == lo and not lo_ok) or value >= hi:
            what = "an integer" if kind is int else "a number"
            span = f"≥ {lo:g}" if hi == math.inf else f"in [{lo:g}, {hi:g})"
            span = span if lo_ok else span.replace("≥", ">").replace("[", "(")
            raise ValueError(f"{key}={value}: must be {what} {span}")


def check_file_settings(data: DataConfig) -> None:
    """``data.tokenizer`` and ``data.records`` apply to ``data.corpus=files`` only; ``data.records`` is
    ``lines`` or ``jsonl:FIELD``. (A tokenizer path is checked when the data is loaded.)"""
    if data.corpus.lower() != "files":
        for key in ("tokenizer", "records"):
            if getattr(data, key) is not None:
                raise ValueError(f"data.{key}={getattr(data, key)!r} applies only to data.corpus=files (your own text "
                                 f"files), not to data.corpus={data.corpus!r}: remove data.{key}")
        return
    if data.tokenizer is not None and not data.tokenizer.strip():
        raise ValueError("data.tokenizer='': name byte, char, gpt2 or a Hugging Face tokenizer.json (or omit it for byte)")
    records = data.records
    if records is not None and records != "lines" and not (records.startswith("jsonl:") and records[6:].strip()):
        raise ValueError(f"data.records={records!r}: expected lines (one record per line) or jsonl:FIELD (one JSON "
                         "object per line, the record in its string field FIELD)")


def unet_channel_mult(model: ModelConfig) -> tuple[int, ...]:
    """``model.unet_channel_mult`` ("1,2,2") as a tuple of positive integers."""
    try:
        mult = tuple(int(v) for v in model.unet_channel_mult.split(","))
    except ValueError:
        mult = ()
    if not mult or min(mult) < 1:
        raise ValueError(f"model.unet_channel_mult must be comma-separated positive integers such as 1,2,2; "
                         f"got {model.unet_channel_mult!r}")
    return mult


def _section_classes() -> dict[str, type]:
    return {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig, "optim": OptimConfig, "train": TrainConfig}
