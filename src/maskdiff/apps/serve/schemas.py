"""What the server accepts and refuses: the request body, the server's limits, and the error shape.

Every refusal is an :class:`ApiError`: an HTTP status (400 malformed JSON, 422 a field out of its
limits, 503 the queue is full, 504 the request ran past its time-out) and a JSON body
``{"error": {"field": ..., "message": ..., "limit": ...}}`` naming the field and the limit
(``docs/serve.md`` lists them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["ApiError", "GenerateRequest", "ServeLimits", "check_request_numbers", "validation_error"]


class ApiError(Exception):
    """A request the server refuses: ``status`` and the JSON body :meth:`body`."""

    def __init__(self, status: int, field: str | None, message: str, limit: Any = None) -> None:
        super().__init__(message)
        self.status, self.field, self.message, self.limit = status, field, message, limit

    def body(self) -> dict[str, Any]:
        """``{"error": {"field", "message", "limit"}}``: what the client reads."""
        return {"error": {"field": self.field, "message": self.message, "limit": self.limit}}


@dataclass
class ServeLimits:
    """The server's limits, per request and in total (``maskdiff serve --help`` sets them).

    Attributes:
        max_length: tokens per sample; None = the model's sequence length (never more).
        max_samples: samples per request.
        max_steps: sampling steps per request.
        timeout_s: a request still queued or sampling this many seconds after it arrived fails
            with 504 (sampling stops at the next step).
        max_active: requests sampled at the same time (their network calls are shared); 1 serves
            one request at a time.
        queue_size: requests waiting for a sampling slot; past ``max_active + queue_size``
            requests in the server a new one gets 503.
        max_batch_rows: sequences in one shared network call at most.
        batch_window_ms: how long a network call waits for the other active requests' calls to
            join it (it goes as soon as every active request is waiting).
    """

    max_length: int | None = None
    max_samples: int = 16
    max_steps: int = 1024
    timeout_s: float = 60.0
    max_active: int = 16
    queue_size: int = 64
    max_batch_rows: int = 512
    batch_window_ms: float = 2.0

    def __post_init__(self) -> None:
        for name in ("max_samples", "max_steps", "max_active", "max_batch_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 1):
            raise ValueError(f"max_length must be a positive integer or None, got {self.max_length!r}")
        if not isinstance(self.queue_size, int) or self.queue_size < 0:
            raise ValueError(f"queue_size must be an integer ≥ 0, got {self.queue_size!r}")
        for name in ("timeout_s", "batch_window_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")
        if self.timeout_s == 0:
            raise ValueError("timeout_s must be positive")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class GenerateRequest(BaseModel):
    """The body of ``POST /v1/generate`` and ``POST /v1/generate/stream``. Unknown fields are refused.

    ``prompt``/``suffix`` fix the start/end of every sample; ``infill`` is a template whose ``gap``
    markers each become ``gap_length`` free positions (the template sets the length, or ``length``
    when that is larger: the positions after it are free). ``seed`` None draws one (reported in
    ``settings``); the same request with the same seed gives the same samples.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str | None = None
    suffix: str | None = None
    infill: str | None = None
    gap: str = "___"
    gap_length: int = 8
    length: int | None = None
    num_samples: int = 1
    steps: int = 128
    grid: Literal["cosine", "uniform"] = "cosine"
    sampler: str = "ancestral"
    sampler_options: dict[str, Any] = Field(default_factory=dict)
    top_p: float | None = None
    top_k: int | None = None
    temperature: float = 1.0
    seed: int | None = None
    stream_every: int | None = None


#: sample() arguments the server sets itself; ``sampler_options`` may not name them.
RESERVED_OPTIONS = frozenset({
    "denoiser", "schedule", "batch_size", "length", "vocab_size", "num_steps", "grid", "generator", "sampler",
    "temperature", "top_k", "top_p", "cache", "cache_scope", "time_agnostic", "fixed", "device", "progress",
    "return_info", "record_every", "on_step",
})


