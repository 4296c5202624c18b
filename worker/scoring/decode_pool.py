"""A pool of decode processes that survives crashing, hanging or memory-hungry decoders.

Compressed DICOM costs far more to decode than the CNN costs to score on a CPU,
so decoding runs in child processes (one per core by default) while the parent
holds the model. A child killed by a decoder (segfault, OOM kill) or stuck past
the time limit is replaced; the unfinished files of the batch are then retried one
by one so that only the culprit is failed. Each child's address space is capped
(``RLIMIT_AS``), so a decompression bomb that slips past the header checks fails
its own file with "out of memory" instead of exhausting the machine.

:meth:`DecodePool.submit` returns at once, so a caller can decode batch k+1 while it
scores batch k (see :mod:`worker.scoring.overlap`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import resource
import signal
import sys
import time
from concurrent.futures import (
    FIRST_COMPLETED,
    CancelledError,
    Future,
    ProcessPoolExecutor,
    TimeoutError,
    wait,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from pipeline.lungs import InputPlan
from pipeline.scope import ScopePolicy
from worker.ingest.hashing import sha256_following_links, sha256_regular_file
from worker.scoring.prepare import Prepared, limit_threads, prepare, prepare_found

log = logging.getLogger(__name__)

#: Seconds one file may take to decode before it is failed (JPEG 2000 films take ~1 s).
DECODE_TIMEOUT_S = 120.0
#: Address space of one decode process. The largest accepted frame (pipeline.limits: 1 GiB
#: decoded) needs ~2.5 GiB through the LUTs in float; an idle child maps ~0.5 GiB.
DECODE_MEMORY_LIMIT_BYTES = 4 << 30
#: How often a wait for decodes checks that every decode process is still alive (seconds).
CHILD_POLL_S = 0.2

Job = tuple[str, str | None]  # (path, expected sha256)


def cap_memory(limit_bytes: int | None) -> None:
    """Cap this process's address space (RLIMIT_AS); allocations beyond it raise MemoryError."""
    if not limit_bytes:
        return
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = limit_bytes if hard == resource.RLIM_INFINITY else min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))


def init_decode_process(memory_limit_bytes: int | None = DECODE_MEMORY_LIMIT_BYTES) -> None:
    """Initialiser of every decode child: one thread, pydicom's process settings, freed memory kept
    (:mod:`worker.scoring.allocator`), a memory cap, and an exit without interpreter teardown."""
    from pipeline.dicom import configure_pydicom
    from worker.scoring.allocator import retain_freed_memory

    # Ctrl-C reaches every process of the terminal's group: the parent stops the pool and reports;
    # a child that raised KeyboardInterrupt too only printed a traceback (issue 25 item 18).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    limit_threads()
    configure_pydicom()
    retain_freed_memory()
    cap_memory(memory_limit_bytes)
    # Registered after logging's own exit hook, so it runs first (atexit is last-in, first-out).
    atexit.register(exit_without_teardown)


