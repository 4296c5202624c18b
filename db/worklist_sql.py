"""The worklist's SQL objects (views, triggers, indexes) for SQLite and PostgreSQL.

Created by migration 0004; migration 0005 adds ``study_date`` to the views, migration 0006 the film's
``site`` (and each film follows its own site's active calibration). Each migration asks for the
definition of its own revision (``study_date=False, site=False`` is 0004's, ``site=False`` 0005's), so
replaying the history creates no view over a column that does not exist yet.

A later migration that makes SQLite rebuild ``images``, ``scores``,
``calibrations`` or ``source_files`` (Alembic ``batch_alter_table`` with a recreate: changing or
dropping a column) must lift these objects around it, because SQLite refuses to rename a table that
a view depends on and drops a table's triggers with it::

    from db.worklist_sql import lifted

    with lifted(op), op.batch_alter_table("images") as batch:
        batch.alter_column(...)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import sqlalchemy as sa

#: Per-dialect pieces of the view. ``{x}`` is substituted with an SQL expression.
DIALECT = {
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

# Each film with its newest score and the active calibration of that score's model version.
BASE = """
SELECT
    i.id AS image_id, i.status, i.reviewed_at, s.id AS score_id, c.id AS calibration_id,
    CASE WHEN c.id IS NULL OR c.temperature IS NULL THEN s.pneumonia_probability
         ELSE 1.0 / (1.0 + {sigmoid_exp}) END AS p,
    CASE WHEN c.id IS NULL THEN s.screening_threshold ELSE c.screening_threshold END AS thr,
    CASE WHEN c.id IS NULL THEN s.high_confidence_threshold ELSE c.high_confidence_threshold END AS hthr,
    {first_days} AS first_days
FROM images i
LEFT JOIN scores s ON s.image_id = i.id
    AND NOT EXISTS (SELECT 1 FROM scores newer WHERE newer.image_id = s.image_id AND newer.id > s.id)
{calibration_join}
"""

# Before 0006: the active calibration of the score's model version (the newest if several).
CALIBRATION_JOIN_0004 = """LEFT JOIN calibrations c ON c.model_version = s.model_version AND c.active
    AND NOT EXISTS (SELECT 1 FROM calibrations later WHERE later.model_version = c.model_version
                    AND later.active AND later.id > c.id)"""

# From 0006: the active calibration of the film's own site if it has one, else the active
# calibration that applies to every site (``site IS NULL``: the shipped one unless changed).
CALIBRATION_JOIN_SITES = """LEFT JOIN calibrations c ON c.id = (
    SELECT c2.id FROM calibrations c2
    WHERE c2.model_version = s.model_version AND c2.active AND (c2.site = i.site OR c2.site IS NULL)
    ORDER BY CASE WHEN c2.site IS NULL THEN 1 ELSE 0 END, c2.id DESC LIMIT 1)"""

# What ``worklist_order`` stores for each film: the order does not depend on the clock (every film
# ages at the same rate), so it is kept up to date by triggers and read through an index.
SOURCE = """
CREATE VIEW worklist_source AS
SELECT
    b.image_id, b.score_id, b.calibration_id, b.status,
    CASE WHEN NOT b.scored THEN NULL WHEN b.p >= b.hthr THEN 'HIGH' WHEN b.p >= b.thr THEN 'screen+'
         ELSE 'below' END AS tier,
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

