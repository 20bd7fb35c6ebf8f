"""Generation from a run folder: texts (from scratch, from a prompt/suffix, or filling gaps) and
image grids. :func:`generate_tokens` is the one sampling path behind ``maskdiff sample`` and the
generative-perplexity app; the network arithmetic (fp32, bf16, bf16 replayed from a CUDA graph)
is chosen here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from maskdiff import runs
from maskdiff.apps.checks import (
    UsageError,
    check_output_file,
    check_run_writable,
    finite_number,
    positive_int,
)
from maskdiff.apps.images import class_grid, save_grid, unmasking_strip
from maskdiff.data import CHAR_CORPORA, IMAGE_DATASETS, normalize_text8
from maskdiff.devices import resolve_device
from maskdiff.sampling import SampleInfo, fixed_from_template, make_fixed, sample
from maskdiff.sampling.blocks import sample_long
from maskdiff.sampling.cuda_graph import GraphDenoiser

__all__ = ["generate_tokens", "generate_text", "generate_images", "write_image_samples", "check_sample_request",
           "sample_destination"]


def _open(run_dir: str | os.PathLike | runs.LoadedRun, device: torch.device) -> runs.LoadedRun:
    return run_dir if isinstance(run_dir, runs.LoadedRun) else runs.load(run_dir, device=device)


def _fixed_tokens(run: runs.LoadedRun, length: int, prompt: str | None, suffix: str | None, infill: str | None,
                  gap: str, gap_length: int) -> tuple[torch.Tensor | None, int]:
    """The tokens a request fixes (FREE elsewhere) and the sample length they imply."""
    cfg, tok = run.config, run.tokenizer

    chars = cfg.data.corpus in CHAR_CORPORA

    def encode(text: str, flag: str) -> list[int]:
        if chars:
            _check_alphabet(text, flag, cfg.data.corpus, [text], gap)
        return tok.encode(text)

    if infill is not None:
        if prompt or suffix:
            raise UsageError("use either --infill or --prompt/--suffix, not both")
        _check_template(infill, gap, gap_length)
        if chars:  # the text between the gaps, checked as a whole
            _check_alphabet(infill, "--infill", cfg.data.corpus, infill.split(gap), gap)
        fixed = fixed_from_template(infill, tok, gap=gap, gap_length=gap_length, length=None)
        if fixed.shape[1] > cfg.data.seq_len:
            raise UsageError(f"--infill: the template needs {fixed.shape[1]} tokens with --gap-length {gap_length}; "
                             f"the model takes at most {cfg.data.seq_len}: shorten the text or the gaps")
        return fixed, fixed.shape[1]
    prefix = encode(prompt, "--prompt") if prompt else []
    ending = encode(suffix, "--suffix") if suffix else []
    if len(prefix) + len(ending) >= length:
        raise UsageError(f"--prompt/--suffix take {len(prefix) + len(ending)} of the {length} tokens of a sample, "
                         "leaving nothing to generate: shorten them or pass a larger --length")
    if prefix or ending:
        return make_fixed(length, prefix=prefix or None, suffix=ending or None), length
    return None, length


def _check_alphabet(text: str, flag: str, corpus: str, pieces: list[str], gap: str) -> None:
    """Character runs read only ``a-z`` and single spaces: text that normalisation would change
    (capitals, digits, punctuation, runs of spaces) is refused with the normalised form to pass
    (``pieces``: the text between infilling gaps, else ``[text]``)."""
    clean = gap.join(normalize_text8(p) for p in pieces)
    if clean != text:
        odd = sorted({c for p in pieces for c in p if not ("a" <= c <= "z" or c == " ")})
        what = f"characters outside a-z and space ({', '.join(map(repr, odd))})" if odd else "runs of spaces"
        raise UsageError(f"{flag} {text!r} has {what}, which the {corpus} model cannot read; "
                         f"pass it as the model reads it: {flag} {clean!r}")


def _check_template(infill: str, gap: str, gap_length: int) -> None:
    """An infilling template needs a gap marker and at least one free position per gap."""
    if not gap:
        raise UsageError("--gap '': the gap marker must be a non-empty string such as ___")
    if gap not in infill:
        raise UsageError(f"--infill {infill!r} has no gap {gap!r}: mark each gap to fill with {gap} "
                         "(or name another marker with --gap)")
    positive_int("--gap-length", gap_length, fix="each gap needs at least one position to fill")


def generate_tokens(run_dir: str | Any, *, num: int = 4, length: int | None = None, steps: int = 256,
                    grid: str = "cosine", sampler: str = "ancestral", top_p: float | None = None,
                    top_k: int | None = None, temperature: float = 1.0, precision: str = "float64",
                    prompt: str | None = None, suffix: str | None = None, infill: str | None = None,
                    gap: str = "___", gap_length: int = 16, seed: int = 0, cache: bool = True,
                    device: str = "auto", progress: bool = True, compute: str = "auto",
                    sampler_options: Mapping[str, Any] | None = None, block_length: int | None = None,
                    ) -> tuple[torch.Tensor, dict[str, Any], runs.LoadedRun]:
    """Sample ``num`` token sequences from a text run folder (or an already loaded run).

    Returns (tokens (num, length) on the CPU, settings, the loaded run). Bad requests raise
    ValueError naming the fix (the command line prints them as one line).

    ``sampler`` is a registry name (:func:`maskdiff.sampling.sampler_names`) and
    ``sampler_options`` its options (values may be text: the sampler converts them);
    ``block_length`` generates in blocks of that many positions with the sampler inside a block.

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
    positive_int("--length", length, fix=f"omit it for the run's sequence length {cfg.data.seq_len}")
    length = cfg.data.seq_len if length is None else length
    fixed, length = _fixed_tokens(run, length, prompt, suffix, infill, gap, gap_length)
    # Beyond the model's length: sliding windows of seq_len positions, half of each the text so far
    # (MDLM-style semi-autoregressive; maskdiff.sampling.blocks.sample_long).
    long = {"window": cfg.data.seq_len} if length > cfg.data.seq_len else {}
    generator = torch.Generator(device=dev).manual_seed(seed)
    time_agnostic = not model.time_conditioning
    on_cuda = dev.type == "cuda"
    if compute == "auto":
        compute = "bf16-graph" if on_cuda else "fp32"
    if compute != "fp32" and not on_cuda:
        raise ValueError(f"--compute {compute} needs a CUDA device; use --compute fp32 on {dev}")
    denoiser = model.denoiser if compute == "fp32" else GraphDenoiser(
        model.network, num, min(length, cfg.data.seq_len), dtype=torch.bfloat16, use_graph=compute == "bf16-graph")
    options = _sampler_options(sampler_options, block_length)
    tokens, info = (sample_long if long else sample)(
        denoiser, model.schedule, batch_size=num, length=length, vocab_size=model.vocab_size,
        num_steps=steps, grid=grid, generator=generator, sampler=sampler, temperature=temperature,
        top_k=top_k, top_p=top_p, precision=precision, cache=(cache and time_agnostic), time_agnostic=time_agnostic,
        fixed=fixed, device=dev, progress=progress, return_info=True, **long, **options,
    )
    settings = dict(run=str(run.path), step=run.step, weights=run.weights, steps=steps, grid=grid, sampler=sampler,
                    top_p=top_p, top_k=top_k, temperature=temperature, precision=precision, seed=seed, length=length,
                    prompt=prompt, suffix=suffix, infill=infill, gap_length=gap_length if infill else None,
                    compute=compute, cache=bool(cache and time_agnostic))
    if long:
        settings.update(windows=info.extras["windows"], network_calls_per_sample=info.nfe_per_sample)
    if options:  # the sampler's options as it read them (a default run's settings stay as in 0.1)
        settings.update(sampler_options=_jsonable(info.sampler_options), block_length=block_length,
                        network_calls_per_sample=info.nfe_per_sample)
    return tokens.cpu(), settings, run


