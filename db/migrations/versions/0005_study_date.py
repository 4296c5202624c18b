"""study date: ``images.study_date`` (DICOM StudyDate), its index, and the column in the worklist views

Create Date: 2026-11-23 05:00:00

Readers find a film by the day it was taken; the worklist shows ``study_date`` and filters on a
range of it (``ix_images_study_date``). Films stored before this revision, and PNG/JPEG files, have
none (NULL) until they are scored again.

The views read ``images`` by name, so they and the triggers that read them are dropped around the
change and created again (``db.worklist_sql``; the downgrade inside ``lifted(op, ...)``).
"""

import sqlalchemy as sa
from alembic import op

from db.worklist_sql import STUDY_DATE_INDEX, create_sql, drop_sql, execute, lifted

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    execute(op, drop_sql(dialect))
    op.add_column("images", sa.Column("study_date", sa.Date(), nullable=True))
    name, table, columns = STUDY_DATE_INDEX
    op.create_index(name, table, columns)
    execute(op, create_sql(dialect, study_date=True, site=False))


def downgrade() -> None:
    name, table, _ = STUDY_DATE_INDEX
    op.drop_index(name, table_name=table)
    with lifted(op, study_date=False, site=False):
        # ALTER TABLE ... DROP COLUMN in both (SQLite >= 3.35): no rebuild of ``images`` needed.
        op.execute("ALTER TABLE images DROP COLUMN study_date")
