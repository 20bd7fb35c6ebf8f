"""The one likelihood evaluation loop, with Monte Carlo error bars (docs/math.md, "Evaluation").

Every evaluation — a text split cut into chunks, an image split, zero-shot sequences with score
masks — is a stream of batches ``(x, labels | None[, score_mask | None])`` given to
:func:`evaluate_batches`. For each sequence i the negative ELBO (nats) is estimated with
``num_time_draws`` independent time/mask draws (continuous time, or discrete time with
``num_steps``; the AR baseline gives its exact NLL); ``y_i`` is the mean of the draws and ``n_i``
the number of scored tokens (every position without a score mask). Batch k draws from a generator
seeded with :func:`maskdiff.metrics.eval_seed` ``(seed, k)``, so results do not depend on the order
or number of batches before it. Reported:

* ``nats_per_token`` = Σ y_i / Σ n_i (token-weighted), ``bits_per_token`` = that / ln 2 (bits per
  dimension on images), ``perplexity`` = exp(nats per token);
* ``stderr`` (bits) and ``stderr_nats``: the ratio estimator's standard error
  (:func:`maskdiff.metrics.ratio_estimate`; docs/math.md, "Token-weighted averages: the ratio
  estimator"). It covers the Monte Carlo noise *and* the variation between sequences, so it is
  conservative as a Monte Carlo error for a fixed split;
* ``mc_stderr`` / ``mc_stderr_nats`` (when ``num_time_draws ≥ 2``): the Monte Carlo error alone,
  from the spread of the draws within each sequence;
* ``ci95`` / ``ci95_nats`` = estimate ± Z95 · stderr, ``perplexity_ci95`` its exp;
* ``terms_bits_per_token`` / ``terms_nats_per_token``: the diffusion, reconstruction and prior
  terms; ``n_sequences``, ``n_scored_tokens`` and the settings.

When every n_i = L (no score masks: :func:`evaluate_nelbo`, :func:`evaluate_images`) these are
the per-sequence figures ``mean(y) / L`` with ``stderr = sd(y) / √N / L`` (docs/math.md, "Monte
Carlo mean and standard error"): the two estimators coincide.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from maskdiff.data import ImageSplits, TokenSplits, eval_chunks, eval_image_batches, num_eval_chunks
from maskdiff.metrics import LN2, eval_seed, ratio_estimate

__all__ = ["evaluate_nelbo", "evaluate_images", "evaluate_split", "evaluate_batches"]

#: A batch: tokens (b, L), labels (b,) or None, and optionally a bool score mask (b, L) or None.
Batch = tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor | None]


@torch.no_grad()
def evaluate_nelbo(
    model: Any,
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int = 64,
    num_time_draws: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    max_chunks: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Negative ELBO of ``model`` (a :class:`maskdiff.model.MaskedDiffusion`) on a token stream.

    The stream is cut into non-overlapping chunks of ``seq_len`` tokens (the trailing partial
    chunk is dropped). Deterministic given ``seed`` and ``batch_size`` (times are drawn
    antithetically across each batch, and each batch's generator is seeded from ``seed`` and its
    index). With ``world_size > 1`` (an initialised process group), rank r evaluates batches
    r, r + world, ... and the statistics are all-reduced.
    """
    _check_counts(batch_size, max_chunks, "max_chunks")
    n_total = num_eval_chunks(tokens, seq_len)
    if max_chunks is not None:
        n_total = min(n_total, max_chunks)
    if n_total == 0:
        raise ValueError(f"the split holds {len(tokens)} tokens, fewer than one chunk of seq_len={seq_len}")
    batches = ((x, None) for x in eval_chunks(tokens, seq_len, batch_size, max_chunks=n_total))
    return evaluate_batches(model, batches, seq_len=seq_len, num_batches=math.ceil(n_total / batch_size),
                            num_time_draws=num_time_draws, num_steps=num_steps, seed=seed, device=device,
                            autocast_dtype=autocast_dtype, progress=progress, rank=rank, world_size=world_size)


