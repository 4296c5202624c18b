"""The terminal worklist (issue 27): one line per film in 80 columns, short hashes that `review` takes,
names cut with an ellipsis, 50 rows unless told otherwise with a line saying how many more; JSON and
CSV stay complete."""

from __future__ import annotations

import hashlib
import json
import re

from db import queue
from db.engine import session_scope
from db.queue import FileSeen
from tests.conftest import score_record
from tests.web_helpers import cli

FILMS = 60
LONG = "a-very-long-folder-name-from-the-modality/" * 3


def _site(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    assert cli("db", "upgrade", "--database-url", url).returncode == 0
    with session_scope(url) as session:
        for n in range(FILMS):
            path = f"/drop/{LONG}film-{n:03d}-with-a-long-descriptive-file-name.png"
            sha = hashlib.sha256(f"film {n}".encode()).hexdigest()
            image_id, _ = queue.register(session, FileSeen(path, 1000 + n, n), sha)
            queue.record_score(session, image_id, score_record(n / FILMS))
    return url


def test_the_table_fits_80_columns_and_says_how_many_more(tmp_path):
    url = _site(tmp_path)
    table = cli("worklist", "--database-url", url, env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    lines = table.stdout.rstrip("\n").splitlines()
    assert all(len(line) <= 80 for line in lines), max(lines, key=len)
    body = lines[1:]
    assert len(body) == 50, "50 rows by default"
    assert all(re.match(r"^[0-9a-f]{8}  ", line) for line in body), "each line starts with a short sha"
    assert all(line.endswith("\u2026") and "film-" in line for line in body), (
        "the file named, cut with an ellipsis"
    )
    assert f"{FILMS - 50} more: --limit / --format json" in table.stderr
    short = body[0][:8]
    assert cli("review", short, "--database-url", url).returncode == 0, "review takes the short sha"

    everything = cli("worklist", "--database-url", url, "--limit", "100")
    assert len(everything.stdout.strip().splitlines()) == 1 + FILMS and "more:" not in everything.stderr
    assert len(json.loads(cli("worklist", "--format", "json", "--database-url", url).stdout)) == FILMS
    csv_lines = cli("worklist", "--format", "csv", "--database-url", url).stdout.strip().splitlines()
    assert len(csv_lines) == 1 + FILMS
