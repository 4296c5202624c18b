"""the triage worklist as a database view; indexes for its order and filters; append-only audit log

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23 01:45:00

``triage_worklist_all`` has one row per film with every column of ``cxr-triage worklist --format
json`` and ``worklist_rank`` (ascending = most urgent first); ``triage_worklist`` is the same without
``superseded`` films (nobody can open them). The aging rule (README, db/worklist.py) is computed in
SQL, so psql, a BI tool or Grafana sees the same list, and pages are cut in the database.

The SQL is frozen here on purpose (a migration is a snapshot): a later change of the rule is a new
migration that replaces the views.
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: Per-dialect pieces of the view. ``{x}`` is substituted with an SQL expression.
_DIALECT = {
    "sqlite": {
        "days": "(julianday({x}) - 2440587.5)",
        "now_days": "(julianday('now') - 2440587.5)",
        "round2": "round({x}, 2)",
        "round4": "round({x}, 4)",
        "clamp_exp": "exp(min(max({x}, -700.0), 700.0))",
        "at_least_zero": "max({x}, 0.0)",
        "paths": "(SELECT json_group_array(p.path) FROM (SELECT sf.path FROM source_files sf "
        "WHERE sf.image_id = i.id ORDER BY sf.id) p)",
    },
    "postgresql": {
        "days": "(extract(epoch FROM {x}) / 86400.0)",
        "now_days": "(extract(epoch FROM now()) / 86400.0)",
        "round2": "round(({x})::numeric, 2)::double precision",
        "round4": "round(({x})::numeric, 4)::double precision",
        "clamp_exp": "exp(least(greatest({x}, -700.0), 700.0))",
        "at_least_zero": "greatest({x}, 0.0)",
        "paths": "coalesce((SELECT json_agg(sf.path ORDER BY sf.id) FROM source_files sf "
        "WHERE sf.image_id = i.id)::text, '[]')",
    },
}

# Stage 1: each film with its newest score and the active calibration of that score's model version.
_BASE = """
SELECT
    i.id AS image_id, i.sha256, i.status, i.reason, i.out_of_scope, i.scope_note, i.study_uid, i.sop_uid,
    i.accession_number, i.patient_id, i.patient_name, i.patient_age_years, i.modality, i.view_position,
    i.source_format, i.first_seen_at, i.reviewed_at, i.reviewed_by,
    s.id AS score_id, s.model_version, s.viral_probability,
    CASE WHEN c.id IS NULL OR c.temperature IS NULL THEN s.pneumonia_probability
         ELSE 1.0 / (1.0 + {sigmoid_exp}) END AS p,
    CASE WHEN c.id IS NULL THEN s.screening_threshold ELSE c.screening_threshold END AS thr,
    CASE WHEN c.id IS NULL THEN s.high_confidence_threshold ELSE c.high_confidence_threshold END AS hthr,
    CASE WHEN s.id IS NULL THEN NULL WHEN c.id IS NULL THEN 'shipped' ELSE c.name END AS calibration,
    {first_days} AS first_days
FROM images i
LEFT JOIN scores s ON s.image_id = i.id
    AND NOT EXISTS (SELECT 1 FROM scores newer WHERE newer.image_id = s.image_id AND newer.id > s.id)
LEFT JOIN calibrations c ON c.model_version = s.model_version AND c.active
    AND NOT EXISTS (SELECT 1 FROM calibrations later WHERE later.model_version = c.model_version
                    AND later.active AND later.id > c.id)