# The rows people read: every column of `worklist --format json`, computed for the rows asked for.
VIEW = """
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
    CASE WHEN b.scored AND b.reviewed_at IS NULL THEN {round2_priority} END AS priority,
    CASE WHEN b.scored THEN b.model_version END AS model_version,
    b.out_of_scope, b.scope_note, b.study_uid, b.sop_uid, b.accession_number, {study_date}b.source_format,
    b.first_seen_at, b.reviewed_at,
    CASE WHEN b.scored THEN b.calibration END AS calibration,
    b.tier, b.patient_id, b.patient_name, b.patient_age_years, b.modality, b.view_position, b.reviewed_by,
    {site}b.worklist_rank
FROM (
    SELECT
        o.image_id, o.status, o.tier, o.worklist_rank,
        (o.status = 'scored' AND o.score_id IS NOT NULL) AS scored,
        i.sha256, i.reason, i.out_of_scope, i.scope_note, i.study_uid, i.sop_uid, i.accession_number,
        {i_study_date}i.patient_id, i.patient_name, i.patient_age_years, i.modality, i.view_position,
        i.source_format,
        i.first_seen_at, i.reviewed_at, i.reviewed_by, {i_site}
        s.model_version, s.viral_probability,
        CASE WHEN c.id IS NULL OR c.temperature IS NULL THEN s.pneumonia_probability
             ELSE 1.0 / (1.0 + {sigmoid_exp}) END AS p,
        CASE WHEN c.id IS NULL THEN s.screening_threshold ELSE c.screening_threshold END AS thr,
        CASE WHEN c.id IS NULL THEN s.high_confidence_threshold ELSE c.high_confidence_threshold END AS hthr,
        CASE WHEN c.id IS NULL THEN 'shipped' ELSE c.name END AS calibration,
        {first_days} AS first_days
    FROM worklist_order o
    LEFT JOIN images i ON i.id = o.image_id
    LEFT JOIN scores s ON s.id = o.score_id
    LEFT JOIN calibrations c ON c.id = o.calibration_id
) b
"""

# 100 x P + 100 if screening-positive + 100 more if high-confidence (the aging part is added apart).
STATIC_PRIORITY = (
    "(100.0 * b.p + CASE WHEN b.p >= b.thr THEN 100.0 ELSE 0.0 END "
    "+ CASE WHEN b.p >= b.hthr THEN 100.0 ELSE 0.0 END)"
)

ORDER_COLUMNS = "image_id, score_id, calibration_id, status, tier, worklist_rank"

INDEXES = (
    ("ix_scores_image_id_id", "scores", ["image_id", "id"]),
    ("ix_source_files_image_seen", "source_files", ["image_id", "seen_at", "id"]),
    ("ix_images_first_seen_at", "images", ["first_seen_at"]),
    ("ix_images_reviewed_at", "images", ["reviewed_at"]),
    ("ix_images_accession_number", "images", ["accession_number"]),
    ("ix_images_patient_id", "images", ["patient_id"]),
    ("ix_calibrations_model_active", "calibrations", ["model_version", "active"]),
    ("ix_worklist_order_rank", "worklist_order", ["worklist_rank"]),
    ("ix_worklist_order_tier_rank", "worklist_order", ["tier", "worklist_rank"]),
    ("ix_worklist_order_status_rank", "worklist_order", ["status", "worklist_rank"]),
)

# Triggers keep worklist_order in step with every write, whoever makes it (scan, workers, calibration).
TRIGGERS_SQLITE = (
    "CREATE TRIGGER worklist_order_image_insert AFTER INSERT ON images BEGIN {refresh_new_id}; END",
    "CREATE TRIGGER worklist_order_image_update AFTER UPDATE OF {image_columns} ON images "
    "BEGIN {refresh_new_id}; END",
    "CREATE TRIGGER worklist_order_score_insert AFTER INSERT ON scores BEGIN {refresh_new_image}; END",
    "CREATE TRIGGER worklist_order_score_update AFTER UPDATE ON scores BEGIN {refresh_new_image}; "
    "{refresh_old_image}; END",
    "CREATE TRIGGER worklist_order_score_delete AFTER DELETE ON scores BEGIN {refresh_old_image}; END",
    "CREATE TRIGGER worklist_order_calibration_insert AFTER INSERT ON calibrations BEGIN {refresh_all}; END",
    "CREATE TRIGGER worklist_order_calibration_update AFTER UPDATE ON calibrations BEGIN {refresh_all}; END",
    "CREATE TRIGGER worklist_order_calibration_delete AFTER DELETE ON calibrations BEGIN {refresh_all}; END",
)
SQLITE_REFRESH = (
    f"INSERT OR REPLACE INTO worklist_order ({ORDER_COLUMNS}) SELECT {ORDER_COLUMNS} FROM worklist_source"
)