def _sampler_options(options: Mapping[str, Any] | None, block_length: int | None) -> dict[str, Any]:
    """The keyword options for ``sample(**options)``: the sampler's, plus ``block_length`` when given."""
    out = dict(options or {})
    if block_length is not None:
        positive_int("--block-length", block_length)
        out["block_length"] = block_length
    return out


def _jsonable(options: Mapping[str, Any]) -> dict[str, Any]:
    """Option values that JSON can hold as they are; others (a wrapped sampler) by their repr."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v) for k, v in options.items()}


def generate_text(run_dir: str | Any, **kwargs: Any) -> tuple[list[str], dict[str, Any]]:
    """Sample texts from a text run folder (or a loaded run); returns (texts, settings).

    Keyword arguments are those of :func:`generate_tokens` (num, length, steps, grid, sampler,
    top_p, top_k, temperature, precision, prompt, suffix, infill, gap, gap_length, seed, cache,
    device, progress, compute, sampler_options, block_length).
    """
    tokens, settings, run = generate_tokens(run_dir, **kwargs)
    return [run.tokenizer.decode(row.tolist()) for row in tokens], settings


def check_sample_request(*, num: int = 4, steps: int = 256, length: int | None = None, top_p: float | None = None,
                         top_k: int | None = None, temperature: float = 1.0, guidance: float = 0.0,
                         per_class: int | None = None, gap: str = "___", gap_length: int = 16,
                         infill: str | None = None, prompt: str | None = None, suffix: str | None = None) -> None:
    """The numbers and texts of a ``maskdiff sample`` request, checked before anything is loaded."""
    positive_int("--num", num)
    positive_int("--steps", steps)
    positive_int("--length", length, fix="omit it for the run's sequence length")
    positive_int("--top-k", top_k, fix="omit it to sample from every token")
    positive_int("--per-class", per_class)
    finite_number("--temperature", temperature, minimum=0.0)
    finite_number("--guidance", guidance)
    if top_p is not None and not 0 < top_p <= 1:
        raise UsageError(f"--top-p {top_p}: must be a number in (0, 1] (omit it to sample from every token)")
    if infill is not None:
        if prompt or suffix:
            raise UsageError("use either --infill or --prompt/--suffix, not both")
        _check_template(infill, gap, gap_length)


TEXT_FLAGS = {"--prompt": "prompt", "--suffix": "suffix", "--infill": "infill", "--length": "length", "--top-k": "top_k"}
IMAGE_FLAGS = {"--label": "label", "--per-class": "per_class", "--strip": "strip"}


def sample_destination(run_dir: str | os.PathLike, *, out: str | os.PathLike | None, seed: int = 0,
                       strip: bool = False, **flags: Any) -> tuple[bool, Path | None]:
    """(image run?, the file to write) for a ``maskdiff sample`` request, checked before the weights
    are loaded: flags of the other kind of run, a destination that exists, a missing or read-only
    folder. ``flags``: the request's text/image flags (prompt, suffix, infill, length, top_k, label,
    per_class, guidance) as given (None/False/0 when not)."""
    config = runs.read_run_config(run_dir)
    image = config.data.corpus.lower() in IMAGE_DATASETS
    given = {"strip": strip, **flags}
    wrong = [flag for flag, key in (TEXT_FLAGS if image else IMAGE_FLAGS).items() if given.get(key)]
    if not image and given.get("guidance"):
        wrong.append("--guidance")
    if wrong:
        kind, other = ("an image", "text") if image else ("a text", "image")
        raise UsageError(f"{run_dir} is {kind} run ({config.data.corpus}); {', '.join(wrong)} "
                         f"{'is' if len(wrong) == 1 else 'are'} for {other} runs: drop {'it' if len(wrong) == 1 else 'them'}")
    if image and given.get("guidance") and given.get("label") is None and not given.get("per_class"):
        raise UsageError("--guidance weighs a class label: pass --label or --per-class with it")
    if image and out is None:
        check_run_writable(run_dir, "sample", "pass --out FILE.png to write the grid elsewhere")
        out = Path(run_dir) / f"samples-{seed}.png"
    if out is None:
        return image, None
    path = check_output_file(out, "--out")
    if image and strip:
        check_output_file(path.with_name(path.stem + "-strip.png"), "--out (its -strip.png)")
    return image, path


def generate_images(run: runs.LoadedRun, *, num: int = 16, steps: int = 256, grid: str = "cosine",
                    labels: Any = None, guidance: float = 0.0, seed: int = 0, precision: str = "float64",
                    temperature: float = 1.0, top_p: float | None = None, record_every: int | None = None,
                    device: str | torch.device = "cpu", progress: bool = True, sampler: str = "ancestral",
                    sampler_options: Mapping[str, Any] | None = None, block_length: int | None = None,
                    ) -> tuple[torch.Tensor, SampleInfo]:
    """Sample images (num, H·W·C) from a loaded image run; returns (tokens, SampleInfo). ``sampler``,
    ``sampler_options`` and ``block_length`` as in :func:`generate_tokens`."""
    model = run.model
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.long, device=device)
    denoiser = model.guided_denoiser(y, guidance) if y is not None else model.denoiser
    time_agnostic = not model.time_conditioning
    return sample(
        denoiser, model.schedule, batch_size=num, length=model.network.seq_len, vocab_size=model.vocab_size,
        num_steps=steps, grid=grid, generator=torch.Generator(device=device).manual_seed(seed),
        temperature=temperature, top_p=top_p, precision=precision, cache=time_agnostic, time_agnostic=time_agnostic,
        device=device, progress=progress, return_info=True, record_every=record_every, sampler=sampler,
        **_sampler_options(sampler_options, block_length),
    )


def write_image_samples(run: runs.LoadedRun, out: Path, *, num: int = 16, per_class: int | None = None,
                        label: int | None = None, strip: bool = False, steps: int = 256, grid: str = "cosine",
                        guidance: float = 0.0, seed: int = 0, precision: str = "float64", temperature: float = 1.0,
                        top_p: float | None = None, device: str | torch.device = "cpu", sampler: str = "ancestral",
                        sampler_options: Mapping[str, Any] | None = None, block_length: int | None = None,
                        ) -> list[Path]:
    """Sample an image run and write a PNG grid (one row per class with ``per_class``) to ``out``,
    plus ``<out>-strip.png`` of the unmasking over time with ``strip``. Never overwrites a file.
    Returns the paths written. ``sampler``, ``sampler_options``, ``block_length``: as in
    :func:`generate_tokens`."""
    net = run.model.network
    shape = tuple(net.config.image_shape)
    if out.exists():
        raise UsageError(f"{out} exists; choose another --out (files are never overwritten)")
    labels = None
    if (per_class or label is not None) and net.num_classes == 0:
        flag = "--per-class" if per_class else "--label"
        raise UsageError(f"{flag} needs a class-conditional run (model.class_conditional=true); {run.path} has no classes")
    if per_class:
        labels = torch.arange(net.num_classes).repeat_interleave(per_class)
    elif label is not None:
        if not 0 <= label < net.num_classes:
            raise UsageError(f"--label {label}: must be a class in [0, {net.num_classes})")
        labels = torch.full((num,), label)
    num = len(labels) if labels is not None else num
    record = max(1, steps // 8) if strip else None
    with torch.no_grad():
        tokens, info = generate_images(run, num=num, steps=steps, grid=grid, labels=labels, guidance=guidance,
                                       seed=seed, precision=precision, temperature=temperature, top_p=top_p,
                                       record_every=record, device=device, sampler=sampler,
                                       sampler_options=sampler_options, block_length=block_length)
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
