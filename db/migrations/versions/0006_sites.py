"""sites: ``sites`` and ``site_sources``, each film's ``images.site``, per-site ``calibrations.site``

Create Date: 2026-12-03 07:00:00

A hospital group runs one installation for several sites. A film records the site it came from
when it is registered (db/sites.py resolves it from the path). No source exists before this
revision, so every existing film starts at ``default``; ``cxr-triage sites add`` then moves the
``default`` films whose first path its sources cover (``db.sites.assign_existing``).
A calibration with a ``site`` applies to that site's films; NULL (every calibration before this
revision) to every site without an active calibration of its own.

The views read ``images`` and ``calibrations`` by name, so they and their triggers are dropped
around the change and created again with the film's site (``db.worklist_sql``).
"""

import sqlalchemy as sa
from alembic import op

from db.worklist_sql import SITE_INDEX, create_sql, drop_sql, execute, lifted

revision = "0006_sites"
down_revision = "0005"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    execute(op, drop_sql(dialect))
    op.create_table(
        "sites",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.create_table(
        "site_sources",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column(
            "site", sa.String(length=64), sa.ForeignKey("sites.name", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("kind", "value", name="uq_site_sources_kind_value"),
    )
    op.create_index("ix_site_sources_site", "site_sources", ["site"])
    op.add_column("images", sa.Column("site", sa.String(length=64), nullable=False, server_default="default"))
    name, table, columns = SITE_INDEX
    op.create_index(name, table, columns)
    op.add_column("calibrations", sa.Column("site", sa.String(length=64), nullable=True))
    op.create_index("ix_calibrations_model_site", "calibrations", ["model_version", "site"])
    execute(op, create_sql(dialect, study_date=True, site=True))


def downgrade() -> None:
    op.drop_index("ix_calibrations_model_site", table_name="calibrations")
    name, table, _ = SITE_INDEX
    op.drop_index(name, table_name=table)
    with lifted(op, study_date=True, site=False):
        # ALTER TABLE ... DROP COLUMN in both (SQLite >= 3.35): no table rebuild needed.
        op.execute("ALTER TABLE images DROP COLUMN site")
        op.execute("ALTER TABLE calibrations DROP COLUMN site")
    op.drop_index("ix_site_sources_site", table_name="site_sources")
    op.drop_table("site_sources")
    op.drop_table("sites")
