"""unambiguous stored paths

Until this revision a file name that was valid UTF-8 was stored as it was, even with
backslashes in it, while an undecodable name was stored with ``\\xNN`` escapes: the
literal name ``a\\xff`` and the byte name ``a<0xff>`` were the same text. From now on
every stored text with a backslash is escaped (``db/paths.py``), so the old rows with a
literal backslash get theirs doubled.

An old row is read as escaped when its escapes are well formed and decode to bytes that
are not UTF-8 (the only names the old code escaped), unless only its literal name exists
on disk. Everything here is frozen at this revision on purpose (no import of db.paths; only
``db.utf8``'s test of valid UTF-8, which is the codec's own definition).

Create Date: 2026-11-23 02:10:00
"""

import os
import re

import sqlalchemy as sa
from alembic import op

from db.utf8 import is_utf8

revision = "0004a"
down_revision = "0003"

_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")
_paths = sa.table("source_files", sa.column("id", sa.Integer), sa.column("path", sa.Text))


def _unescape(stored: str) -> bytes | None:
    out, position = bytearray(), 0
    for escape in _ESCAPE.finditer(stored):
        if "\\" in stored[position : escape.start()]:
            return None
        out += stored[position : escape.start()].encode("utf-8")
        token = escape.group(1)
        out += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        position = escape.end()
    if "\\" in stored[position:]:
        return None
    return bytes(out + stored[position:].encode("utf-8"))


def _was_escaped(stored: str) -> bool:
    raw = _unescape(stored)
    if raw is None or is_utf8(raw):
        return False
    return not (os.path.lexists(stored) and not os.path.lexists(raw))


def _rows(connection):
    return connection.execute(
        sa.select(_paths.c.id, _paths.c.path).where(_paths.c.path.contains("\\", autoescape=True))
    )


def upgrade() -> None:
    connection = op.get_bind()
    for row_id, stored in list(_rows(connection)):
        if not _was_escaped(stored):
            connection.execute(
                _paths.update().where(_paths.c.id == row_id).values(path=stored.replace("\\", "\\\\"))
            )


def downgrade() -> None:
    connection = op.get_bind()
    for row_id, stored in list(_rows(connection)):
        raw = _unescape(stored)
        if raw is not None and is_utf8(raw):
            connection.execute(_paths.update().where(_paths.c.id == row_id).values(path=raw.decode("utf-8")))