"""

# Stage 2: tiers, priority (aging rule) and the ordering column.
_VIEW = """
CREATE VIEW triage_worklist_all AS
SELECT
    (SELECT sf.path FROM source_files sf WHERE sf.image_id = b.image_id
     ORDER BY sf.seen_at DESC, sf.id DESC LIMIT 1) AS path,
    {paths} AS paths,
    b.sha256, b.status, b.reason,
    CASE WHEN b.scored THEN {round4_p} END AS score,
    CASE WHEN b.scored THEN b.thr END AS threshold,
    CASE WHEN b.scored THEN b.hthr END AS high_confidence_threshold,
    CASE WHEN b.scored THEN b.p >= b.thr END AS screening_positive,
    CASE WHEN b.scored THEN b.p >= b.hthr END AS high_confidence,
    CASE WHEN b.scored THEN {round4_viral} END AS viral_probability,
    CASE WHEN b.scored AND b.reviewed_at IS NULL
         THEN {round2_priority} END AS priority,
    CASE WHEN b.scored THEN b.model_version END AS model_version,
    b.out_of_scope, b.scope_note, b.study_uid, b.sop_uid, b.accession_number, b.source_format,
    b.first_seen_at, b.reviewed_at,
    CASE WHEN b.scored THEN b.calibration END AS calibration,
    CASE WHEN NOT b.scored THEN NULL WHEN b.p >= b.hthr THEN 'HIGH' WHEN b.p >= b.thr THEN 'screen+'
         ELSE 'below' END AS tier,
    b.patient_id, b.patient_name, b.patient_age_years, b.modality, b.view_position, b.reviewed_by,
    CASE
        WHEN b.status = 'superseded' THEN 4000000.0 + (100000.0 - b.first_days)
        WHEN b.reviewed_at IS NOT NULL THEN 3000000.0 + (100000.0 - {reviewed_days})
        WHEN b.scored THEN 10.0 * b.first_days - {static_priority}
        WHEN b.status = 'scored' THEN 999999.0
        WHEN b.status IN ('failed', 'rejected') THEN 1000000.0 + (100000.0 - b.first_days)
        ELSE 2000000.0 + b.first_days
    END AS worklist_rank
FROM (
    SELECT base.*, (base.status = 'scored' AND base.score_id IS NOT NULL) AS scored FROM ({base}) base
) b
"""

# 100 x P + 100 if screening-positive + 100 more if high-confidence (the aging part is added apart).
_STATIC_PRIORITY = (
    "(100.0 * b.p + CASE WHEN b.p >= b.thr THEN 100.0 ELSE 0.0 END "
    "+ CASE WHEN b.p >= b.hthr THEN 100.0 ELSE 0.0 END)"
)

_INDEXES = (
    ("ix_scores_image_id_id", "scores", ["image_id", "id"]),
    ("ix_source_files_image_seen", "source_files", ["image_id", "seen_at", "id"]),
    ("ix_images_first_seen_at", "images", ["first_seen_at"]),
    ("ix_images_reviewed_at", "images", ["reviewed_at"]),
    ("ix_images_accession_number", "images", ["accession_number"]),
    ("ix_images_patient_id", "images", ["patient_id"]),
    ("ix_calibrations_model_active", "calibrations", ["model_version", "active"]),
)

_APPEND_ONLY_SQLITE = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
)
_APPEND_ONLY_POSTGRESQL = (
    "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$",
    "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
)


def view_sql(dialect: str) -> list[str]:
    """The CREATE VIEW statements for ``dialect`` (sqlite or postgresql)."""
    d = _DIALECT[dialect]
    base = _BASE.format(
        sigmoid_exp=d["clamp_exp"].format(x="-s.pneumonia_logit / c.temperature"),
        first_days=d["days"].format(x="i.first_seen_at"),
    )
    aging = "10.0 * " + d["at_least_zero"].format(x=f"{d['now_days']} - b.first_days")
    full = _VIEW.format(
        base=base,
        paths=d["paths"].replace("i.id", "b.image_id"),
        round4_p=d["round4"].format(x="b.p"),
        round4_viral=d["round4"].format(x="b.viral_probability"),
        round2_priority=d["round2"].format(x=f"{_STATIC_PRIORITY} + {aging}"),
        reviewed_days=d["days"].format(x="b.reviewed_at"),
        static_priority=_STATIC_PRIORITY,
    )
    visible = "CREATE VIEW triage_worklist AS SELECT * FROM triage_worklist_all WHERE status <> 'superseded'"
    return [full, visible]


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns)
    for statement in view_sql(dialect):
        op.execute(sa.text(statement))
    op.create_table(
        "app_secrets",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    for statement in _APPEND_ONLY_POSTGRESQL if dialect == "postgresql" else _APPEND_ONLY_SQLITE:
        op.execute(sa.text(statement))


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS audit_log_append_only ON audit_log")
        op.execute("DROP FUNCTION IF EXISTS audit_log_append_only()")
    else:
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_update")
        op.execute("DROP TRIGGER IF EXISTS audit_log_no_delete")
    op.drop_table("app_secrets")
    op.execute("DROP VIEW IF EXISTS triage_worklist")
    op.execute("DROP VIEW IF EXISTS triage_worklist_all")
    for name, table, _ in _INDEXES:
        op.drop_index(name, table_name=table)
