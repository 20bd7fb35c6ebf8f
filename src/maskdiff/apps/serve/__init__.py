"""``maskdiff serve RUN_DIR``: an HTTP API and a live page for a trained run (the ``serve`` extra).

Modules: :mod:`~maskdiff.apps.serve.schemas` (request body, limits, errors),
:mod:`~maskdiff.apps.serve.batching` (shared network calls, bounded queue, time-outs),
:mod:`~maskdiff.apps.serve.service` (the run opened read-only; requests → sampler calls),
:mod:`~maskdiff.apps.serve.app` (FastAPI routes; imports FastAPI) and ``static/`` (the page: plain
HTML, JavaScript and CSS, no build step, nothing fetched from elsewhere). Reference: ``docs/serve.md``.

This package imports FastAPI only through :func:`create_app` and :func:`build_app`, so that the
rest of maskdiff does not need the extra.
"""

from __future__ import annotations

import os
from typing import Any

from maskdiff.apps.serve.schemas import ApiError, GenerateRequest, ServeLimits
from maskdiff.apps.serve.service import ModelService

__all__ = ["ApiError", "GenerateRequest", "ServeLimits", "ModelService", "create_app", "build_app"]


def create_app(service: ModelService) -> Any:
    """The FastAPI app serving ``service`` (see :func:`maskdiff.apps.serve.app.create_app`)."""
    from maskdiff.apps.serve.app import create_app as _create

    return _create(service)


def build_app(run_dir: str | os.PathLike, limits: ServeLimits | None = None, *, device: str = "cpu",
              weights: str = "ema") -> Any:
    """Open ``run_dir`` read-only and return the app serving it."""
    return create_app(ModelService(run_dir, limits, device=device, weights=weights))
