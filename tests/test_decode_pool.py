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


def test_start_brings_up_every_decode_process_before_any_decode():
    """Issue 13: the processes start while the command gets ready, not at the first film."""
    with DecodePool(2) as pool:
        assert pool.start() is pool
        deadline = time.monotonic() + 60
        while len(pool._executor._processes) < 2 and time.monotonic() < deadline:  # noqa: SLF001
            time.sleep(0.05)
        processes = list(pool._executor._processes.values())  # noqa: SLF001
        assert len(processes) == 2 and all(process.is_alive() for process in processes)


def _child_modules() -> list[str]:
    import sys

    return sorted(sys.modules)


def test_decode_processes_of_the_console_script_do_not_load_the_cli(tmp_path):
    """A spawned child re-imports the parent's main module: for ``cxr-triage``, the console script
    pip writes from ``[project.scripts]``. Its entry must stay light, or every decode process loads
    the whole CLI (Typer, Rich, SQLAlchemy, pydantic: ~0.8 s of CPU each) before its first film."""
    import subprocess
    import sys
    import tomllib

    from tests.conftest import REPO

    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["cxr-triage"]
    module, function = entry.split(":")
    script = tmp_path / "cxr-triage"  # what pip writes, with a probe instead of the call
    script.write_text(
        f"import sys\nfrom {module} import {function}\n"
        "if __name__ == '__main__':\n"
        "    from worker.decode_pool import DecodePool\n"
        "    from tests.test_decode_pool import _child_modules\n"
        "    with DecodePool(1) as pool:\n"
        "        print('\\n'.join(pool._pool().submit(_child_modules).result()))\n"
    )
    env = os.environ | {"PYTHONPATH": str(REPO)}
    shown = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    assert "worker.prepare" in shown  # the probe ran in a decode process
    loaded = set(shown) | {name.split(".")[0] for name in shown}
    heavy = {"worker.cli", "typer", "rich", "sqlalchemy", "pydantic", "pydantic_settings", "db"}
    assert not heavy & loaded, sorted(heavy & loaded)