TRIGGERS_POSTGRESQL = (
    f"""CREATE FUNCTION worklist_order_refresh(film integer) RETURNS void LANGUAGE sql AS $$
        INSERT INTO worklist_order ({ORDER_COLUMNS})
        SELECT {ORDER_COLUMNS} FROM worklist_source WHERE image_id = film
        ON CONFLICT (image_id) DO UPDATE SET score_id = EXCLUDED.score_id,
            calibration_id = EXCLUDED.calibration_id, status = EXCLUDED.status, tier = EXCLUDED.tier,
            worklist_rank = EXCLUDED.worklist_rank
    $$""",
    """CREATE FUNCTION worklist_order_on_image() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM worklist_order_refresh(NEW.id); RETURN NULL; END $$""",
    """CREATE FUNCTION worklist_order_on_score() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP <> 'DELETE' THEN PERFORM worklist_order_refresh(NEW.image_id); END IF;
            IF TG_OP <> 'INSERT' THEN PERFORM worklist_order_refresh(OLD.image_id); END IF;
            RETURN NULL;
        END $$""",
    f"""CREATE FUNCTION worklist_order_on_calibration() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            -- in image order, as workers write, so that the two take row locks in the same order
            INSERT INTO worklist_order ({ORDER_COLUMNS}) SELECT {ORDER_COLUMNS} FROM worklist_source
            ORDER BY image_id
            ON CONFLICT (image_id) DO UPDATE SET score_id = EXCLUDED.score_id,
                calibration_id = EXCLUDED.calibration_id, status = EXCLUDED.status, tier = EXCLUDED.tier,
                worklist_rank = EXCLUDED.worklist_rank
            WHERE (worklist_order.calibration_id, worklist_order.tier, worklist_order.worklist_rank)
                IS DISTINCT FROM (EXCLUDED.calibration_id, EXCLUDED.tier, EXCLUDED.worklist_rank);
            RETURN NULL;
        END $$""",
    "CREATE TRIGGER worklist_order_image AFTER INSERT OR UPDATE OF {image_columns} "
    "ON images FOR EACH ROW EXECUTE FUNCTION worklist_order_on_image()",
    "CREATE TRIGGER worklist_order_score AFTER INSERT OR UPDATE OR DELETE ON scores "
    "FOR EACH ROW EXECUTE FUNCTION worklist_order_on_score()",
    "CREATE TRIGGER worklist_order_calibration AFTER INSERT OR UPDATE OR DELETE ON calibrations "
    "FOR EACH STATEMENT EXECUTE FUNCTION worklist_order_on_calibration()",
)

APPEND_ONLY_SQLITE = (
    "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
    "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log "
    "BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
)
APPEND_ONLY_POSTGRESQL = (
    "CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS "
    "$$ BEGIN RAISE EXCEPTION 'audit_log is append-only'; END $$",
    "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
    "FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only()",
)


#: Migration 0005's index for the study-date range filter.
STUDY_DATE_INDEX = ("ix_images_study_date", "images", ["study_date"])


#: Migration 0006's index: the worklist's and the quality report's site filter.
SITE_INDEX = ("ix_images_site", "images", ["site"])

#: The columns of ``images`` whose change moves a film in the worklist (0006 adds ``site``: a film
#: assigned to another site follows that site's calibration).
IMAGE_COLUMNS = "status, reviewed_at, first_seen_at"


def view_sql(dialect: str, *, study_date: bool = True, site: bool = True) -> list[str]:
    """The CREATE VIEW statements for ``dialect`` (sqlite or postgresql); ``study_date=False,
    site=False``: 0004's; ``site=False``: 0005's."""
    d = DIALECT[dialect]
    sigmoid = d["clamp_exp"].format(x="-s.pneumonia_logit / c.temperature")
    base = BASE.format(
        sigmoid_exp=sigmoid,
        first_days=d["days"].format(x="i.first_seen_at"),
        calibration_join=CALIBRATION_JOIN_SITES if site else CALIBRATION_JOIN_0004,
    )
    source = SOURCE.format(
        base=base, reviewed_days=d["days"].format(x="b.reviewed_at"), static_priority=STATIC_PRIORITY
    )
    aging = "10.0 * " + d["at_least_zero"].format(x=f"{d['now_days']} - b.first_days")
    full = VIEW.format(
        paths=d["paths"].replace("i.id", "b.image_id"),
        round4_p=d["round4"].format(x="b.p"),
        round4_viral=d["round4"].format(x="b.viral_probability"),
        round2_priority=d["round2"].format(x=f"{STATIC_PRIORITY} + {aging}"),
        sigmoid_exp=sigmoid,
        first_days=d["days"].format(x="i.first_seen_at"),
        study_date="b.study_date, " if study_date else "",
        i_study_date="i.study_date, " if study_date else "",
        site="b.site, " if site else "",
        i_site="i.site," if site else "",
    )
    visible = "CREATE VIEW triage_worklist AS SELECT * FROM triage_worklist_all WHERE status <> 'superseded'"
    return [source, full, visible]


