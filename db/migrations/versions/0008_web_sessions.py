"""web sessions on the server: ``web_sessions`` (hashed random tokens); ``app_secrets`` dropped

Create Date: 2026-12-03 07:00:00

The session cookie used to be signed with a key kept in ``app_secrets``: anyone who could read the
database (a BI tool, ``psql``) could mint an admin session, and a signed cookie could not be revoked.
Sessions are now rows keyed by the SHA-256 of a random token that only the browser holds; signing
out, removing a user and changing a password delete them. Existing cookies stop working (everyone
signs in once more). The downgrade recreates an empty ``app_secrets``; a new key is made on use.
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_web_sessions"
down_revision = "0007_outbox_by_sop_instance"


def upgrade() -> None:
    op.create_table(
        "web_sessions",
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("token_sha256"),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_index("ix_web_sessions_expires_at", "web_sessions", ["expires_at"])
    op.drop_table("app_secrets")


def downgrade() -> None:
    op.create_table(
        "app_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    op.drop_index("ix_web_sessions_expires_at", table_name="web_sessions")
    op.drop_index("ix_web_sessions_user_id", table_name="web_sessions")
    op.drop_table("web_sessions")
