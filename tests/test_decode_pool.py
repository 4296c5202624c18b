"""DecodePool waits: a dead decode child or a hung one is noticed while waiting (issue 13)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import TimeoutError
from concurrent.futures.process import BrokenProcessPool

import pytest

from worker.decode_pool import DecodePool


def test_a_killed_child_is_noticed_at_once_not_after_the_decode_timeout():
    with DecodePool(2, timeout_s=600) as pool:
        futures = [pool._pool().submit(time.sleep, 30) for _ in range(2)]  # noqa: SLF001
        deadline = time.monotonic() + 60
        while len(pool._executor._processes) < 2 and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.05)
        time.sleep(1.0)  # both children are inside time.sleep
        victim = next(iter(pool._executor._processes.values()))  # noqa: SLF001
        os.kill(victim.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(BrokenProcessPool):
            pool.wait_for(futures)
        assert time.monotonic() - started < 20  # the 600 s timeout, or the 30 s sleeps, were not waited
        pool.reset()


def test_a_decoder_that_makes_no_progress_times_out():
    with DecodePool(1, timeout_s=1.0) as pool:
        futures = [pool._pool().submit(time.sleep, 60)]  # noqa: SLF001
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            pool.wait_for(futures)
        assert time.monotonic() - started < 30
        pool.reset()
