"""``maskdiff serve RUN_DIR``: the HTTP API and the live page (:mod:`maskdiff.apps.serve`).

The handler checks the flags, opens the run read-only and runs uvicorn; FastAPI and uvicorn (the
``serve`` extra) are imported inside it so that ``maskdiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["HANDLERS", "add_parsers"]


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to ``sub``."""
    p = sub.add_parser("serve", help="serve a run over HTTP: an API and a page that shows the unmasking",
                       description="Serve a trained run: GET /healthz, GET /v1/model, POST /v1/generate, "
                                   "POST /v1/generate/stream (server-sent events) and a page at /. "
                                   "The run folder is only read. Reference: docs/serve.md.")
    p.add_argument("run_dir")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--weights", default="ema", choices=["ema", "raw"])
    p.add_argument("--max-length", type=int, default=None, help="tokens per sample at most (default: the model's)")
    p.add_argument("--max-samples", type=int, default=16, help="samples per request at most")
    p.add_argument("--max-steps", type=int, default=1024, help="sampling steps per request at most")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds a request may queue and sample")
    p.add_argument("--max-active", type=int, default=16,
                   help="requests sampled at once, their network calls shared (1: one request at a time)")
    p.add_argument("--queue-size", type=int, default=64, help="requests waiting beyond --max-active (then 503)")
    p.add_argument("--max-batch-rows", type=int, default=512, help="sequences in one shared network call at most")
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="how long a network call waits for the other active requests to join it")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def cmd_serve(args: argparse.Namespace) -> int:
    from maskdiff.apps.checks import UsageError

    try:
        import uvicorn

        from maskdiff.apps.serve import ServeLimits, build_app
    except ImportError as err:
        raise UsageError(f"maskdiff serve needs FastAPI and uvicorn ({err}): pip install 'maskdiff[serve]'") from None
    import torch

    from maskdiff.devices import resolve_device

    if not 0 <= args.port < 65536:
        raise UsageError(f"--port {args.port}: must be in [0, 65535]")
    try:
        limits = ServeLimits(max_length=args.max_length, max_samples=args.max_samples, max_steps=args.max_steps,
                             timeout_s=args.timeout, max_active=args.max_active, queue_size=args.queue_size,
                             max_batch_rows=args.max_batch_rows, batch_window_ms=args.batch_window_ms)
    except ValueError as err:
        name = str(err).split()[0]
        flag = {"timeout_s": "--timeout"}.get(name, "--" + name.replace("_", "-"))
        raise UsageError(f"{flag}: {err}") from None
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads {args.threads}: must be a positive integer")
        torch.set_num_threads(args.threads)
    app = build_app(args.run_dir, limits, device=str(resolve_device(args.device)), weights=args.weights)
    print(f"serving {args.run_dir} on http://{args.host}:{args.port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


HANDLERS = {"serve": cmd_serve}