def exit_without_teardown() -> None:
    """A decode child's last exit hook: flush what it wrote, then end the process at once.

    A child holds nothing that needs cleaning up: it has sent every result (the result pipe is
    written synchronously), and its files were closed with each film. Tearing down its interpreter
    (numpy, pydicom, Pillow and their modules) took 0.05-0.3 s, and the pool's ``close()`` waits for
    every child to exit, so that time was added to the end of every scan (bench/RESULTS.md, #13).
    Only a normal exit reaches this hook (the pool's stop signal), so the exit status is 0.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed or broken stream: nothing left to flush
            stream.flush()
    os._exit(0)


@dataclass(eq=False)
class PendingBatch:
    """Decodes handed to the pool (``futures``) or done in-process (``ready``); :meth:`results` waits for
    them, in order."""

    pool: DecodePool
    jobs: list[Job]
    options: dict
    futures: list[Future] | None = None
    ready: list[Prepared] | None = None

    def cancel(self) -> None:
        """Drop the decodes that have not started (the batch will not be used)."""
        for future in self.futures or []:
            future.cancel()

    def results(self) -> list[Prepared]:
        if self.ready is None:
            self.ready = self._collect()
        return self.ready

    def _collect(self) -> list[Prepared]:
        assert self.futures is not None
        try:
            self.pool.wait_for(self.futures)
            return [future.result(timeout=0) for future in self.futures]
        except (BrokenProcessPool, TimeoutError, CancelledError) as problem:
            log.warning("a decoder crashed or hung; retrying the rest of this batch one file at a time")
            finished = [_result_if_done(future) for future in self.futures]
            # wait_for raises TimeoutError only while every decoder is alive and none finished for
            # the whole timeout: each decoder holds a file that hangs (a hung share, a FIFO swapped
            # in). Those files have had their one timeout and fail now (decoding one again alone would
            # hang a second time); the files queued behind them are innocent and are decoded again.
            hung = self._hung_indices(finished) if isinstance(problem, TimeoutError) else set()
            self.pool.reset()
            return [
                done
                if done is not None
                else self.pool.timed_out()
                if index in hung
                else self.pool.prepare_isolated(path, sha, **self.options)
                for index, (done, (path, sha)) in enumerate(zip(finished, self.jobs, strict=True))
            ]

    def _hung_indices(self, finished: list[Prepared | None]) -> set[int]:
        """The unfinished files the decoders were working on: the pool takes jobs in order, so they
        are the first ``workers`` unfinished ones."""
        unfinished = [index for index, done in enumerate(finished) if done is None]
        return set(unfinished[: self.pool.workers])


def _started() -> None:
    """The job that makes :meth:`DecodePool.start` start a process: nothing to do."""


def _broken(future: Future) -> bool:
    return not future.cancelled() and isinstance(future.exception(), BrokenProcessPool)


def _result_if_done(future: Future) -> Prepared | None:
    if future.done() and not future.cancelled() and future.exception() is None:
        return future.result()
    return None


class DecodePool:
    def __init__(
        self,
        workers: int,
        timeout_s: float = DECODE_TIMEOUT_S,
        *,
        full_resolution_decode: bool = False,
        memory_limit_bytes: int | None = DECODE_MEMORY_LIMIT_BYTES,
    ) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        #: Decode every film at full resolution (for checking the reduced decoders).
        self.full_resolution_decode = full_resolution_decode
        self.memory_limit_bytes = memory_limit_bytes
        self._executor: ProcessPoolExecutor | None = None
        if workers <= 0:  # decoding in this process: it needs pydicom's process settings too
            from pipeline.dicom import configure_pydicom

            configure_pydicom()

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn: children must not inherit TensorFlow state or open DB connections
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                self.workers,
                mp_context=context,
                initializer=init_decode_process,
                initargs=(self.memory_limit_bytes,),
            )
        return self._executor

    def start(self) -> DecodePool:
        """Start the decode processes now instead of at the first decode: each is a fresh interpreter
        that imports pydicom, numpy and Pillow (~0.4 s of CPU) before its first film, and started here
        that overlaps the caller's own start-up (schema check, model load, the first walk)."""
        if self.workers > 0:
            executor = self._pool()
            for _ in range(self.workers):  # the executor starts one more process per waiting job
                executor.submit(_started)
        return self

    def reset(self) -> None:
        """Kill the children (one of them crashed or hangs); the next call starts fresh ones."""
        if self._executor is not None:
            for process in list(getattr(self._executor, "_processes", {}).values()):
                process.kill()
            # A child killed while writing its result leaves the executor's manager thread blocked
            # reading half a message, and interpreter exit then joins that thread forever (seen in CI).
            # With this process's copy of the result pipe's write end closed, the read gets EOF once
            # the dead children's copies are gone, and the thread ends. Taken before shutdown(),
            # which drops the executor's reference to the queue.
            results = getattr(self._executor, "_result_queue", None)
            self._executor.shutdown(wait=False, cancel_futures=True)
            writer = getattr(results, "_writer", None)
            if writer is not None:
                writer.close()
            self._executor = None

    def wait_for(self, futures: list[Future]) -> None:
        """Return once every future is done; raise :class:`BrokenProcessPool` as soon as a child has
        died, :class:`TimeoutError` when none finished for ``timeout_s`` (a hung decoder).

        After a SIGKILL of a child, ProcessPoolExecutor does not always notice (its manager thread can
        stay blocked on the result pipe), so the futures would only end with the timeout: the
        children's exit codes are polled while waiting.
        """
        pending = {future for future in futures if not future.done()}
        idle_since = time.monotonic()
        while pending:
            done, pending = wait(pending, timeout=CHILD_POLL_S, return_when=FIRST_COMPLETED)
            if any(_broken(future) for future in done):  # the executor noticed the death itself
                raise BrokenProcessPool("a decode process died")
            if done:
                idle_since = time.monotonic()
            elif self._a_child_died():
                raise BrokenProcessPool("a decode process died")
            elif time.monotonic() - idle_since > self.timeout_s:
                raise TimeoutError(f"no decode finished for {self.timeout_s:.0f} s")

    def _a_child_died(self) -> bool:
        processes = getattr(self._executor, "_processes", None) or {}
        return any(process.exitcode is not None for process in list(processes.values()))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _submit(self, job: Job, options: dict) -> Future:
        return self._pool().submit(prepare, job[0], expected_sha256=job[1], **options)

    def decode_options(
        self,
        input_size: InputPlan | int,
        scope: ScopePolicy | None = None,
        full_resolution_decode: bool | None = None,
    ) -> dict:
        """Keyword arguments of one decode: ``full_resolution_decode`` overrides the pool's own
        setting when given."""
        full = self.full_resolution_decode if full_resolution_decode is None else full_resolution_decode
        return {"input_size": input_size, "scope": scope or ScopePolicy(), "full_resolution_decode": full}

    def submit(self, jobs: list[Job], *args, **kwargs) -> PendingBatch:
        """Start decoding (path, expected sha256) pairs with :meth:`decode_options` (same arguments);
        returns at once unless decoding in-process."""
        options = self.decode_options(*args, **kwargs)
        if self.workers <= 0:
            ready = [prepare(path, expected_sha256=sha, **options) for path, sha in jobs]
            return PendingBatch(self, jobs, options, ready=ready)
        try:
            futures = [self._submit(job, options) for job in jobs]
        except BrokenProcessPool:
            self.reset()
            futures = [self._submit(job, options) for job in jobs]
        return PendingBatch(self, jobs, options, futures=futures)

    def prepare_many(self, jobs: list[Job], *args, **kwargs) -> list[Prepared]:
        """Decode (path, expected sha256) pairs in parallel, in order: :meth:`submit` (same arguments), then
        wait for the results."""
        return self.submit(jobs, *args, **kwargs).results()

    def prepare_isolated(self, path: str, sha256: str | None, **options) -> Prepared:
        """Decode one file alone, so that a crash or hang names its culprit."""
        try:
            future = self._submit((path, sha256), options)
            self.wait_for([future])
            return future.result(timeout=0)
        except (BrokenProcessPool, CancelledError):
            self.reset()
            return Prepared(status="failed", reason="the decoder crashed on this file")
        except TimeoutError:
            self.reset()
            return self.timed_out()

    def timed_out(self) -> Prepared:
        """The outcome of a file that took longer than the decode timeout."""
        return Prepared(status="failed", reason=f"decoding took longer than {self.timeout_s:.0f} s")

    def hash_many(self, paths: list[str], follow_symlinks: bool = False) -> list[str | None]:
        """Content hashes (None: not a regular file, or unreadable now), in order.

        A hash that makes no progress for ``timeout_s`` (a stalled share) is given up:
        that file and those not yet hashed get None (looked at again on a later scan).
        Without decode processes, hashing runs in-process without a time limit (FIFOs
        are still refused: see :mod:`worker.ingest.hashing`).
        """
        function = sha256_following_links if follow_symlinks else sha256_regular_file
        if self.workers <= 0 or not paths:
            return [function(path) for path in paths]
        try:
            futures = [self._pool().submit(function, path) for path in paths]
        except BrokenProcessPool:
            self.reset()
            return [None] * len(paths)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=self.timeout_s, return_when=FIRST_COMPLETED)
            if not done:
                log.warning("hashing stalled for %.0f s; those files wait for a later scan", self.timeout_s)
                self.reset()
                break
        return [_result_or_none(future) for future in futures]

    def predecode(self, paths: list[str], *args, follow_symlinks: bool = False, **kwargs) -> Predecoded:
        """Start reading files just found, once each, for both registration and scoring, with
        :meth:`decode_options` (same arguments); returns at once (see :class:`Predecoded`). Needs
        decode processes (``workers > 0``)."""
        options = self.decode_options(*args, **kwargs) | {"follow_symlinks": follow_symlinks}
        try:
            futures = {path: self._pool().submit(prepare_found, path, **options) for path in paths}
        except BrokenProcessPool:
            self.reset()
            futures = {}
        return Predecoded(self, futures)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _result_or_none(future: Future) -> str | None:
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()


