"""initial schema

Create Date: 2026-11-22 05:22:22.509854
"""

import sqlalchemy as sa
from alembic import op

from db.migrations._helpers import create_table, drop_table

revision = "0001"
down_revision = None


def upgrade() -> None:
    create_table(
        op,
        "images",
        """
        id                  integer      not null
        sha256              string(64)   not null
        status              string(16)   not null
        reason              text         null
        attempts            integer      not null
        lease_expires_at    timestamp    null
        size_bytes          bigint       not null
        source_format       string(16)   null
        study_uid           string(128)  null
        series_uid          string(128)  null
        sop_uid             string(128)  null
        accession_number    string(64)   null
        patient_id          string(128)  null
        patient_name        string(256)  null
        patient_age_years   float        null
        modality            string(16)   null
        view_position       string(16)   null
        out_of_scope        boolean      not null
        scope_note          text         null
        first_seen_at       timestamp    not null
        updated_at          timestamp    not null
        finished_at         timestamp    null
        reviewed_at         timestamp    null
        reviewed_by         string(128)  null
        """,
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("sha256"),
        indexed=("status",),
    )
    op.create_index("ix_images_status_lease", "images", ["status", "lease_expires_at"], unique=False)
    create_table(
        op,
        "scores",
        """
        id                          integer      not null
        image_id                    integer      not null
        model_version               string(128)  not null
        pneumonia_probability       float        not null
        pneumonia_logit             float        not null
        viral_probability           float        null
        screening_threshold         float        not null
        high_confidence_threshold   float        not null
        screening_positive          boolean      not null
        high_confidence_positive    boolean      not null
        created_at                  timestamp    not null
        """,
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("image_id", "model_version", name="uq_scores_image_model"),
    )
    create_table(
        op,
        "source_files",
        """
        id              integer      not null
        path            text         not null
        image_id        integer      null
        size_bytes      bigint       not null
        mtime_ns        bigint       not null
        seen_at         timestamp    not null
        """,
        sa.ForeignKeyConstraint(["image_id"], ["images.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("path"),
        indexed=("image_id",),
    )


def downgrade() -> None:
    drop_table(op, "source_files", indexed=("image_id",))
    drop_table(op, "scores")
    op.drop_index("ix_images_status_lease", table_name="images")
    drop_table(op, "images", indexed=("status",))