@torch.no_grad()
def evaluate_images(
    model: Any,
    images: np.ndarray,
    labels: np.ndarray | None,
    *,
    batch_size: int = 64,
    max_images: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Negative ELBO on an image split (N, H*W*C); ``bits_per_token`` is then bits per dimension.

    ``labels`` are passed to a class-conditional model (None for an unconditional one).
    """
    _check_counts(batch_size, max_images, "max_images")
    n = len(images) if max_images is None else min(len(images), max_images)
    if n == 0:
        raise ValueError("the image split is empty")
    batches = eval_image_batches(images, labels, batch_size, max_images=n)
    return evaluate_batches(model, batches, seq_len=int(images.shape[1]), num_batches=math.ceil(n / batch_size),
                            **kwargs)


def _check_counts(batch_size: int, limit: int | None, name: str) -> None:
    """A batch size and an optional limit on the sequences are positive integers (before any work)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{name} must be a positive integer (None: the whole split), got {limit!r}")


def _network_attribute(model: Any, name: str) -> Any:
    """``model.network.<name>``, looking through a DDP wrapper's ``module``."""
    for obj in (model, getattr(model, "module", None)):
        network = getattr(obj, "network", None)
        if network is not None and hasattr(network, name):
            return getattr(network, name)
    raise ValueError(f"cannot read the network's {name} from a {type(model).__name__}; pass it explicitly")


@torch.no_grad()
def evaluate_split(
    model: Any,
    data: TokenSplits | ImageSplits,
    split: str,
    *,
    batch_size: int,
    max_n: int | None = None,
    num_time_draws: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    seq_len: int | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, Any]:
    """Negative ELBO of ``model`` on split ``split`` of a run's data, text or images alike.

    Text (:class:`~maskdiff.data.TokenSplits`): :func:`evaluate_nelbo` over chunks of ``seq_len``
    tokens (default the network's ``seq_len``), at most ``max_n`` chunks. Images
    (:class:`~maskdiff.data.ImageSplits`): :func:`evaluate_images` over at most ``max_n`` images,
    with the split's labels when the network is class-conditional. The other arguments are
    :func:`evaluate_batches`'.
    """
    common = dict(batch_size=batch_size, num_time_draws=num_time_draws, num_steps=num_steps, seed=seed,
                  device=device, autocast_dtype=autocast_dtype, progress=progress, rank=rank,
                  world_size=world_size)
    if isinstance(data, ImageSplits):
        labels = data.labels(split) if _network_attribute(model, "num_classes") else None
        return evaluate_images(model, data.split(split), labels, max_images=max_n, **common)
    if isinstance(data, TokenSplits):
        length = seq_len if seq_len is not None else int(_network_attribute(model, "seq_len"))
        return evaluate_nelbo(model, data.split(split), seq_len=length, max_chunks=max_n, **common)
    raise TypeError(f"data must be TokenSplits or ImageSplits, got {type(data).__name__}")


def _is_sharded(model: Any) -> bool:
    """Whether ``model`` is an FSDP2 (``fully_shard``) module, whose forward is a collective."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(model, FSDPModule)


def _unpack(batch: Batch) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(x, labels, score_mask) of a batch given as (x, labels) or (x, labels, score_mask)."""
    if len(batch) == 2:
        return batch[0], batch[1], None  # type: ignore[misc]
    if len(batch) == 3:
        return batch  # type: ignore[return-value]
    raise ValueError(f"a batch is (x, labels) or (x, labels, score_mask), got {len(batch)} items")


def _model_kwargs(labels: Tensor | None, score_mask: Tensor | None, device: torch.device) -> dict[str, Tensor]:
    """Keyword arguments of the model call. A score mask that scores every position is left
    out, so that fully scored batches take exactly the unmasked path."""
    kwargs = {}
    if labels is not None:
        kwargs["labels"] = labels.to(device)
    if score_mask is not None and not bool(score_mask.all()):
        kwargs["score_mask"] = score_mask.to(device=device, dtype=torch.bool)
    return kwargs


def _scored_counts(x: Tensor, score_mask: Tensor | None) -> Tensor:
    """n_i: the scored positions of each sequence, float64 (b,)."""
    if score_mask is None:
        return torch.full((x.shape[0],), float(x[0].numel()), dtype=torch.float64)
    return score_mask.flatten(1).sum(1).double().cpu()


def _pad_lockstep(spare: tuple[Tensor, Tensor | None, Tensor | None], seen: int, *, rank: int,
                  world_size: int, calls_per_batch: int, call: Any, device: torch.device) -> None:
    """FSDP lock-step: a sharded forward is a collective, so a rank with one batch fewer than the
    others repeats a batch (``spare``) and discards the result; all ranks make the same calls."""
    missing = math.ceil(seen / world_size) - len(range(rank, seen, world_size))  # 0 or 1
    x, labels, score_mask = spare
    kwargs = _model_kwargs(labels, score_mask, device)
    for _ in range(missing * calls_per_batch):
        call(x.to(device), kwargs)  # result unused


class _Statistics:
    """Per-sequence sufficient statistics (y_i, n_i, within-sequence variance of the mean) and the
    term sums. Each rank writes its sequences at their global positions; one all-reduce then gives
    every rank the whole split, whatever the number of ranks."""

    TERMS = ("diffusion", "reconstruction", "prior")

    def __init__(self) -> None:
        self.parts: list[tuple[int, Tensor, Tensor, Tensor]] = []  # (offset, y, n, within variance)
        self.terms = dict.fromkeys(self.TERMS, 0.0)

    def add(self, offset: int, draws: list[dict[str, Tensor]], counts: Tensor) -> None:
        stacked = torch.stack([d["nelbo"].double() for d in draws])  # (K, b)
        k = len(draws)
        within = stacked.var(0, unbiased=True) / k if k > 1 else torch.zeros_like(stacked[0])
        self.parts.append((offset, stacked.mean(0).cpu(), counts, within.cpu()))
        for d in draws:
            for key in self.TERMS:
                self.terms[key] += float(d[key].double().sum()) / k

    def reduce(
        self, total: int, *, device: torch.device, world_size: int
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, float]]:
        """(y, n, within variance) of every evaluated sequence, in split order, and the term sums."""
        table = torch.zeros(4, total, dtype=torch.float64)  # rows: y, n, within variance, evaluated
        for offset, y, n, within in self.parts:
            part = slice(offset, offset + y.numel())
            table[0, part], table[1, part], table[2, part], table[3, part] = y, n, within, 1.0
        flat = torch.cat([table.flatten(), torch.tensor([self.terms[k] for k in self.TERMS], dtype=torch.float64)])
        if world_size > 1 and dist.is_initialized():
            flat = flat.to(device)
            dist.all_reduce(flat)
            flat = flat.cpu()
        table, sums = flat[: 4 * total].view(4, total), flat[4 * total:]
        keep = table[3] > 0
        return table[0, keep], table[1, keep], table[2, keep], dict(zip(self.TERMS, sums.tolist()))