class Predecoded:
    """Files of one scanner chunk read once in the decode pool: the hash that registers each file
    and the decode that scores it come from the same bytes (issue 13: no second read).

    :meth:`hasher` is the scanner's ``Hasher`` (``register_chunk`` waits on it); :attr:`prepared`
    then holds the decodes by path, for the processor to use instead of decoding again. A file
    whose read did not finish (a decoder crashed or hung on it, or it was not submitted) is hashed
    by :meth:`DecodePool.hash_many` instead, with its rules and time limit, and is decoded later
    by the processor like any registered file, so that a bad file is still isolated and failed.
    """

    def __init__(self, pool: DecodePool, futures: dict[str, Future]) -> None:
        self._pool = pool
        self._futures = futures
        self.prepared: dict[str, Prepared] = {}
        self._unreadable: set[str] = set()
        self._collected = False

    def hasher(self, paths: list[str], follow_symlinks: bool = False) -> list[str | None]:
        """Content hashes of ``paths`` in order (None: not a regular file, or unreadable now)."""
        self._collect()
        digests = {path: prepared.sha256 for path, prepared in self.prepared.items()}
        unread = [path for path in paths if path not in digests and path not in self._unreadable]
        if unread:
            digests.update(zip(unread, self._pool.hash_many(unread, follow_symlinks), strict=True))
        return [digests.get(path) for path in paths]

    def _collect(self) -> None:
        if self._collected:
            return
        self._collected = True
        futures = list(self._futures.values())
        try:
            self._pool.wait_for(futures)
        except (BrokenProcessPool, TimeoutError):
            log.warning("a decoder crashed or hung while reading new files; hashing the rest on their own")
            self._pool.reset()
        for path, future in self._futures.items():
            prepared = _result_if_done(future)
            if prepared is None:
                continue  # not read: hash_many decides
            if prepared.sha256 is None:
                self._unreadable.add(path)  # not a regular file, or unreadable now: None, as hashing
            else:
                self.prepared[path] = prepared
