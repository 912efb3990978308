"""Running generations off the event thread: a pool of engines (one per device), per-session stop flags, and a
generator that turns the engine's events into coalesced UI updates.

Nothing here imports torch: engines are created by app.py and handed in, and only their public methods are used.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger(__name__)


class EnginePool:
    """A fixed set of engines, one per device; a job borrows a free one and gives it back when it ends."""

    def __init__(self, engines: Sequence):
        if not engines:
            raise ValueError("the engine pool needs at least one engine")
        self._engines = list(engines)
        self._free: queue.Queue = queue.Queue()
        for engine in self._engines:
            self._free.put(engine)
        self._busy: set[int] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._engines)

    def __iter__(self):
        return iter(self._engines)

    @property
    def preset(self):
        """The model preset every engine in the pool runs."""
        return self._engines[0].preset

    def check(self, options):
        """Validate options against the preset without running (raises OptionsError)."""
        return self._engines[0].check(options)

    def memory_verdict(self, options) -> tuple[bool, str]:
        """Whether a run of `options` is expected to fit, judged on the device with the least memory available,
        and one line saying so (raises OptionsError for invalid options)."""
        verdicts = [engine.estimate_memory(options) for engine in self._engines]
        estimate, available = min(verdicts, key=lambda pair: pair[1])
        return estimate.verdict(available)

    def acquire(self, timeout: float | None = None):
        """Borrow a free engine, waiting up to `timeout` seconds; None when none became free."""
        try:
            engine = self._free.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._lock:
            self._busy.add(id(engine))
        return engine

    def try_acquire(self):
        """Borrow a free engine without waiting, or None."""
        try:
            engine = self._free.get_nowait()
        except queue.Empty:
            return None
        with self._lock:
            self._busy.add(id(engine))
        return engine

    def release(self, engine) -> None:
        """Give a borrowed engine back."""
        with self._lock:
            self._busy.discard(id(engine))
        self._free.put(engine)

    def is_busy(self, engine) -> bool:
        with self._lock:
            return id(engine) in self._busy

    def unload_idle(self) -> tuple[int, int]:
        """Unload the models of every idle engine; returns (unloaded, busy) counts."""
        borrowed = [e for e in (self.try_acquire() for _ in self._engines) if e is not None]
        try:
            for engine in borrowed:
                engine.unload()
        finally:
            for engine in borrowed:
                self.release(engine)
        return len(borrowed), len(self._engines) - len(borrowed)


@dataclass
class SessionJob:
    """One browser session's job flags, kept in gr.State (each session gets its own copy).

    Every run gets a number and a Stop names the run it stops: a Generate clicked right after Stop must not clear
    the flag that the previous run, still finishing its step, has yet to read.
    """

    run_id: int = 0  # the session's latest run
    stopped_up_to: int = -1  # runs numbered up to this one were asked to stop
    finish_up_to: int = -1  # ... to stop after the segment they are making (Extend in segments)
    running: bool = False
    made: list[str] = field(default_factory=list)  # file stems of the results this session saved
    last_result: str | None = None  # the latest result's media file (an .mp4, or a .png for a single frame)

    def record(self, path: str | os.PathLike | None) -> None:
        """A run of this session saved a result (the History of a public studio lists only these)."""
        stem = Path(path).stem if path else None
        if stem and stem not in self.made:
            self.made.append(stem)
            self.last_result = str(path)

    def start(self) -> int:
        """Begin a new run; returns its number."""
        self.run_id += 1
        self.running = True
        return self.run_id

    def should_stop(self, run_id: int) -> bool:
        return self.stopped_up_to >= run_id

    @property
    def stop_requested(self) -> bool:
        """Whether the latest run was asked to stop."""
        return self.should_stop(self.run_id)

    def request_stop(self, run_id: int | None = None) -> bool:
        """Ask a run (default: the latest) to stop at its next step; returns whether one was running."""
        self.stopped_up_to = max(self.stopped_up_to, self.run_id if run_id is None else run_id)
        return self.running

    def should_finish_segment(self, run_id: int) -> bool:
        return self.finish_up_to >= run_id

    def request_finish_segment(self) -> bool:
        """Ask the latest run to end after the segment it is making; returns whether one was running."""
        self.finish_up_to = self.run_id
        return self.running

    def finish(self, run_id: int | None = None) -> None:
        """A run ended; a newer run started meanwhile keeps the session marked as running."""
        if run_id is None or run_id == self.run_id:
            self.running = False


@dataclass(frozen=True)
class JobUpdate:
    """What the UI shows about a job at one moment; `preview` and `partial_video` are only set when a new one
    arrived."""

    stage: str = "queued"
    message: str = "Waiting for a free device"
    step: int = 0
    total: int = 0
    elapsed_s: float = 0.0
    eta_s: float | None = None
    preview: object | None = None  # numpy uint8 (H, W, 3)
    partial_video: str | None = None  # an extension's video so far (set only when a new one arrived)
    device: str = ""
    result: object | None = None  # the engine's GenerationResult
    error: BaseException | None = None
    stopped: bool = False
    done: bool = False


@dataclass(frozen=True)
class _Outcome:
    result: object | None = None
    error: BaseException | None = None


def _is_stop(error: BaseException, job: SessionJob, run_id: int) -> bool:
    # GenerationStopped lives in pipelines.sampling (torch), so it is recognised by name here.
    return type(error).__name__ == "GenerationStopped" or job.should_stop(run_id)


def _work(pool: EnginePool, options, job: SessionJob, run_id: int, events: queue.Queue, llm=None) -> None:
    engine = None
    try:
        while engine is None:
            if job.should_stop(run_id):
                raise InterruptedError("stopped while waiting for a free device")
            engine = pool.acquire(timeout=0.5)
        events.put(("device", str(getattr(engine, "device", ""))))
        result = engine.run(options, on_event=events.put, should_stop=lambda: job.should_stop(run_id),
                            finish_segment=lambda: job.should_finish_segment(run_id), llm=llm)  # llm: the session's
        job.record(result.video_path)  # also a run stopped after a segment, whose handler was cancelled
        events.put(_Outcome(result=result))
    except BaseException as exc:  # the UI reports it; the worker thread must never die silently
        events.put(_Outcome(error=exc))
    finally:
        if engine is not None:
            pool.release(engine)


def _apply(update: JobUpdate, item, job: SessionJob, run_id: int) -> JobUpdate:
    if isinstance(item, _Outcome):
        if item.error is not None and _is_stop(item.error, job, run_id):
            return replace(update, stage="stopped", message="Stopped", stopped=True, done=True)
        if item.error is not None:
            return replace(update, stage="error", message=str(item.error), error=item.error, done=True)
        return replace(update, stage="done", message="Done", result=item.result, done=True)
    if isinstance(item, tuple) and item[0] == "device":
        return replace(update, device=item[1], message="Starting")
    kind = getattr(item, "kind", None)
    if kind == "stage":
        return replace(update, stage=item.stage, message=item.message)
    if kind == "progress":
        return replace(update, step=item.step, total=item.total, elapsed_s=item.elapsed_s, eta_s=item.eta_s,
                       message=f"Sampling {item.step}/{item.total}")
    if kind == "preview":
        return replace(update, preview=item.image)
    if kind == "partial":
        return replace(update, partial_video=str(item.path),
                       message=f"Segment {item.segments_done} done: playing the video so far")
    return update  # the engine's own "result" event: the outcome carries it


def run_job(pool: EnginePool, options, job: SessionJob, poll_s: float = 0.2,
            run_id: int | None = None, llm=None) -> Iterator[JobUpdate]:
    """Run one request on a free engine in a worker thread and yield updates (several events -> one update).

    Stopping: `job.request_stop()` ends the run within one sampling step. If the consumer stops iterating (the
    event was cancelled), the run is asked to stop too, so the engine is never left running for nobody. `run_id`
    is the number `job.start()` gave this run (default: the session's latest); `llm` the session's LLM settings
    for the engine's own LLM stages (per-segment motion scores).
    """
    run = job.run_id if run_id is None else run_id
    events: queue.Queue = queue.Queue()
    worker = threading.Thread(target=_work, args=(pool, options, job, run, events, llm), name="studio-job",
                              daemon=True)
    update = JobUpdate()
    worker.start()
    try:
        yield update
        while not update.done:
            try:
                batch = [events.get(timeout=poll_s)]
            except queue.Empty:
                continue
            while not events.empty():
                batch.append(events.get_nowait())
            update = replace(update, preview=None, partial_video=None)
            for item in batch:
                update = _apply(update, item, job, run)
            yield update
    finally:
        if worker.is_alive():
            job.request_stop(run)
            worker.join(timeout=0.1)

