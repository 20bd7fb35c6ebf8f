"""Likelihood evaluation over a whole split, with Monte Carlo error bars.

The split is cut into non-overlapping chunks of ``seq_len`` tokens (the trailing partial chunk
is dropped). For each chunk the negative ELBO (nats) is estimated with ``num_time_draws``
independent time/mask draws (continuous time, or discrete time with ``num_steps``); the AR
baseline gives its exact NLL. Reported:

* ``bits_per_token`` = mean NELBO / (L ln 2), ``nats_per_token``, ``perplexity`` = exp(nats/token);
* ``stderr``: the standard error of ``bits_per_token`` computed from the spread of the
  per-chunk estimates. It covers the Monte Carlo noise of the estimator *and* the variation
  between chunks, so it is conservative as a Monte Carlo error for a fixed split;
* ``mc_stderr`` (when ``num_time_draws ≥ 2``): the Monte Carlo error alone, from the spread of
  the draws within each chunk;
* ``ci95`` = bits_per_token ± 1.96 · stderr.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from maskdiff.data import eval_chunks, num_eval_chunks
from maskdiff.metrics import LN2, MeanEstimate

__all__ = ["evaluate_nelbo", "evaluate_images", "evaluate_batches"]


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

    Deterministic given ``seed`` and ``batch_size`` (times are drawn antithetically across each
    batch, and each batch's generator is seeded from ``seed`` and its index). With ``world_size > 1`` (an initialised process group), rank r
    evaluates batches r, r + world, ... and the sums are all-reduced.
    """
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
    from maskdiff.data.images import eval_image_batches

    n = len(images) if max_images is None else min(len(images), max_images)
    if n == 0:
        raise ValueError("the image split is empty")
    batches = eval_image_batches(images, labels, batch_size, max_images=n)
    return evaluate_batches(model, batches, seq_len=int(images.shape[1]), num_batches=math.ceil(n / batch_size),
                            **kwargs)


def _is_sharded(model: Any) -> bool:
    """Whether ``model`` is an FSDP2 (``fully_shard``) module, whose forward is a collective."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch build without distributed support
        return False
    return isinstance(model, FSDPModule)


def evaluate_batches(
    model: Any,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
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
) -> dict[str, Any]:
    """The loop behind :func:`evaluate_nelbo` and :func:`evaluate_images`: batches of (x, labels).

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
    per_chunk: list[torch.Tensor] = []  # mean over draws, (b,)
    within_var: list[torch.Tensor] = []  # variance over draws / K, (b,)
    terms_sum: dict[str, float] = {}
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_batches, desc="evaluate", unit="batch")
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    lockstep = world_size > 1 and _is_sharded(model)
    spare: tuple[torch.Tensor, torch.Tensor | None] | None = None  # a batch for lock-step padding
    seen = 0
    for index, (x, labels) in enumerate(batches):
        seen = index + 1
        if bar is not None:
            bar.update(1)
        if lockstep and spare is None:
            spare = (x, labels)
        if index % world_size != rank:
            continue
        generator.manual_seed(seed * 1_000_003 + index)  # each batch's draws independent of the split order
        x = x.to(device)
        extra = {} if labels is None else {"labels": labels.to(device)}
        draws = []
        for _ in range(num_time_draws):
            with autocast:
                terms = model(x, generator=generator, num_steps=num_steps, **extra)
            draws.append(terms["nelbo"].double())
            for key in ("diffusion", "reconstruction", "prior"):
                terms_sum[key] = terms_sum.get(key, 0.0) + float(terms[key].double().sum()) / num_time_draws
        stacked = torch.stack(draws)  # (K, b)
        per_chunk.append(stacked.mean(0).cpu())
        if num_time_draws > 1:
            within_var.append((stacked.var(0, unbiased=True) / num_time_draws).cpu())
    if bar is not None:
        bar.close()
    if lockstep and spare is not None:
        missing = math.ceil(seen / world_size) - len(range(rank, seen, world_size))  # 0 or 1
        x, labels = spare
        extra = {} if labels is None else {"labels": labels.to(device)}
        for _ in range(missing * num_time_draws):
            with autocast:
                model(x.to(device), generator=generator, num_steps=num_steps, **extra)  # result unused
    values = torch.cat(per_chunk) if per_chunk else torch.zeros(0, dtype=torch.float64)
    # Sufficient statistics, summed over ranks: n, Σv, Σv², Σ within-chunk variance, terms.
    stats = torch.tensor(
        [values.numel(), values.sum().item(), (values**2).sum().item(),
         torch.cat(within_var).sum().item() if within_var else 0.0,
         terms_sum.get("diffusion", 0.0), terms_sum.get("reconstruction", 0.0), terms_sum.get("prior", 0.0)],
        dtype=torch.float64, device=device,
    )
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(stats)
    n, s1, s2, wvar, diff, recon, prior = stats.tolist()
    n = int(n)
    mean = s1 / n
    var = max(0.0, (s2 - n * mean**2) / max(1, n - 1))
    to_bits = 1.0 / (seq_len * LN2)
    estimate = MeanEstimate(mean, math.sqrt(var / n) if n > 1 else float("inf"), n).scaled(to_bits)
    result: dict[str, Any] = {
        "bits_per_token": estimate.mean,
        "stderr": estimate.stderr,
        "ci95": list(estimate.ci95),
        "nats_per_token": mean / seq_len,
        "perplexity": math.exp(mean / seq_len),
        "n_sequences": n,
        "seq_len": seq_len,
        "num_time_draws": num_time_draws,
        "num_steps": num_steps,
        "seed": seed,
        "terms_bits_per_token": {
            "diffusion": diff / n * to_bits,
            "reconstruction": recon / n * to_bits,
            "prior": prior / n * to_bits,
        },
    }
    if num_time_draws > 1:
        result["mc_stderr"] = math.sqrt(wvar) / n * to_bits
    if was_training:
        model.train()
    return result
