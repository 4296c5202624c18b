"""What the migrations share: a column list written as a small table, and a table created or dropped
together with its plain indexes, the way Alembic's autogenerate wrote them.

These helpers are part of applied history: every revision that uses them emits what they emit. Change
nothing here that changes a statement (``tests/test_db.py`` upgrades and downgrades every revision on
SQLite and PostgreSQL); a new need is a new helper.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import sqlalchemy as sa

_TYPES = {
    "integer": sa.Integer,
    "bigint": sa.BigInteger,
    "float": sa.Float,
    "boolean": sa.Boolean,
    "text": sa.Text,
    "timestamp": lambda: sa.DateTime(timezone=True),
}
_COLUMN = re.compile(r"(?P<name>\w+)\s+(?P<kind>\w+)(?:\((?P<length>\d+)\))?\s+(?P<null>not null|null)")


def columns(spec: str) -> list[sa.Column]:
    """The columns of ``spec``, in order: one per line, ``name type null`` or ``name type not null``.

    Types: ``integer``, ``bigint``, ``float``, ``boolean``, ``text``, ``string(N)``
    (``VARCHAR(N)``) and ``timestamp`` (``DateTime(timezone=True)``).
    """
    made = []
    for line in filter(None, (line.strip() for line in spec.splitlines())):
        match = _COLUMN.fullmatch(line)
        if match is None or (match["kind"] == "string") != (match["length"] is not None):
            raise ValueError(f"not a column line: {line!r}")
        kind = sa.String(length=int(match["length"])) if match["length"] else _TYPES[match["kind"]]()
        made.append(sa.Column(match["name"], kind, nullable=match["null"] == "null"))
    return made


def create_table(op, name: str, spec: str, *constraints, indexed: Sequence[str] = ()) -> None:
    """``op.create_table`` with the columns of ``spec``, then an index ``ix_<name>_<column>`` on each of
    the ``indexed`` columns."""
    op.create_table(name, *columns(spec), *constraints)
    if indexed:
        with op.batch_alter_table(name, schema=None) as batch_op:
            for column in indexed:
                batch_op.create_index(batch_op.f(f"ix_{name}_{column}"), [column], unique=False)


def drop_table(op, name: str, indexed: Sequence[str] = ()) -> None:
    """The reverse of :func:`create_table`: its indexes (last first), then the table."""
    if indexed:
        with op.batch_alter_table(name, schema=None) as batch_op:
            for column in reversed(indexed):
                batch_op.drop_index(batch_op.f(f"ix_{name}_{column}"))
    op.drop_table(name)
