"""Files of the chaos runs: the feeder that drops real Kermany films, and what is on disk at the end."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

from bench.corpus import sha256_of


class Feeder(threading.Thread):
    """Drops ``sources`` into ``drop`` at ``rate`` files/s as ``<tag>_<n>.jpeg``.

    One file in five is written under a ``.part`` name and renamed into place, the rest are copied
    straight in. While the folder is renamed away (``away`` exists instead), files go there.
    """

    def __init__(
        self, drop: Path, sources: list[Path], rate: float, tag: str, away: Path | None = None, burst: int = 1
    ):
        super().__init__(daemon=True)
        self.drop, self.sources, self.rate, self.tag, self.away = drop, sources, rate, tag, away
        self.burst = burst  # files dropped back to back; bursts keep the average rate
        self.dropped: dict[str, float] = {}  # final path (under drop) -> time it was dropped
        self.done = threading.Event()
        self.stop_event = threading.Event()
        self.on_drop = None  # callback(path) for saboteurs

    def run(self) -> None:
        started = time.monotonic()
        for index, source in enumerate(self.sources):
            if self.stop_event.is_set():
                break
            due = started + (index // self.burst) * self.burst / self.rate
            time.sleep(max(0.0, due - time.monotonic()))
            name = f"{self.tag}_{index:05d}.jpeg"
            for _ in range(200):
                folder = (
                    self.drop
                    if self.drop.is_dir()
                    else (self.away if self.away and self.away.is_dir() else None)
                )
                if folder is None:
                    time.sleep(0.05)
                    continue
                try:
                    if index % 5 == 4:
                        shutil.copyfile(source, folder / (name + ".part"))
                        os.rename(folder / (name + ".part"), folder / name)
                    else:
                        shutil.copyfile(source, folder / name)
                    break
                except FileNotFoundError:
                    time.sleep(0.05)  # folder renamed under our feet: write again where it is now
            self.dropped[str(self.drop / name)] = time.monotonic()
            if self.on_drop:
                self.on_drop(self.drop / name)
        self.done.set()


def files_on_disk(drop: Path) -> dict[str, str]:
    from worker.ingest.scanner import is_temporary

    found = {}
    for path in drop.rglob("*"):
        if path.is_file() and not path.is_symlink() and not is_temporary(path.name):
            digest = sha256_of(path)
            if digest is not None:
                found[str(path)] = digest
    return found
