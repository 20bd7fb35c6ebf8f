"""The model behind the server: a run opened read-only, requests turned into sampler calls.

:class:`ModelService` checks a :class:`~maskdiff.apps.serve.schemas.GenerateRequest` against the
model (vocabulary, length) and the server's limits (:meth:`ModelService.prepare`), then samples it
in a worker thread through the shared :class:`~maskdiff.apps.serve.batching.NetworkBatcher`
(:meth:`ModelService.run`), reporting the state every ``stream_every`` steps for the streaming
form.
"""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from maskdiff import runs
from maskdiff.apps.serve.batching import NetworkBatcher
from maskdiff.apps.serve.schemas import RESERVED_OPTIONS, ApiError, GenerateRequest, ServeLimits, check_request_numbers
from maskdiff.data import CHAR_CORPORA, OutOfVocabularyError
from maskdiff.sampling import FREE, fixed_from_template, make_fixed, registry, sample, sampler_names

__all__ = ["ModelService", "Prepared"]

#: the token value that marks a masked position in what the server sends (streamed states).
MASKED = -1


@dataclass
class Prepared:
    """A checked request: the sampler's inputs and the settings reported back."""

    request: GenerateRequest
    length: int
    seed: int
    fixed: Tensor | None  # (1, L), FREE at free positions
    stream_every: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed_mask(self) -> list[bool]:
        """Per position: fixed by the request (True) or generated."""
        if self.fixed is None:
            return [False] * self.length
        return (self.fixed[0] != FREE).tolist()


