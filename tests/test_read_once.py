"""Issue 13: scoring in this process, each new file is read once, for its registration hash and its
decode alike (``DecodePool.predecode``), and the scanner's rules for what it reads still hold."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.hashing import sha256_file
from tests.conftest import copy_into, kermany_files
from worker.scoring.decode_pool import DecodePool
from worker.scoring.prepare import prepare


@pytest.fixture
def drop(kermany, tmp_path) -> list[Path]:
    return copy_into(
        kermany_files(kermany, "NORMAL", 2) + kermany_files(kermany, "PNEUMONIA", 3), tmp_path / "drop"
    )


def test_one_read_gives_the_registration_hash_and_the_decode(drop, tmp_path):
    fifo = tmp_path / "drop" / "fifo.jpeg"
    os.mkfifo(fifo)
    link = tmp_path / "drop" / "link.jpeg"
    link.symlink_to(drop[0])
    paths = [str(p) for p in drop] + [str(fifo), str(link)]
    with DecodePool(1) as pool:
        predecoded = pool.predecode(paths, 128)
        digests = predecoded.hasher(paths)
    assert digests[: len(drop)] == [sha256_file(p) for p in drop]
    assert digests[len(drop) :] == [None, None]  # a FIFO, and a symlink not followed: never read
    assert sorted(predecoded.prepared) == sorted(str(p) for p in drop)
    for path in drop:
        once = predecoded.prepared[str(path)]
        again = prepare(str(path), 128)  # the processor's own decode of a registered file
        assert once.sha256 == again.sha256
        np.testing.assert_array_equal(once.tensor, again.tensor)


def test_a_decoder_death_while_reading_falls_back_to_hashing(drop):
    """Files whose read did not finish are hashed on their own: every file is still registered (and
    decoded later, where a file that kills its decoder is isolated and failed)."""
    paths = [str(p) for p in drop]
    with DecodePool(2) as pool:
        pool.hash_many(paths[:1])  # start the children
        predecoded = pool.predecode(paths, 128)
        for process in list(pool._executor._processes.values()):  # noqa: SLF001 - simulate a crash
            os.kill(process.pid, signal.SIGKILL)
        digests = predecoded.hasher(paths)
    assert digests == [sha256_file(p) for p in paths]
    assert all(p.sha256 == sha256_file(path) for path, p in predecoded.prepared.items())


def test_an_embedded_scan_reads_each_new_file_once(drop, model_dir, tmp_path, monkeypatch):
    from db.migrate import upgrade
    from worker.queue.embedded import scan_embedded
    from worker.settings import Settings

    reads: Counter = Counter()
    for name in ("predecode", "hash_many", "submit"):
        original = getattr(DecodePool, name)

        def counted(self, items, *args, _original=original, _name=name, **kwargs):
            reads[_name] += len(items)
            return _original(self, items, *args, **kwargs)

        monkeypatch.setattr(DecodePool, name, counted)
    url = f"sqlite:///{tmp_path / 'once.sqlite3'}"
    upgrade(url)
    settings = Settings(database_url=url, model_dir=model_dir, batch_size=2, decode_workers=1)
    summary = scan_embedded(settings, [str(tmp_path / "drop")])
    assert summary.outcomes["scored"] == len(drop)
    assert reads == {"predecode": len(drop)}  # no second hash, no second decode
    reads.clear()
    again = scan_embedded(settings, [str(tmp_path / "drop")])
    assert again.skipped == len(drop) and sum(reads.values()) == 0  # known files: nothing is read