def check_request_numbers(req: GenerateRequest, limits: ServeLimits, samplers: tuple[str, ...]) -> None:
    """The numbers and names of a request against the server's limits (texts are checked with the
    model's vocabulary, :mod:`maskdiff.apps.serve.service`). Raises :class:`ApiError` (422)."""

    def positive(field: str, value: int | None, maximum: int | None = None) -> None:
        if value is None:
            return
        if value < 1:
            raise ApiError(422, field, f"{field} {value}: must be a positive integer", limit=maximum or ">= 1")
        if maximum is not None and value > maximum:
            raise ApiError(422, field, f"{field} {value} exceeds this server's limit of {maximum}", limit=maximum)

    positive("num_samples", req.num_samples, limits.max_samples)
    positive("steps", req.steps, limits.max_steps)
    positive("top_k", req.top_k)
    positive("stream_every", req.stream_every)
    if req.length is not None and req.length < 1:
        raise ApiError(422, "length", f"length {req.length}: must be a positive integer", limit=">= 1")
    if req.gap_length < 1:
        raise ApiError(422, "gap_length", f"gap_length {req.gap_length}: each gap needs at least one position",
                       limit=">= 1")
    if not req.gap:
        raise ApiError(422, "gap", "gap must be a non-empty marker such as ___", limit="non-empty")
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise ApiError(422, "top_p", f"top_p {req.top_p}: must be in (0, 1] (omit it to keep every token)",
                       limit="(0, 1]")
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise ApiError(422, "temperature", f"temperature {req.temperature}: must be a finite number >= 0",
                       limit=">= 0")
    if req.seed is not None and not 0 <= req.seed < 2**63:
        raise ApiError(422, "seed", f"seed {req.seed}: must be in [0, 2**63)", limit="[0, 2**63)")
    if req.sampler not in samplers:
        raise ApiError(422, "sampler", f"sampler {req.sampler!r} is unknown; this server offers {list(samplers)}",
                       limit=list(samplers))
    taken = sorted(RESERVED_OPTIONS & set(req.sampler_options))
    if taken:
        raise ApiError(422, "sampler_options", f"sampler_options may not set {taken}: they are request fields "
                       "or set by the server", limit=sorted(RESERVED_OPTIONS))
    if req.infill is not None and (req.prompt or req.suffix):
        raise ApiError(422, "infill", "use either infill or prompt/suffix, not both")
    if req.infill is not None and req.gap not in req.infill:
        raise ApiError(422, "infill", f"infill {req.infill!r} has no gap {req.gap!r}: mark each gap to fill "
                       f"with {req.gap}", limit=f"at least one {req.gap!r}")


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of pydantic's validation errors as an :class:`ApiError` naming the field
    (malformed JSON → 400, anything else → 422)."""
    err = errors[0] if errors else {"type": "missing", "loc": ("body",), "msg": "no body"}
    loc = [str(part) for part in err.get("loc", ()) if part != "body"]
    field = ".".join(loc) or "body"
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", err.get("msg", ""))
        return ApiError(400, "body", f"malformed JSON: {detail}", limit="a JSON object")
    if kind == "extra_forbidden":
        allowed = sorted(GenerateRequest.model_fields)
        return ApiError(422, field, f"unknown field {field!r}; the fields are {allowed}", limit=allowed)
    if kind in ("model_type", "model_attributes_type", "dict_type") and field == "body":
        return ApiError(400, "body", "the body must be a JSON object", limit="a JSON object")
    if kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected")
        return ApiError(422, field, f"{field}: {err.get('msg')}", limit=expected)
    expected = {"int": "an integer", "float": "a number", "string": "a string", "bool": "true or false",
                "dict": "a JSON object"}.get(kind.split("_")[0])
    return ApiError(422, field, f"{field}: {err.get('msg')}", limit=expected)
