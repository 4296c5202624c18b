"""worker.scoring.allocator: freed film-sized buffers stay mapped in every decoding process (issue 13)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from worker.scoring.decode_pool import DecodePool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")


def freed_buffer_stays_mapped() -> bool:
    """Touch and free a 16 MiB buffer; True if the process's resident size keeps it."""
    page = os.sysconf("SC_PAGE_SIZE")

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * page

    buffer = bytearray(16 * 1024 * 1024)
    buffer[::page] = b"\x01" * len(buffer[::page])
    touched = resident()
    del buffer
    return touched - resident() < 8 * 1024 * 1024


def _in_fresh_python(code: str, **env: str) -> str:
    script = textwrap.dedent(code)
    environment = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment, check=True
    )
    return result.stdout.strip()


PROBE = """
    from tests.test_allocator import freed_buffer_stays_mapped
    from worker.scoring.allocator import retain_freed_memory
    before = freed_buffer_stays_mapped()
    applied = retain_freed_memory()
    print(before, applied, freed_buffer_stays_mapped())
"""


def test_freed_buffers_stay_mapped_once_retained():
    # glibc's default gives a 16 MiB buffer back on free (it is mmapped); retained, it stays.
    assert _in_fresh_python(PROBE) == "False True True"


def test_the_operators_malloc_tuning_wins():
    tuned = _in_fresh_python(PROBE, GLIBC_TUNABLES="glibc.malloc.trim_threshold=1000")
    assert tuned.split()[1] == "False"


def test_decode_processes_retain_freed_memory():
    pool = DecodePool(1)
    try:
        assert pool._pool().submit(freed_buffer_stays_mapped).result(timeout=60)  # noqa: SLF001
    finally:
        pool.close()
