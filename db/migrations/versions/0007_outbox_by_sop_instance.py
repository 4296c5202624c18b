"""outbox keyed by the film's SOP Instance UID: ``outbox.source_sop_uid`` and its unique index

Create Date: 2026-12-03 07:00:00

For DICOM the SOP Instance UID identifies the instance (PS3.3 C.12.1.1.1): the same instance received
twice (another transfer syntax, so other bytes and another content hash) is one film and gets one
result per model version, destination and kind. ``uq_outbox_instance`` holds that; rows of films
without a SOP Instance UID (NULL) stay keyed by ``uq_outbox_once`` (image, model, destination, kind).

Existing rows: the oldest row of each (instance, model, destination, kind) takes the key; any later
one (a second SR already made for the same instance) keeps NULL and stays as it is.
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_outbox_by_sop_instance"
down_revision = "0006_sites"

INDEX = ("uq_outbox_instance", "outbox", ["source_sop_uid", "model_version", "destination", "kind"])


def upgrade() -> None:
    op.add_column("outbox", sa.Column("source_sop_uid", sa.String(length=128), nullable=True))
    op.execute(
        """
        UPDATE outbox SET source_sop_uid = (SELECT i.sop_uid FROM images i WHERE i.id = outbox.image_id)
        WHERE outbox.id = (
            SELECT min(o.id) FROM outbox o JOIN images i ON i.id = o.image_id
            WHERE i.sop_uid = (SELECT i2.sop_uid FROM images i2 WHERE i2.id = outbox.image_id)
              AND o.model_version = outbox.model_version
              AND o.destination = outbox.destination
              AND o.kind = outbox.kind
        )
        """
    )
    name, table, columns = INDEX
    op.create_index(name, table, columns, unique=True)


def downgrade() -> None:
    name, table, _ = INDEX
    op.drop_index(name, table_name=table)
    with op.batch_alter_table("outbox") as batch_op:
        batch_op.drop_column("source_sop_uid")
