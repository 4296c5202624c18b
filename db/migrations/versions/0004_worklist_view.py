"""the triage worklist as a database view; indexes for its order and filters; append-only audit log

Create Date: 2026-11-23 01:45:00

``triage_worklist_all`` has one row per film with every column of ``cxr-triage worklist --format
json`` and ``worklist_rank`` (ascending = most urgent first); ``triage_worklist`` is the same without
``superseded`` films (nobody can open them). The aging rule (README, db/worklist.py) is computed in
SQL, so psql, a BI tool or Grafana sees the same list, and pages are cut in the database.

Because every film ages at the same rate, the order does not depend on the clock: each film's
``worklist_rank`` (and tier, newest score, calibration in force) is stored in ``worklist_order``,
which triggers on ``images``, ``scores`` and ``calibrations`` keep current whoever writes (scan,
workers, calibration). The first page is then an index scan, not a sort of every film; only
``priority``'s aging term is computed at read time.

The SQL lives in :mod:`db.worklist_sql`, which also gives later migrations ``lifted(op)`` to wrap a
SQLite table rebuild (SQLite refuses to rename a table that a view depends on). A later change of
the rule is a new migration that replaces the views.
"""

import sqlalchemy as sa
from alembic import op

from db.worklist_sql import (
    APPEND_ONLY_POSTGRESQL,
    APPEND_ONLY_SQLITE,
    INDEXES,
    create_sql,
    drop_sql,
    execute,
)

revision = "0004"
down_revision = "0004a"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.create_table(
        "worklist_order",
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("score_id", sa.Integer(), nullable=True),
        sa.Column("calibration_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("tier", sa.String(length=8), nullable=True),
        sa.Column("worklist_rank", sa.Float(), nullable=False),
    )
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns)
    if dialect == "postgresql":  # folder filter: LIKE 'prefix%' as an index range whatever the collation
        op.execute("CREATE INDEX ix_source_files_path_prefix ON source_files (path text_pattern_ops)")
    execute(op, create_sql(dialect, study_date=False, site=False))  # the views as of this revision
    op.create_table(
        "app_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    execute(op, APPEND_ONLY_POSTGRESQL if dialect == "postgresql" else APPEND_ONLY_SQLITE)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    execute(op, drop_sql(dialect))
    op.drop_table("app_secrets")
    op.execute("DROP INDEX IF EXISTS ix_source_files_path_prefix")
    for name, table, _ in INDEXES:
        op.drop_index(name, table_name=table)
    op.drop_table("worklist_order")
