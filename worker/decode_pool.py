"""A pool of decode processes that survives crashing or hanging decoders.

Compressed DICOM costs far more to decode than the CNN costs to score on a CPU,
so decoding runs in child processes (one per core by default) while the parent
holds the model. A child killed by a decoder (segfault, OOM kill) or stuck past
the time limit is replaced; the batch is then retried file by file so that only
the culprit is failed.
"""

from __future__ import annotations

import logging
import multiprocessing
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, TimeoutError, wait
from concurrent.futures.process import BrokenProcessPool

from worker.hashing import sha256_following_links, sha256_regular_file
from worker.prepare import Prepared, limit_threads, prepare

log = logging.getLogger(__name__)

#: Seconds one file may take to decode before it is failed (JPEG 2000 films take ~1 s).
DECODE_TIMEOUT_S = 120.0


class DecodePool:
    def __init__(self, workers: int, timeout_s: float = DECODE_TIMEOUT_S) -> None:
        self.workers = workers
        self.timeout_s = timeout_s
        self._executor: ProcessPoolExecutor | None = None

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            # spawn: children must not inherit TensorFlow state or open DB connections
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(self.workers, mp_context=context, initializer=limit_threads)
        return self._executor

    def _reset(self) -> None:
        if self._executor is not None:
            for process in list(getattr(self._executor, "_processes", {}).values()):
                process.kill()
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def prepare_many(self, jobs: list[tuple[str, str | None]], input_size: int) -> list[Prepared]:
        """Decode (path, expected sha256) pairs in parallel, in order."""
        if self.workers <= 0:
            return [prepare(path, input_size, sha) for path, sha in jobs]
        try:
            futures = [self._pool().submit(prepare, path, input_size, sha) for path, sha in jobs]
            return [future.result(timeout=self.timeout_s) for future in futures]
        except (BrokenProcessPool, TimeoutError):
            log.warning("a decoder crashed or hung; retrying this batch one file at a time")
            self._reset()
            return [self._prepare_isolated(path, sha, input_size) for path, sha in jobs]

    def _prepare_isolated(self, path: str, sha256: str | None, input_size: int) -> Prepared:
        try:
            return self._pool().submit(prepare, path, input_size, sha256).result(timeout=self.timeout_s)
        except BrokenProcessPool:
            self._reset()
            return Prepared(status="failed", reason="the decoder crashed on this file")
        except TimeoutError:
            self._reset()
            return Prepared(status="failed", reason=f"decoding took longer than {self.timeout_s:.0f} s")

    def hash_many(self, paths: list[str], follow_symlinks: bool = False) -> list[str | None]:
        """Content hashes (None: not a regular file, or unreadable now), in order.

        A hash that makes no progress for ``timeout_s`` (a stalled share) is given up:
        that file and those not yet hashed get None (looked at again on a later scan).
        Without decode processes, hashing runs in-process without a time limit (FIFOs
        are still refused: see :mod:`worker.hashing`).
        """
        function = sha256_following_links if follow_symlinks else sha256_regular_file
        if self.workers <= 0 or not paths:
            return [function(path) for path in paths]
        try:
            futures = [self._pool().submit(function, path) for path in paths]
        except BrokenProcessPool:
            self._reset()
            return [None] * len(paths)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=self.timeout_s, return_when=FIRST_COMPLETED)
            if not done:
                log.warning("hashing stalled for %.0f s; those files wait for a later scan", self.timeout_s)
                self._reset()
                break
        return [_result_or_none(future) for future in futures]

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _result_or_none(future: Future) -> str | None:
    if not future.done() or future.cancelled() or future.exception() is not None:
        return None
    return future.result()
