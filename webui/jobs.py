"""Generation jobs: one lock shared by every browser session, a cancel token per job.

A job runs in its own worker thread so the Gradio handler that submitted it can stream
progress (step, total, ETA, previews) while it waits and runs. Interrupt and Skip act on the
jobs of the session that asks, so one user's Interrupt never stops another user's job.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1


@dataclass
class Progress:
    """What the progress bar shows; `fraction` covers the whole job (all batches, hires)."""

    step: int = 0
    total_steps: int = 0
    batch_index: int = 0
    batch_count: int = 1
    phase: str = "sampling"
    elapsed: float = 0.0
    fraction: float = 0.0
    preview: object = None  # PIL image or None

    @property
    def eta(self) -> float | None:
        if self.fraction <= 0.0:
            return None
        return max(0.0, self.elapsed / self.fraction - self.elapsed)  # A1111's formula


@dataclass
class Waiting:
    ahead: int  # jobs that will run before this one
    reason: str = "queue"  # "queue" | "model"


@dataclass
class Job:
    id: int
    session: str
    kind: str
    token: object  # ldm_core.pipeline.CancelToken
    hires: bool = False
    state: str = "queued"  # queued | running | done
    result: object = None
    error: BaseException | None = None
    warnings: list[str] = field(default_factory=list)
    paths: list = field(default_factory=list)  # where the images were saved
    submitted: float = field(default_factory=time.perf_counter)
    events: queue.Queue = field(default_factory=queue.Queue)

    @property
    def finished(self) -> bool:
        return self.state == "done"

    def on_step(self, event) -> None:
        """ProgressEvent from the pipeline -> Progress for the handler."""
        per_batch = event.step / max(1, event.total_steps)
        if self.hires:
            per_batch = (0.5 if event.phase == "hires" else 0.0) + per_batch / 2
        fraction = (event.batch_index + per_batch) / max(1, event.batch_count)
        self.events.put(
            Progress(
                event.step,
                event.total_steps,
                event.batch_index,
                event.batch_count,
                event.phase,
                event.elapsed,
                min(1.0, fraction),
                event.preview,
            )
        )


class JobQueue:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # the generation lock: one job (or model load) at a time
        self._ids = itertools.count(1)
        self._jobs: list[Job] = []  # queued and running, in submission order
        self._jobs_lock = threading.Lock()

    def submit(
        self,
        session: str,
        kind: str,
        work: Callable[[Job], object],
        *,
        token,
        hires: bool = False,
        model_ready: threading.Event | None = None,
    ) -> Job:
        """Run `work(job)` under the generation lock in a worker thread; returns at once."""
        job = Job(next(self._ids), session or "anonymous", kind, token, hires)
        with self._jobs_lock:
            self._jobs.append(job)
        threading.Thread(
            target=self._run, args=(job, work, model_ready), name=f"job-{job.id}", daemon=True
        ).start()
        return job

    def _acquire(self, job: Job, model_ready: threading.Event | None) -> bool:
        """Take the generation lock once no model load is pending; False if interrupted first."""
        while not job.token.interrupted:
            if model_ready is not None and not model_ready.is_set():
                job.events.put(Waiting(self.ahead(job), "model"))
                model_ready.wait(POLL_SECONDS * 5)
                continue
            if self.lock.acquire(timeout=POLL_SECONDS):
                if model_ready is None or model_ready.is_set():
                    return True
                self.lock.release()
        return False

    def _run(
        self, job: Job, work: Callable[[Job], object], model_ready: threading.Event | None
    ) -> None:
        try:
            job.events.put(Waiting(self.ahead(job)))
            if not self._acquire(job, model_ready):
                return
            try:
                job.state = "running"
                job.result = work(job)
            finally:
                self.lock.release()
        except BaseException as exc:  # handed to the handler, which shows it to the user
            job.error = exc
            if not _is_user_error(exc):
                log.exception("job %s (%s) failed", job.id, job.kind)
        finally:
            job.state = "done"
            with self._jobs_lock:
                if job in self._jobs:
                    self._jobs.remove(job)
            job.events.put(None)

    def ahead(self, job: Job) -> int:
        with self._jobs_lock:
            return self._jobs.index(job) if job in self._jobs else 0

    def active(self, session: str | None = None) -> list[Job]:
        with self._jobs_lock:
            return [j for j in self._jobs if session is None or j.session == session]

    def interrupt(self, session: str) -> int:
        """Interrupt every job of `session` (finished images are kept); returns how many."""
        jobs = self.active(session)
        for job in jobs:
            job.token.interrupt()
        return len(jobs)

    def skip(self, session: str) -> int:
        """Skip the current batch of the running job of `session`."""
        jobs = [j for j in self.active(session) if j.state == "running"]
        for job in jobs:
            job.token.skip()
        return len(jobs)

    def stream(
        self, job: Job, timeout: float = POLL_SECONDS
    ) -> Iterator[Progress | Waiting | None]:
        """Events of `job` until it is done; yields None every `timeout` s while nothing happens
        (so the handler can refresh the elapsed time). Coalesces a backlog of progress events."""
        while True:
            try:
                event = job.events.get(timeout=timeout)
            except queue.Empty:
                if job.finished and job.events.empty():
                    return
                yield None
                continue
            if event is None:
                return
            # skip to the newest progress, but never drop a preview
            while isinstance(event, Progress) and event.preview is None and not job.events.empty():
                nxt = job.events.queue[0] if job.events.queue else None
                if not isinstance(nxt, Progress):
                    break
                event = job.events.get_nowait()
            yield event


def _is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, ValueError)