class ModelService:
    """A run folder opened read-only (:func:`maskdiff.load` creates, renames and deletes nothing)
    and the shared network calls of every request sampled from it."""

    def __init__(self, run_dir: str | os.PathLike | runs.LoadedRun, limits: ServeLimits | None = None, *,
                 device: str | torch.device = "cpu", weights: str = "ema") -> None:
        self.run = run_dir if isinstance(run_dir, runs.LoadedRun) else runs.load(run_dir, weights=weights, device=device)
        self.device = torch.device(device)
        model, cfg = self.run.model, self.run.config
        if cfg.diffusion.method == "ar":
            raise ValueError(f"{self.run.path} is the autoregressive baseline; maskdiff serve draws from diffusion runs")
        self.limits = limits or ServeLimits()
        self.seq_len = int(model.network.seq_len)
        if self.limits.max_length is not None and self.limits.max_length > self.seq_len:
            raise ValueError(f"max_length {self.limits.max_length} exceeds the model's sequence length {self.seq_len}")
        self.max_length = self.limits.max_length or self.seq_len
        shape = getattr(model.network.config, "image_shape", None)
        self.image_shape = None if shape is None else [int(s) for s in shape]
        self.kind = "image" if self.image_shape else ("char" if cfg.data.corpus in CHAR_CORPORA else "gpt2")
        self.tokenizer = None if self.image_shape else self.run.tokenizer
        self._pieces: dict[int, str] = {}
        self.vocab_size = int(model.vocab_size)
        self.time_agnostic = not model.time_conditioning
        self.samplers = tuple(sampler_names())
        self.batcher = NetworkBatcher(model.denoiser, max_rows=self.limits.max_batch_rows,
                                      window_s=self.limits.batch_window_ms / 1000)

    # ----------------------------------------------------------------------------- description
    def info(self) -> dict[str, Any]:
        """What ``GET /v1/model`` returns."""
        cfg = self.run.config
        vocab: dict[str, Any] = {"kind": self.kind, "size": self.vocab_size}
        if self.kind == "char":
            vocab["alphabet"] = self.tokenizer.alphabet  # type: ignore[union-attr]
        return {
            "run": Path(self.run.path).name, "step": self.run.step, "weights": self.run.weights,
            "vocabulary": vocab, "length": self.seq_len, "image_shape": self.image_shape,
            "method": cfg.diffusion.method, "schedule": cfg.diffusion.schedule,
            "time_conditioning": not self.time_agnostic, "samplers": list(self.samplers),
            "sampler_options": {name: self.sampler_options(name) for name in self.samplers},
            "limits": {**self.limits.as_dict(), "max_length": self.max_length},
            "defaults": GenerateRequest().model_dump(),
        }

    # ------------------------------------------------------------------------------- requests
    def prepare(self, req: GenerateRequest) -> Prepared:
        """Check ``req`` against the limits and the model; raises :class:`ApiError` (422)."""
        check_request_numbers(req, self.limits, self.samplers)
        self._check_options(req)
        if req.length is not None and req.length > self.max_length:
            raise ApiError(422, "length", f"length {req.length} exceeds the limit of {self.max_length} tokens "
                           f"(the model's sequence length is {self.seq_len})", limit=self.max_length)
        if self.image_shape is not None:
            fixed, length = self._image_request(req)
        else:
            fixed, length = self._text_fixed(req)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        every = req.stream_every or max(1, req.steps // 32)
        settings = {**req.model_dump(), "length": length, "seed": seed, "stream_every": every,
                    "run": Path(self.run.path).name, "step": self.run.step, "weights": self.run.weights}
        if req.infill is None:
            settings["gap"] = settings["gap_length"] = None
        return Prepared(req, length, seed, fixed, every, settings)

    def _check_options(self, req: GenerateRequest) -> None:
        """The sampler and its options, checked before the request is queued by the sampler's own
        argument checks: a one-step dry run on one position with a constant denoiser (well under a
        millisecond), so that a streamed request is refused with a 422 before its stream starts."""
        v = self.vocab_size
        try:
            sample(lambda z, t: torch.zeros(z.shape[0], z.shape[1], v), self.run.model.schedule, batch_size=1,
                   length=1, vocab_size=v, num_steps=1, sampler=req.sampler, time_agnostic=True, device="cpu",
                   **req.sampler_options)
        except (ValueError, TypeError) as err:
            field_name = "sampler_options" if req.sampler_options else "sampler"
            raise ApiError(422, field_name, f"sampler {req.sampler!r} refused the request: {err}",
                           limit=sorted(set(self.sampler_options(req.sampler)) | self._option_names())) from None

    @staticmethod
    def _option_names() -> set[str]:
        """The options :func:`maskdiff.sample` names in its signature (beyond those the server sets)."""
        params = inspect.signature(sample).parameters
        return {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - RESERVED_OPTIONS

    @staticmethod
    def sampler_options(name: str) -> dict[str, str]:
        """The named sampler's own options with one line of help each (``type, default: help``),
        from the sampler registry; empty where the registry does not describe them."""
        sampler_class = getattr(registry, "sampler_class", None)
        try:
            return dict(sampler_class(name).option_help()) if sampler_class is not None else {}
        except (ValueError, AttributeError):
            return {}

    def _image_request(self, req: GenerateRequest) -> tuple[Tensor | None, int]:
        for name in ("prompt", "suffix", "infill"):
            if getattr(req, name):
                raise ApiError(422, name, f"{name}: this is an image run; it takes no text",
                               limit="text runs only")
        if req.length is not None and req.length != self.seq_len:
            raise ApiError(422, "length", f"length {req.length}: an image run samples whole images of "
                           f"{self.seq_len} sub-pixels", limit=self.seq_len)
        return None, self.seq_len

    def _encode(self, text: str, field_name: str) -> list[int]:
        if self.kind == "char":
            alphabet = self.tokenizer.alphabet  # type: ignore[union-attr]
            odd = sorted({c for c in text if c not in alphabet})
            if odd:
                raise ApiError(422, field_name, f"{field_name} has characters outside the model's vocabulary "
                               f"({', '.join(map(repr, odd))}); it reads {alphabet!r}", limit=alphabet)
        try:
            return [int(i) for i in self.tokenizer.encode(text)]  # type: ignore[union-attr]
        except OutOfVocabularyError as err:  # an own-data character vocabulary: the message names them
            raise ApiError(422, field_name, f"{field_name}: {err}", limit="the run's character vocabulary") from None

    def _text_fixed(self, req: GenerateRequest) -> tuple[Tensor | None, int]:
        """The tokens a text request fixes (FREE elsewhere) and the sample length."""
        if req.infill is not None:
            for piece in req.infill.split(req.gap):
                self._encode(piece, "infill")
            fixed = fixed_from_template(req.infill, self.tokenizer, gap=req.gap, gap_length=req.gap_length)
            need = fixed.shape[1]
            if need > self.max_length:
                raise ApiError(422, "infill", f"the template needs {need} tokens with gap_length {req.gap_length}; "
                               f"the limit is {self.max_length}: shorten the text or the gaps", limit=self.max_length)
            if req.length is not None and req.length < need:
                raise ApiError(422, "length", f"length {req.length} is shorter than the template's {need} tokens",
                               limit=need)
            length = req.length or need
            if length > need:  # the positions after the template are free
                fixed = torch.cat([fixed, torch.full((1, length - need), FREE, dtype=torch.long)], dim=1)
            return fixed, length
        length = req.length or self.max_length
        prefix = self._encode(req.prompt, "prompt") if req.prompt else []
        ending = self._encode(req.suffix, "suffix") if req.suffix else []
        if len(prefix) + len(ending) >= length:
            field_name = "prompt" if prefix else "suffix"
            raise ApiError(422, field_name, f"prompt and suffix take {len(prefix) + len(ending)} of the {length} "
                           "tokens, leaving nothing to generate", limit=length - 1)
        if prefix or ending:
            return make_fixed(length, prefix=prefix or None, suffix=ending or None), length
        return None, length

    # ------------------------------------------------------------------------------- sampling
    def run_request(self, prep: Prepared, check: Callable[[], None],
                    emit: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Sample a prepared request (in a worker thread); ``check()`` is called at every step and
        every network call (it raises to stop), ``emit(kind, event)`` receives the streamed states.
        Returns the response body: samples, settings, timing."""
        req = prep.request
        start = time.perf_counter()
        generator = torch.Generator(device=self.device).manual_seed(prep.seed)

        def denoiser(z: Tensor, t: Tensor) -> Tensor:
            check()
            return self.batcher.denoiser(z, t)

        def on_step(step: int, z: Tensor) -> None:
            check()
            if emit is not None and step % prep.stream_every == 0 and step < req.steps:
                emit("step", self.state(z, step, req.steps))

        with self.batcher.member():
            tokens = sample(
                denoiser, self.run.model.schedule, batch_size=req.num_samples, length=prep.length,
                vocab_size=self.vocab_size, num_steps=req.steps, grid=req.grid, generator=generator,
                sampler=req.sampler, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                cache=self.time_agnostic, time_agnostic=self.time_agnostic, fixed=prep.fixed, device=self.device,
                on_step=on_step, **req.sampler_options,
            )
        if emit is not None:  # the last state, after the last step (and the fill of any masks left)
            emit("step", self.state(tokens, req.steps, req.steps))
        tokens = tokens.cpu()
        return {"samples": [self._sample_record(row) for row in tokens], "settings": prep.settings,
                "timing": {"sampling_s": round(time.perf_counter() - start, 6)}}

    def _sample_record(self, row: Tensor) -> dict[str, Any]:
        ids = row.tolist()
        if self.image_shape is not None:
            return {"tokens": ids, "shape": self.image_shape}
        return {"text": self.tokenizer.decode(ids), "tokens": ids}  # type: ignore[union-attr]

    def state(self, z: Tensor, step: int, steps: int) -> dict[str, Any]:
        """A streamed state: per sample, the tokens with ``MASKED`` (-1) at masked positions, and for
        text runs each position's text (None where masked)."""
        rows = torch.where(z == self.vocab_size, MASKED, z).cpu().tolist()
        samples = []
        for ids in rows:
            record: dict[str, Any] = {"tokens": ids}
            if self.image_shape is None:
                record["pieces"] = [None if i == MASKED else self._piece(i) for i in ids]
            samples.append(record)
        return {"step": step, "steps": steps, "masked": [sum(i == MASKED for i in ids) for ids in rows],
                "samples": samples}

    def _piece(self, token: int) -> str:
        """The text of one token (cached: a vocabulary's worth at most)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self.tokenizer.decode([token])  # type: ignore[union-attr]
        return piece

    def close(self) -> None:
        self.batcher.stop()

