"""shared schema for issues 9-12

Create Date: 2026-11-23 01:29:26.489689
"""

import sqlalchemy as sa
from alembic import op

from db.migrations._helpers import create_table, drop_table

revision = "0003"
down_revision = "0002"

#: The tables this revision adds, in the order it creates them, with their indexed columns.
_INDEXED = {
    "audit_log": ("at",),
    "calibrations": ("model_version",),
    "users": (),
    "outbox": ("status",),
    "reviews": ("image_id",),
}


def upgrade() -> None:
    create_table(
        op,
        "audit_log",
        """
        id          integer      not null
        at          timestamp    not null
        username    string(64)   null
        action      string(32)   not null
        image_id    integer      null
        detail      text         null
        """,
        sa.PrimaryKeyConstraint("id"),
        indexed=_INDEXED["audit_log"],
    )
    create_table(
        op,
        "calibrations",
        """
        id                          integer      not null
        name                        string(64)   not null
        model_version               string(128)  not null
        screening_threshold         float        not null
        high_confidence_threshold   float        not null
        temperature                 float        null
        active                      boolean      not null
        source                      string(16)   not null
        sample_size                 integer      not null
        positives                   integer      not null
        target_sensitivity          float        null
        target_specificity          float        null
        details                     text         null
        created_at                  timestamp    not null
        """,
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_version", "name", name="uq_calibrations_model_name"),
        indexed=_INDEXED["calibrations"],
    )
    create_table(
        op,
        "users",
        """
        id              integer      not null
        username        string(64)   not null
        password_hash   text         not null
        role            string(16)   not null
        created_at      timestamp    not null
        """,
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("username"),
        indexed=_INDEXED["users"],
    )
    create_table(
        op,
        "outbox",
        """
        id                  integer      not null
        image_id            integer      not null
        model_version       string(128)  not null
        destination         string(255)  not null
        kind                string(8)    not null
        status              string(16)   not null
        attempts            integer      not null
        next_attempt_at     timestamp    null
        last_error          text         null
        sop_instance_uid    string(64)   null
        created_at          timestamp    not null
        sent_at             timestamp    null
        """,
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "model_version", "destination", "kind", name="uq_outbox_once"),
        indexed=_INDEXED["outbox"],
    )
    create_table(
        op,
        "reviews",
        """
        id              integer      not null
        image_id        integer      not null
        username        string(64)   not null
        decision        string(16)   not null
        reader_label    string(16)   not null
        note            text         null
        model_version   string(128)  null
        score           float        null
        created_at      timestamp    not null
        """,
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        indexed=_INDEXED["reviews"],
    )
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column(
            "lease_owner",
            existing_type=sa.VARCHAR(length=64),
            type_=sa.String(length=255),
            existing_nullable=True,
        )


def downgrade() -> None:
    with op.batch_alter_table("images", schema=None) as batch_op:
        batch_op.alter_column(
            "lease_owner",
            existing_type=sa.String(length=255),
            type_=sa.VARCHAR(length=64),
            existing_nullable=True,
        )
        batch_op.drop_column("sent_at")

    for name, indexed in reversed(_INDEXED.items()):
        drop_table(op, name, indexed)
