"""Generation from a run folder: texts (from scratch, from a prompt/suffix, or filling gaps) and
image grids. :func:`generate_tokens` is the one sampling path behind ``maskdiff sample`` and the
generative-perplexity app; the network arithmetic (fp32, bf16, bf16 replayed from a CUDA graph)
is chosen here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from maskdiff import runs
from maskdiff.apps.images import class_grid, save_grid, unmasking_strip
from maskdiff.data import CHAR_CORPORA
from maskdiff.devices import resolve_device
from maskdiff.sampling import SampleInfo, fixed_from_template, make_fixed, sample
from maskdiff.sampling.cuda_graph import GraphDenoiser

__all__ = ["generate_tokens", "generate_text", "generate_images", "write_image_samples"]


def _open(run_dir: str | os.PathLike | runs.LoadedRun, device: torch.device) -> runs.LoadedRun:
    return run_dir if isinstance(run_dir, runs.LoadedRun) else runs.load(run_dir, device=device)


def _fixed_tokens(run: runs.LoadedRun, length: int, prompt: str | None, suffix: str | None, infill: str | None,
                  gap: str, gap_length: int) -> tuple[torch.Tensor | None, int]:
    """The tokens a request fixes (FREE elsewhere) and the sample length they imply."""
    cfg, tok = run.config, run.tokenizer

    def encode(text: str) -> list[int]:
        if cfg.data.corpus in CHAR_CORPORA:
            return tok.encode(text, normalize=True)
        return tok.encode(text)

    if infill is not None:
        if prompt or suffix:
            raise ValueError("use either --infill or --prompt/--suffix, not both")

        class _Enc:  # the template's text pieces go through the same normalisation as prompts
            def encode(self, text: str) -> list[int]:
                return encode(text)

        fixed = fixed_from_template(infill, _Enc(), gap=gap, gap_length=gap_length, length=None)
        if fixed.shape[1] > cfg.data.seq_len:
            raise ValueError(f"the infill template needs {fixed.shape[1]} tokens; the model takes at most {cfg.data.seq_len}")
        return fixed, fixed.shape[1]
    if prompt or suffix:
        return make_fixed(length, prefix=encode(prompt) if prompt else None,
                          suffix=encode(suffix) if suffix else None), length
    return None, length


def generate_tokens(run_dir: str | Any, *, num: int = 4, length: int | None = None, steps: int = 256,
                    grid: str = "cosine", sampler: str = "ancestral", top_p: float | None = None,
                    top_k: int | None = None, temperature: float = 1.0, precision: str = "float64",
                    prompt: str | None = None, suffix: str | None = None, infill: str | None = None,
                    gap: str = "___", gap_length: int = 16, seed: int = 0, cache: bool = True,
                    device: str = "auto", progress: bool = True, compute: str = "auto",
                    ) -> tuple[torch.Tensor, dict[str, Any], runs.LoadedRun]:
    """Sample ``num`` token sequences from a text run folder (or an already loaded run).

    Returns (tokens (num, length) on the CPU, settings, the loaded run). Bad requests raise
    ValueError naming the fix (the command line prints them as one line).

    ``compute``: ``fp32`` (the network in float32), ``bf16`` (autocast, CUDA), ``bf16-graph``
    (autocast, replayed from a CUDA graph: :class:`~maskdiff.sampling.cuda_graph.GraphDenoiser`); ``auto`` is
    ``bf16-graph`` on CUDA and ``fp32`` elsewhere.
    """
    dev = resolve_device(device)
    run = _open(run_dir, dev)
    if run.model.network.config.image_shape is not None:
        raise ValueError("this is an image run; `maskdiff sample` writes image grids for it")
    model, cfg = run.model, run.config
    if cfg.diffusion.method == "ar":
        raise ValueError("this run is the autoregressive baseline; `maskdiff sample` draws from diffusion runs")
    length = length or cfg.data.seq_len
    if length > cfg.data.seq_len:
        raise ValueError(f"--length {length} exceeds the model's sequence length {cfg.data.seq_len}")
    fixed, length = _fixed_tokens(run, length, prompt, suffix, infill, gap, gap_length)
    generator = torch.Generator(device=dev).manual_seed(seed)
    time_agnostic = not model.time_conditioning
    on_cuda = dev.type == "cuda"
    if compute == "auto":
        compute = "bf16-graph" if on_cuda else "fp32"
    if compute != "fp32" and not on_cuda:
        raise ValueError(f"--compute {compute} needs a CUDA device; use --compute fp32 on {dev}")
    denoiser = model.denoiser if compute == "fp32" else GraphDenoiser(
        model.network, num, length, dtype=torch.bfloat16, use_graph=compute == "bf16-graph")
    tokens = sample(
        denoiser, model.schedule, batch_size=num, length=length, vocab_size=model.vocab_size,
        num_steps=steps, grid=grid, generator=generator, sampler=sampler, temperature=temperature,
        top_k=top_k, top_p=top_p, precision=precision, cache=(cache and time_agnostic), time_agnostic=time_agnostic,
        fixed=fixed, device=dev, progress=progress,
    )
    settings = dict(run=str(run.path), step=run.step, weights=run.weights, steps=steps, grid=grid, sampler=sampler,
                    top_p=top_p, top_k=top_k, temperature=temperature, precision=precision, seed=seed, length=length,
                    prompt=prompt, suffix=suffix, infill=infill, gap_length=gap_length if infill else None,
                    compute=compute, cache=bool(cache and time_agnostic))
    return tokens.cpu(), settings, run


def generate_text(run_dir: str | Any, **kwargs: Any) -> tuple[list[str], dict[str, Any]]:
    """Sample texts from a text run folder (or a loaded run); returns (texts, settings).

    Keyword arguments are those of :func:`generate_tokens` (num, length, steps, grid, sampler,
    top_p, top_k, temperature, precision, prompt, suffix, infill, gap, gap_length, seed, cache,
    device, progress, compute).
    """
    tokens, settings, run = generate_tokens(run_dir, **kwargs)
    return [run.tokenizer.decode(row.tolist()) for row in tokens], settings


def generate_images(run: runs.LoadedRun, *, num: int = 16, steps: int = 256, grid: str = "cosine",
                    labels: Any = None, guidance: float = 0.0, seed: int = 0, precision: str = "float64",
                    temperature: float = 1.0, top_p: float | None = None, record_every: int | None = None,
                    device: str | torch.device = "cpu", progress: bool = True) -> tuple[torch.Tensor, SampleInfo]:
    """Sample images (num, H·W·C) from a loaded image run; returns (tokens, SampleInfo)."""
    model = run.model
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=device)
    denoiser = model.guided_denoiser(y, guidance) if y is not None else model.denoiser
    time_agnostic = not model.time_conditioning
    return sample(
        denoiser, model.schedule, batch_size=num, length=model.network.seq_len, vocab_size=model.vocab_size,
        num_steps=steps, grid=grid, generator=torch.Generator(device=device).manual_seed(seed),
        temperature=temperature, top_p=top_p, precision=precision, cache=time_agnostic, time_agnostic=time_agnostic,
        device=device, progress=progress, return_info=True, record_every=record_every,
    )


def write_image_samples(run: runs.LoadedRun, out: Path, *, num: int = 16, per_class: int | None = None,
                        label: int | None = None, strip: bool = False, steps: int = 256, grid: str = "cosine",
                        guidance: float = 0.0, seed: int = 0, precision: str = "float64", temperature: float = 1.0,
                        top_p: float | None = None, device: str | torch.device = "cpu") -> list[Path]:
    """Sample an image run and write a PNG grid (one row per class with ``per_class``) to ``out``,
    plus ``<out>-strip.png`` of the unmasking over time with ``strip``. Never overwrites a file.
    Returns the paths written."""
    net = run.model.network
    shape = tuple(net.config.image_shape)
    if out.exists():
        raise ValueError(f"{out} exists; choose another --out (files are never overwritten)")
    labels = None
    if per_class:
        if net.num_classes == 0:
            raise ValueError("--per-class needs a class-conditional run (model.class_conditional=true)")
        labels = torch.arange(net.num_classes).repeat_interleave(per_class)
    elif label is not None:
        labels = torch.full((num,), label)
    num = len(labels) if labels is not None else num
    record = max(1, steps // 8) if strip else None
    with torch.no_grad():
        tokens, info = generate_images(run, num=num, steps=steps, grid=grid, labels=labels, guidance=guidance,
                                       seed=seed, precision=precision, temperature=temperature, top_p=top_p,
                                       record_every=record, device=device)
    tokens = tokens.cpu()
    if per_class:
        class_grid(tokens, labels, shape, per_class=per_class, num_classes=net.num_classes, path=out,
                   vocab_size=run.model.vocab_size, scale=2)
    else:
        save_grid(tokens, shape, out, vocab_size=run.model.vocab_size, scale=2)
    written = [out]
    if strip:
        strip_path = out.with_name(out.stem + "-strip.png")
        unmasking_strip(info.trajectory[:, :4].cpu(), shape, strip_path, final=tokens[:4],
                        vocab_size=run.model.vocab_size)
        written.append(strip_path)
    return written