def _safe_exp(v: float) -> float:
    return math.exp(v) if v < 700 else float("inf")


def _summary(y: Tensor, n: Tensor, within: Tensor, terms: dict[str, float], num_time_draws: int) -> dict[str, Any]:
    """The reported fields from the per-sequence statistics (see the module docs)."""
    nats = ratio_estimate(y, n)  # nats per scored token
    bits = nats.scaled(1.0 / LN2)
    tokens = float(n.sum())
    lo, hi = nats.ci95
    result: dict[str, Any] = {
        "bits_per_token": bits.mean,
        "stderr": bits.stderr,
        "ci95": list(bits.ci95),
        "nats_per_token": nats.mean,
        "stderr_nats": nats.stderr,
        "ci95_nats": [lo, hi],
        "perplexity": math.exp(nats.mean),
        "perplexity_ci95": [_safe_exp(lo), _safe_exp(hi)],
        "n_sequences": nats.n,
        "n_scored_tokens": int(round(tokens)),
        "terms_bits_per_token": {k: v / tokens / LN2 for k, v in terms.items()},
        "terms_nats_per_token": {k: v / tokens for k, v in terms.items()},
    }
    if num_time_draws > 1:
        result["mc_stderr_nats"] = math.sqrt(float(within.sum())) / tokens
        result["mc_stderr"] = result["mc_stderr_nats"] / LN2
    return result


def _progress_bar(show: bool, total: int | None, desc: str) -> Any:
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch")


@torch.no_grad()
def evaluate_batches(
    model: Any,
    batches: Iterable[Batch],
    *,
    seq_len: int,
    num_batches: int | None = None,
    num_time_draws: int = 1,
    num_steps: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    rank: int = 0,
    world_size: int = 1,
    desc: str = "evaluate",
) -> dict[str, Any]:
    """The evaluation loop: batches of ``(x, labels)`` or ``(x, labels, score_mask)``.

    ``model(x, generator=, num_steps=[, labels=][, score_mask=])`` returns per-sequence terms
    (a :class:`maskdiff.model.MaskedDiffusion`); a score mask is passed only for batches with an
    unscored position. Fields: see the module docs.

    Rank r of ``world_size`` evaluates batches r, r + world_size, ... (every rank iterates all
    batches). A model sharded with FSDP (``fully_shard``) gathers its parameters in every forward,
    a collective: ranks with one batch fewer then run matching forward passes on a batch they
    skipped and discard them, so that all ranks make the same number of calls.
    """
    if num_time_draws < 1:
        raise ValueError(f"num_time_draws must be at least 1, got {num_time_draws}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device)
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )

    def call(x: Tensor, kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        with autocast:
            return model(x, generator=generator, num_steps=num_steps, **kwargs)

    lockstep = world_size > 1 and _is_sharded(model)
    spare: tuple[Tensor, Tensor | None, Tensor | None] | None = None  # a batch for lock-step padding
    stats = _Statistics()
    bar = _progress_bar(progress and rank == 0, num_batches, desc)
    seen = total = 0
    for index, batch in enumerate(batches):
        x, labels, score_mask = _unpack(batch)
        offset, seen, total = total, index + 1, total + x.shape[0]
        if bar is not None:
            bar.update(1)
        if lockstep and spare is None:
            spare = (x, labels, score_mask)
        if index % world_size != rank:
            continue
        generator.manual_seed(eval_seed(seed, index))  # each batch's draws independent of the split order
        kwargs = _model_kwargs(labels, score_mask, device)
        x = x.to(device)
        draws = [call(x, kwargs) for _ in range(num_time_draws)]
        stats.add(offset, draws, _scored_counts(x, score_mask))
    if bar is not None:
        bar.close()
    if lockstep and spare is not None:
        _pad_lockstep(spare, seen, rank=rank, world_size=world_size, calls_per_batch=num_time_draws,
                      call=call, device=device)
    y, n, within, terms = stats.reduce(total, device=device, world_size=world_size)
    if was_training:
        model.train()
    result = _summary(y, n, within, terms, num_time_draws)
    result.update(seq_len=seq_len, num_time_draws=num_time_draws, num_steps=num_steps, seed=seed)
    return result