def trigger_sql(dialect: str, *, site: bool = True) -> list[str]:
    image_columns = IMAGE_COLUMNS + (", site" if site else "")
    if dialect == "postgresql":
        return [statement.replace("{image_columns}", image_columns) for statement in TRIGGERS_POSTGRESQL]
    pieces = {
        "image_columns": image_columns,
        "refresh_new_id": f"{SQLITE_REFRESH} WHERE image_id = NEW.id",
        "refresh_new_image": f"{SQLITE_REFRESH} WHERE image_id = NEW.image_id",
        "refresh_old_image": f"{SQLITE_REFRESH} WHERE image_id = OLD.image_id",
        "refresh_all": SQLITE_REFRESH,
    }
    return [statement.format(**pieces) for statement in TRIGGERS_SQLITE]


#: The order of (re)creation; views first, as triggers read worklist_source.
VIEWS = ("worklist_source", "triage_worklist_all", "triage_worklist")
POSTGRESQL_TRIGGERS = (
    ("worklist_order_image", "images"),
    ("worklist_order_score", "scores"),
    ("worklist_order_calibration", "calibrations"),
)
POSTGRESQL_FUNCTIONS = (
    "worklist_order_on_image()",
    "worklist_order_on_score()",
    "worklist_order_on_calibration()",
    "worklist_order_refresh(integer)",
)


def refresh_sql() -> str:
    """Recompute every film's row of worklist_order (after the triggers were away)."""
    return (
        f"INSERT INTO worklist_order ({ORDER_COLUMNS}) "
        f"SELECT {ORDER_COLUMNS} FROM worklist_source WHERE true "
        "ON CONFLICT (image_id) DO UPDATE SET score_id = excluded.score_id, "
        "calibration_id = excluded.calibration_id, status = excluded.status, tier = excluded.tier, "
        "worklist_rank = excluded.worklist_rank"
    )


def drop_sql(dialect: str) -> list[str]:
    """Statements removing the views and the worklist_order triggers (not the table or indexes)."""
    statements = []
    if dialect == "postgresql":
        statements += [f"DROP TRIGGER IF EXISTS {name} ON {table}" for name, table in POSTGRESQL_TRIGGERS]
        statements += [f"DROP FUNCTION IF EXISTS {function}" for function in POSTGRESQL_FUNCTIONS]
    else:
        statements += ["DROP TRIGGER IF EXISTS " + statement.split()[2] for statement in TRIGGERS_SQLITE]
    statements += [f"DROP VIEW IF EXISTS {view}" for view in reversed(VIEWS)]
    return statements


def create_sql(dialect: str, *, study_date: bool = True, site: bool = True) -> list[str]:
    """Statements creating the views and triggers, then bringing worklist_order up to date."""
    return (
        view_sql(dialect, study_date=study_date, site=site)
        + trigger_sql(dialect, site=site)
        + [refresh_sql()]
    )


def execute(op, statements: Iterable[str]) -> None:
    """Run each of ``statements`` (from this module) through a migration's ``op``, in order."""
    for statement in statements:
        op.execute(sa.text(statement))


@contextmanager
def lifted(op, *, study_date: bool = True, site: bool = True) -> Iterator[None]:
    """Drop the worklist views and triggers for the duration of a table rebuild, then restore them
    (as of the revision that ``study_date`` and ``site`` name: True from 0005 and 0006 on).

    On SQLite the rebuild drops the old table, which with foreign keys on deletes every row that
    references it (``ON DELETE CASCADE``: all scores and reviews for ``images``). Migrations run with
    them off (db/migrations/env.py); anywhere else this refuses rather than lose the rows.
    """
    bind = op.get_bind()
    dialect = bind.dialect.name
    if dialect == "sqlite" and bind.exec_driver_sql("PRAGMA foreign_keys").scalar():
        raise RuntimeError("SQLite foreign keys are on: a table rebuild would delete the rows referencing it")
    execute(op, drop_sql(dialect))
    yield
    execute(op, create_sql(dialect, study_date=study_date, site=site))
