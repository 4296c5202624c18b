"""Processes of the benchmarks: process trees, RSS, CPU used by others, timed runs (psutil, no /proc parsing).

Nothing here runs at import: contention is sampled when a run starts and ends (see bench.results).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

#: Command lines of model training or evaluation (CPU contention worth reporting with figures).
HEAVY_PATTERN = re.compile(r"models\.(train|compare|evaluate|robustness|ensemble)|cxr-triage model")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (empty when ``pid`` is gone)."""
    try:
        parent = psutil.Process(pid)
        return [pid, *(child.pid for child in parent.children(recursive=True))]
    except psutil.Error:
        return []


def children(pid: int) -> list[int]:
    """Every process below ``pid``, without ``pid`` itself."""
    return descendants(pid)[1:]


def cmdline(pid: int) -> str:
    """The command line of ``pid`` joined by spaces ("" when gone or not ours to read)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (0 when gone)."""
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0


def group_members(pgid: int) -> list[int]:
    """Processes whose process group is ``pgid`` (orphans of a killed child stay in it)."""
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == pgid:
                members.append(process.pid)
    return members


def alive(pid: int) -> bool:
    """True while ``pid`` runs (zombies count as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def training_running() -> bool:
    """True while model training or evaluation runs on this machine (CPU contention)."""
    for process in psutil.process_iter(["cmdline"]):
        line = " ".join(process.info.get("cmdline") or [])
        if HEAVY_PATTERN.search(line):
            return True
    return False


def under_flock() -> bool:
    """True when this process was started by ``flock`` (the heavy-work lock)."""
    try:
        return psutil.Process().parent().name() == "flock"
    except (psutil.Error, AttributeError):
        return False


class CpuOfOthers:
    """CPU time used by processes outside this one's tree between :meth:`start` and :meth:`cores`.

    ``start`` only takes a snapshot (no sleep), so parsing arguments costs nothing; the figure
    then covers the whole run.
    """

    def __init__(self) -> None:
        self._before: dict[int, tuple[float, str]] = {}
        self._started = 0.0

    @staticmethod
    def _snapshot() -> dict[int, tuple[float, str]]:
        ours = set(descendants(os.getpid()))
        found = {}
        for process in psutil.process_iter(["name", "cpu_times"]):
            times = process.info.get("cpu_times")
            if process.pid in ours or times is None:
                continue
            found[process.pid] = (times.user + times.system, process.info.get("name") or "?")
        return found

    def start(self) -> CpuOfOthers:
        self._before, self._started = self._snapshot(), time.monotonic()
        return self

    def cores(self) -> tuple[float, list[str]]:
        """(cores used by others on average since ``start``, the top four users)."""
        seconds = max(time.monotonic() - self._started, 1e-3)
        users = []
        for pid, (used, name) in self._snapshot().items():
            if pid in self._before:
                share = (used - self._before[pid][0]) / seconds
                if share > 0.02:
                    users.append((share, pid, name))
        users.sort(reverse=True)
        total = sum(u[0] for u in users)
        return total, [f"{name} (pid {pid}) {100 * share:.0f} %" for share, pid, name in users[:4]]


def other_cpu_load(seconds: float = 2.0) -> tuple[float, list[str]]:
    """CPU used by processes outside this one's tree over the next ``seconds``: (cores, top users)."""
    sampler = CpuOfOthers().start()
    time.sleep(seconds)
    return sampler.cores()


@dataclass
class RssSample:
    t: float
    main: int
    tree: int
    extra: object = None


@dataclass
class RssPoller:
    """Polls the RSS of a process (``main``) and of its whole tree in a thread."""

    pid: int
    interval: float = 0.2
    probe: Callable[[], object] | None = None
    samples: list[RssSample] = field(default_factory=list)
    #: The process of interest is the first child of ``pid`` (``pid`` is a wrapper such as /usr/bin/time).
    main_is_child: bool = False

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            pids = descendants(self.pid)
            main_pid = (pids[1] if len(pids) > 1 else 0) if self.main_is_child else self.pid
            main = rss_bytes(main_pid) if main_pid else 0
            tree = sum(rss_bytes(p) for p in pids)
            extra = self.probe() if self.probe else None
            if main:
                self.samples.append(RssSample(time.monotonic() - start, main, tree, extra))
            self._stop.wait(self.interval)

    def start(self) -> RssPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak_main(self) -> int:
        return max((s.main for s in self.samples), default=0)

    @property
    def peak_tree(self) -> int:
        return max((s.tree for s in self.samples), default=0)


def mib(n: float) -> str:
    return f"{n / 1024 / 1024:.0f} MiB"


@dataclass
class Timed:
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    peak_main: int = 0
    peak_tree: int = 0
    max_rss_time_v: int = 0

    def exit_if_failed(self, what: str) -> None:
        """End the benchmark, with the tail of the run's stderr, when the run failed."""
        if self.returncode != 0:
            sys.stderr.write(self.stderr[-3000:])
            raise SystemExit(f"{what} failed with code {self.returncode}")


def run_timed(
    cmd: list[str], *, env: dict | None = None, poll_rss: bool = False, time_v: bool = False
) -> Timed:
    """Run ``cmd`` to completion, timing its wall clock; optionally poll RSS and use /usr/bin/time -v."""
    full = (["/usr/bin/time", "-v"] + cmd) if time_v else cmd
    environ = dict(os.environ, **(env or {}))
    started = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
    poller = RssPoller(proc.pid, main_is_child=time_v).start() if poll_rss else None
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if poller:
        poller.stop()
    max_rss = 0
    if time_v:
        for line in stderr.splitlines():
            if "Maximum resident set size" in line:
                max_rss = int(line.split(":")[1]) * 1024
    return Timed(
        seconds,
        proc.returncode,
        stdout,
        stderr,
        poller.peak_main if poller else 0,
        poller.peak_tree if poller else 0,
        max_rss,
    )


def terminate(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM a process we started, then SIGKILL it (and only its own descendants) if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in reversed(descendants(proc.pid)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_port(port: int, timeout: float = 20.0) -> bool:
    """Until something accepts connections on 127.0.0.1:``port``, or ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False
