"""DecodePool waits: a dead decode child or a hung one is noticed while waiting (issue 13)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import TimeoutError
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest

from worker.scoring.decode_pool import DecodePool


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
        "    from worker.scoring.decode_pool import DecodePool\n"
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
    assert "worker.scoring.prepare" in shown  # the probe ran in a decode process
    loaded = set(shown) | {name.split(".")[0] for name in shown}
    heavy = {"worker.cli.app", "typer", "rich", "sqlalchemy", "pydantic", "pydantic_settings", "db"}
    assert not heavy & loaded, sorted(heavy & loaded)


class _MarksTeardown:
    """Writes a file when the interpreter tears its modules down (a module global's finaliser)."""

    def __init__(self, marker: str) -> None:
        # Kept on the object: teardown clears module globals (``os`` among them) before finalising.
        self._write, self._fd = os.write, os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def __del__(self) -> None:
        self._write(self._fd, b"torn down")


_KEPT: list[_MarksTeardown] = []


def _leave_unflushed_text_and_a_finaliser(stderr_file: str, marker: str) -> int:
    """Run in a decode child: text left in stderr's buffer, and an object only teardown finalises."""
    import sys

    sys.stderr = open(stderr_file, "w", buffering=1 << 16)  # noqa: SIM115 - the exit hook flushes it
    sys.stderr.write("written before exit")
    _KEPT.append(_MarksTeardown(marker))
    return os.getpid()


def test_decode_children_exit_without_teardown_and_keep_what_they_wrote(tmp_path):
    """Issue 13: a scan ends by waiting for its decode children to exit; their interpreter teardown is
    skipped (exit_without_teardown), but what they wrote is flushed and the exit status is 0. (The
    standard streams are also flushed by multiprocessing's own bootstrap; the hook covers logging's.)"""
    stderr_file, marker = str(tmp_path / "stderr.txt"), str(tmp_path / "teardown.txt")
    pool = DecodePool(1).start()
    pid = pool._pool().submit(_leave_unflushed_text_and_a_finaliser, stderr_file, marker).result(60)  # noqa: SLF001
    child = next(p for p in pool._executor._processes.values() if p.pid == pid)  # noqa: SLF001
    pool.close()
    assert child.exitcode == 0
    assert Path(stderr_file).read_text() == "written before exit"
    assert Path(marker).read_text() == "", "the child's interpreter was torn down"
