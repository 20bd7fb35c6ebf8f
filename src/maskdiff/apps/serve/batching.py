"""Shared network calls for concurrent requests, a bounded queue, and request time-outs.

The batching rule
-----------------
Each request runs its own :func:`maskdiff.sample` loop in a worker thread, with its own generator,
its own fixed tokens, steps, time grid, sampler, temperature, top-k/top-p and sampler options.
Only the network is shared: the loop's denoiser is a proxy (:meth:`NetworkBatcher.denoiser`) that
hands ``(z, t)`` to one batching thread, which concatenates the pending calls of every active
request whose sequences have the **same length** (and, for a class-conditional image run, the
same label settings: none are offered yet) into one network call and hands each its rows back.
Rows carry their own time ``t`` (the network takes one per row), so requests at different steps,
with different grids or step counts share a call. The random draws never leave the request's own
thread and generator, so a request's samples do not depend on what it was batched with (up to the
float rounding of the network at another batch size).

A call waits at most ``batch_window_ms`` for the other active requests to join; it goes at once
when every active request is waiting for the network.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

__all__ = ["NetworkBatcher", "JobRunner", "Cancelled", "QueueFull", "RequestTimedOut"]


class Cancelled(Exception):
    """The request's client went away, or the server is stopping: sampling stops at the next step."""


class RequestTimedOut(Exception):
    """The request was still queued or sampling at its deadline."""


class QueueFull(Exception):
    """Every sampling slot is busy and the queue is full."""


@dataclass
class _Call:
    z: Tensor
    t: Tensor
    done: threading.Event = field(default_factory=threading.Event)
    out: Tensor | None = None
    error: BaseException | None = None


class NetworkBatcher:
    """One thread that runs the network for every sampling thread, several requests per call.

    ``network(z (N, L), t (N,)) -> logits (N, L, V)`` is called only from this object's thread.
    Sampling threads join with :meth:`member` (so the batcher knows how many calls to wait for)
    and call :meth:`denoiser`.

    Attributes (totals since start): calls (network calls), rows (sequences evaluated), requests
    (calls asked for by sampling threads; requests / calls is the sharing factor).
    """

    def __init__(self, network: Callable[[Tensor, Tensor], Tensor], *, max_rows: int = 512,
                 window_s: float = 0.002) -> None:
        self.network, self.max_rows, self.window_s = network, max_rows, window_s
        self.calls = self.rows = self.requests = 0
        self._cond = threading.Condition()
        self._pending: list[_Call] = []
        self._members = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="maskdiff-network", daemon=True)
        self._thread.start()

    @contextmanager
    def member(self) -> Iterator[None]:
        """Count the calling sampling thread as active while inside the block."""
        with self._cond:
            self._members += 1
        try:
            yield
        finally:
            with self._cond:
                self._members -= 1
                self._cond.notify_all()

    def denoiser(self, z: Tensor, t: Tensor) -> Tensor:
        """Logits for ``z`` (B, L) at times ``t`` (B,), computed in a call shared with other requests."""
        call = _Call(z, t)
        with self._cond:
            if self._stopped:
                raise Cancelled("the server is stopping")
            self._pending.append(call)
            self.requests += 1
            self._cond.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.out is not None
        return call.out

    def stop(self) -> None:
        """Stop the thread; calls still pending fail with :class:`Cancelled`."""
        with self._cond:
            self._stopped = True
            pending, self._pending = self._pending, []
            self._cond.notify_all()
        for call in pending:
            call.error = Cancelled("the server is stopping")
            call.done.set()
        self._thread.join(timeout=5)

    def _take(self) -> list[_Call]:
        """Wait for calls, give the other active requests up to the window to join, and take a
        batch: the first pending call's length, up to ``max_rows`` rows (at least one call)."""
        with self._cond:
            while not self._pending and not self._stopped:
                self._cond.wait()
            if self._stopped:
                return []
            deadline = time.monotonic() + self.window_s
            while len(self._pending) < self._members and not self._stopped:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            length = self._pending[0].z.shape[1]
            batch, rest, rows = [], [], 0
            for call in self._pending:
                n = call.z.shape[0]
                if call.z.shape[1] == length and (not batch or rows + n <= self.max_rows):
                    batch.append(call)
                    rows += n
                else:
                    rest.append(call)
            self._pending = rest
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take()
            if not batch:
                return
            try:
                with torch.no_grad():
                    z = torch.cat([c.z for c in batch]) if len(batch) > 1 else batch[0].z
                    t = torch.cat([c.t for c in batch]) if len(batch) > 1 else batch[0].t
                    logits = self.network(z, t)
                outs = logits.split([c.z.shape[0] for c in batch]) if len(batch) > 1 else (logits,)
                for c, out in zip(batch, outs):
                    c.out = out
            except BaseException as err:  # handed to every waiting request; the thread goes on
                for c in batch:
                    c.error = err
            self.calls += 1
            self.rows += int(sum(c.z.shape[0] for c in batch))
            for c in batch:
                c.done.set()


class JobRunner:
    """Runs jobs in at most ``max_active`` threads, with at most ``queue_size`` more waiting.

    :meth:`submit` raises :class:`QueueFull` beyond that. A job is a callable
    ``job(check) -> result``; ``check()`` raises :class:`RequestTimedOut` past the job's deadline
    and :class:`Cancelled` once :meth:`cancel` was called for it (or the runner stops); jobs call
    it at every sampling step.
    """

    def __init__(self, *, max_active: int, queue_size: int) -> None:
        self.max_active, self.queue_size = max_active, queue_size
        self._pool = ThreadPoolExecutor(max_workers=max_active, thread_name_prefix="maskdiff-sample")
        self._lock = threading.Lock()
        self._inside = 0
        self._stopping = False
        self.served = self.rejected = self.timed_out = 0

    @property
    def inside(self) -> int:
        """Requests queued or sampling now."""
        return self._inside

    def submit(self, job: Callable[[Callable[[], None]], Any], *, timeout_s: float,
               cancelled: threading.Event) -> Future:
        """Queue ``job``; its deadline is ``timeout_s`` from now. Raises :class:`QueueFull`."""
        with self._lock:
            if self._stopping or self._inside >= self.max_active + self.queue_size:
                self.rejected += 1
                raise QueueFull()
            self._inside += 1
        deadline = time.monotonic() + timeout_s

        def check() -> None:
            if cancelled.is_set() or self._stopping:
                raise Cancelled("the request was cancelled")
            if time.monotonic() > deadline:
                raise RequestTimedOut()

        def run() -> Any:
            try:
                check()
                result = job(check)
                self.served += 1
                return result
            except RequestTimedOut:
                self.timed_out += 1
                raise
            finally:
                with self._lock:
                    self._inside -= 1

        return self._pool.submit(run)

    def stop(self) -> None:
        """Refuse new jobs, make running ones stop at their next step, and wait for the threads."""
        self._stopping = True
        self._pool.shutdown(wait=True, cancel_futures=True)
