"""The lm-evaluation-harness model class for a maskdiff run folder, registered as ``"maskdiff"``.

Importing this module (``import maskdiff.apps.lmeval``) registers it, after which::

    lm_eval.simple_evaluate(model="maskdiff", model_args="run=runs/demo,draws=8", tasks=[...])

works, and so does the harness's own command line through ``python -m maskdiff.apps.lmeval``.
Model arguments (``model_args``; docs/lm-eval.md): ``run`` (the folder), ``likelihood``
(``elbo`` | ``exact-order``), ``estimator`` (``counts`` | ``times``), ``draws`` (K), ``seed``,
``batch_size`` (network rows per call), ``device``, ``weights`` (``ema`` | ``raw``), ``normalize``
(``text8`` | ``none``, character runs), ``greedy`` (compute ``is_greedy``), ``sampler``, ``steps``
(sampling steps for ``generate_until``; default one per generated token), ``max_gen_toks``,
``mc_log`` (a JSONL file that receives every estimate with its Monte Carlo error); ``sampler_<option>``
(e.g. ``sampler=remdm,sampler_sigma=0.1``) passes an option to the sampler (docs/samplers.md).
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Sequence

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from maskdiff import runs
from maskdiff.apps.lmeval.estimators import Estimate, LikelihoodEstimator, Window, window_seed
from maskdiff.apps.lmeval.text import TextCodec, pair_windows, rolling_windows
from maskdiff.data import CHAR_CORPORA
from maskdiff.devices import resolve_device
from maskdiff.fileio import append_line
from maskdiff.sampling import make_fixed, sample, sampler_names
from maskdiff.sampling.registry import get_sampler

__all__ = ["MaskdiffLM", "combine"]

logger = logging.getLogger(__name__)

#: windows estimated at a time (bounds the memory of the rows built for them)
WINDOWS_PER_CALL = 256


def combine(estimates: Sequence[Estimate]) -> Estimate:
    """One estimate for a request scored in several windows: nats add, independent Monte Carlo
    errors add in quadrature, greedy if every window is."""
    greedy = [e.greedy for e in estimates]
    return Estimate(sum(e.nats for e in estimates), math.sqrt(sum(e.stderr**2 for e in estimates)),
                    max((e.draws for e in estimates), default=0),
                    None if any(g is None for g in greedy) else all(greedy))


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes")
    return bool(value)


@register_model("maskdiff")
class MaskdiffLM(LM):
    """A maskdiff run in the harness: ``loglikelihood`` (with Monte Carlo errors), ``loglikelihood_rolling``
    and ``generate_until`` (see the module docs for the arguments)."""

    def __init__(self, run: str | os.PathLike | runs.LoadedRun | None = None, likelihood: str = "elbo",
                 estimator: str = "counts", draws: int = 4, batch_size: int | str | None = 32, seed: int = 0,
                 device: str | None = "auto", weights: str = "ema", normalize: str = "text8", greedy: Any = True,
                 sampler: str = "ancestral", steps: int | None = None, max_gen_toks: int = 256,
                 mc_log: str | None = None, progress: Any = True, sampler_options: dict[str, Any] | None = None,
                 **unused: Any) -> None:
        super().__init__()
        #: the sampler's options: ``sampler_options`` and every ``sampler_<option>`` model argument
        self.sampler_options = dict(sampler_options or {})
        self.sampler_options.update({k[len("sampler_"):]: v for k, v in unused.items() if k.startswith("sampler_")})
        get_sampler(sampler, self.sampler_options)  # an unknown sampler or option fails here, before any work
        if run is None:
            raise ValueError("the maskdiff model needs its run folder: model_args='run=PATH'")
        if sampler not in sampler_names():
            raise ValueError(f"sampler={sampler!r}: choose one of {', '.join(sampler_names())}")
        if device and str(device).startswith("cuda") and not torch.cuda.is_available():
            # the harness's CLI passes cuda:0 unless told otherwise; its own models fall back the same way
            logger.warning("device %s requested but CUDA is not available: the maskdiff model runs on the CPU", device)
            device = "cpu"
        self._device = resolve_device(device or "auto")
        self.run = run if isinstance(run, runs.LoadedRun) else runs.load(run, weights=weights, device=self._device)
        model = self.run.model
        if model.network.config.image_shape is not None:
            raise ValueError(f"{self.run.path} is an image run; the harness evaluates text runs")
        self.model = model
        size = 32 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(batch_size)
        self.estimator = LikelihoodEstimator(model, likelihood=likelihood, estimator=estimator, draws=int(draws),
                                             batch_size=size, seed=int(seed), greedy=_flag(greedy),
                                             device=self._device, progress=_flag(progress))
        corpus = self.run.config.data.corpus
        self.codec = TextCodec(self.run.tokenizer, characters=corpus in CHAR_CORPORA, normalize=normalize)
        self.sampler, self.steps, self.max_gen_toks = sampler, steps and int(steps), int(max_gen_toks)
        self.seed, self.mc_log, self.progress = int(seed), mc_log, _flag(progress)
        #: every estimate: {(kind, *request args): {"loglikelihood", "mc_stderr", "draws", "windows", "greedy"}}
        self.records: dict[tuple, dict[str, Any]] = {}

    # -- what the harness reads ----------------------------------------------------------------------

    @property
    def max_length(self) -> int:
        return self.estimator.seq_len

    @property
    def tokenizer_name(self) -> str:
        return f"maskdiff-{self.run.config.data.corpus}"

    @property
    def settings(self) -> dict[str, Any]:
        """What changes the numbers: written with the results."""
        e = self.estimator
        return dict(run=str(self.run.path), step=self.run.step, weights=self.run.weights, method=e.method,
                    likelihood="exact" if e.method == "ar" else e.likelihood,
                    estimator=None if e.exact else e.estimator, draws=None if e.exact else e.draws, seed=self.seed,
                    normalize=self.codec.normalize if self.codec.characters else None, seq_len=e.seq_len,
                    sampler=self.sampler, sampler_options=self.sampler_options or None, steps=self.steps)

    # -- requests ------------------------------------------------------------------------------------

    def _estimate(self, groups: list[list[Window]], greedy: bool | None = None) -> list[Estimate]:
        """One combined estimate per group of windows (a request), windows batched across requests."""
        flat = [w for g in groups for w in g]
        estimates: list[Estimate] = []
        chunks = range(0, len(flat), WINDOWS_PER_CALL)
        for start in tqdm(chunks, desc="maskdiff", unit="chunk", disable=not self.progress or len(chunks) < 2):
            estimates.extend(self.estimator.estimate(flat[start:start + WINDOWS_PER_CALL], greedy=greedy))
        out, k = [], 0
        for g in groups:
            out.append(combine(estimates[k:k + len(g)]))
            k += len(g)
        return out

    def _record(self, key: tuple, estimate: Estimate, windows: int) -> None:
        record = {"loglikelihood": -estimate.nats, "mc_stderr": estimate.stderr, "draws": estimate.draws,
                  "windows": windows, "greedy": estimate.greedy}
        self.records[key] = record
        if self.mc_log:
            line = {"kind": key[0], "args": list(key[1:]),
                    **{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}}
            append_line(self.mc_log, json.dumps(line))

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request (``Instance.args`` = (context, continuation))."""
        groups = []
        for req in requests:
            ctx, cont = self.codec.encode_pair(*req.args)
            groups.append(pair_windows(ctx, cont, self.max_length))
        out = []
        for req, windows, est in zip(requests, groups, self._estimate(groups)):
            self._record(("loglikelihood", *req.args), est, len(windows))
            answer = (-est.nats, bool(est.greedy))
            self.cache_hook.add_partial("loglikelihood", req.args, answer)
            out.append(answer)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(document) per request (``Instance.args`` = (document,)), summed over rolling windows."""
        groups = [rolling_windows(self.codec.encode(req.args[0]), self.max_length, self.codec.prefix)
                  for req in requests]
        out = []
        for req, windows, est in zip(requests, groups, self._estimate(groups, greedy=False)):
            self._record(("loglikelihood_rolling", *req.args), est, len(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, -est.nats)
            out.append(-est.nats)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """The sampler (or the AR model) continuing each context (``Instance.args`` = (context,
        gen_kwargs)); ``max_gen_toks`` tokens at most, cut before the first stop string of ``until``."""
        out = []
        for req in tqdm(requests, desc="generate", disable=disable_tqdm or not self.progress):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.get("temperature", 0.0)) if _flag(kwargs.get("do_sample", False)) else 0.0
            ids = self.codec.encode(context) if context else list(self.codec.prefix)
            seed = window_seed(self.seed, Window(tuple(ids), len(ids)))
            text = self._generate(ids, max_new, temperature, seed, until)
            cuts = [text.find(s) for s in until if s and s in text]
            text = text[: min(cuts)] if cuts else text
            self.cache_hook.add_partial("generate_until", req.args, text)
            out.append(text)
        return out

    @torch.no_grad()
    def _generate(self, ids: list[int], max_new: int, temperature: float, seed: int, until: list[str]) -> str:
        """Up to ``max_new`` new tokens after the (left-truncated) context ``ids``, decoded."""
        length, model = self.max_length, self.model
        generator = torch.Generator(device=self._device).manual_seed(seed)
        if model.method == "ar":
            return self._generate_ar(ids, max_new, temperature, generator, until)
        new = max(1, min(max_new, length))
        keep = ids[len(ids) - (length - new):] if length > new else []
        fixed = make_fixed(len(keep) + new, prefix=keep) if keep else None
        tokens = sample(model.denoiser, model.schedule, batch_size=1, length=len(keep) + new,
                        vocab_size=model.vocab_size, num_steps=self.steps or new, generator=generator,
                        sampler=self.sampler, temperature=temperature, fixed=fixed, cache="auto", device=self._device,
                        **self.sampler_options)
        return self.codec.decode(tokens[0, len(keep):].tolist())

    def _generate_ar(self, ids: list[int], max_new: int, temperature: float, generator: torch.Generator,
                     until: list[str]) -> str:
        """Token by token from the AR baseline (argmax at temperature 0), stopping at a stop string."""
        seq, new = list(ids), []
        for _ in range(max_new):
            inputs = torch.tensor([[self.model.vocab_size] + seq[-(self.max_length - 1):]], device=self._device)
            logits = self.model.network(inputs, None)[0, -1].double()  # (V,): the next token
            if temperature == 0:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / temperature, -1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            seq.append(token)
            new.append(token)
            if any(s and s in self.codec.decode(new) for s in until):
                break
        return self.codec.decode(new)
