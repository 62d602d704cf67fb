"""Questions to the scores dataset `<scores>/run_date=YYYY-MM-DD/*.parquet`, local or s3://.

Everything goes through DuckDB over the view `scores`: the Parquet files plus the Hive partition column
`run_date` (a DATE). Only the nights asked for are read: query() points the view at their directories, and in SQL
a condition on run_date makes DuckDB skip the other nights' files (binding the view reads one file footer, for
the schema). For s3:// the filesystem of storage.fsspec_fs is registered with DuckDB: its httpfs extension would
be downloaded at run time, and no extension is ever loaded here. Results are Arrow tables, never pandas frames.

runs() is the view over the nights' run summaries (`_summary.json`): one row per finished night with its counts and
its drift figures (melanoma/drift.py), read from the summaries, not from the rows.

RECIPES holds the SQL for the everyday questions (`melanoma query SCORES --sql "..."`; the table is `scores`).

With an outcome store (melanoma/outcomes.py) the connection also has the table `outcomes` and the view `confirmed`:
one row per scored image (per night and model version) with a confirmed diagnosis, matched by sha256 when the
outcome names one, else by image_id; rows that could not be scored are left out.
"""

from __future__ import annotations

import datetime as dt
import io
import json

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs

from melanoma import layout, metrics, outcomes, storage
from melanoma.errors import MelanomaError
from melanoma.config import CLASS_NAMES
from melanoma.layout import PARTITION

FORMATS = ("table", "csv", "json")

# Fill in the {placeholders} with str.format.
RECIPES = {
    "riskiest": (
        "SELECT image_id, melanoma_risk, predicted_class, image_uri FROM scores "
        "WHERE run_date = '{date}' AND error IS NULL ORDER BY melanoma_risk DESC LIMIT {n}"
    ),
    "flagged_per_night": (
        "SELECT run_date, count(*) FILTER (WHERE flagged) AS flagged, count(*) AS images FROM scores "
        "GROUP BY run_date ORDER BY run_date"
    ),
    "errors": "SELECT run_date, image_uri, error FROM scores WHERE error IS NOT NULL ORDER BY run_date, image_uri",
    "class_distribution": (
        "SELECT predicted_class, count(*) AS images FROM scores WHERE error IS NULL "
        "GROUP BY predicted_class ORDER BY images DESC, predicted_class"
    ),
    # The same image bytes scored by two model versions (on any nights), biggest disagreement first.
    "two_models": (
        "SELECT a.image_id, a.sha256, a.melanoma_risk AS risk_a, b.melanoma_risk AS risk_b, "
        "a.flagged AS flagged_a, b.flagged AS flagged_b, a.predicted_class AS class_a, b.predicted_class AS class_b, "
        "a.run_date AS run_date_a, b.run_date AS run_date_b "
        "FROM scores a JOIN scores b ON a.sha256 = b.sha256 "
        "WHERE a.model_version = '{version_a}' AND b.model_version = '{version_b}' AND a.error IS NULL AND b.error IS NULL "
        "ORDER BY abs(a.melanoma_risk - b.melanoma_risk) DESC, a.image_id"
    ),
    # Needs outcomes (the view `confirmed`): confirmed melanomas the alert did not flag, newest night first.
    "missed_melanomas": (
        "SELECT run_date, image_id, melanoma_risk, predicted_class, diagnosis, confirmed_on, note, model_version, image_uri "
        "FROM confirmed WHERE confirmed_melanoma AND NOT flagged ORDER BY run_date DESC, melanoma_risk DESC, image_uri"
    ),
}

# Scored rows joined with the outcomes: by sha256 where the outcome has one, else by image_id (two equi-joins, so
# DuckDB hashes them); a scored row matched twice keeps its sha256 match.
CONFIRMED_VIEW = """CREATE VIEW confirmed AS
SELECT s.run_date, s.model_version, s.image_id, s.image_uri, s.sha256, s.melanoma_risk, s.flagged, s.predicted_class,
       o.diagnosis, o.melanoma AS confirmed_melanoma, o.confirmed_on, o.note, o.lesion_id, o.patient_id
FROM (SELECT * FROM outcomes WHERE sha256 IS NOT NULL) o JOIN scores s ON s.sha256 = o.sha256
WHERE s.error IS NULL
UNION ALL
SELECT s.run_date, s.model_version, s.image_id, s.image_uri, s.sha256, s.melanoma_risk, s.flagged, s.predicted_class,
       o.diagnosis, o.melanoma, o.confirmed_on, o.note, o.lesion_id, o.patient_id
FROM (SELECT * FROM outcomes WHERE sha256 IS NULL) o JOIN scores s ON s.image_id = o.image_id
WHERE s.error IS NULL AND NOT EXISTS (SELECT 1 FROM outcomes x WHERE x.sha256 = s.sha256)"""

# Per night and model version, then per model version over all the nights asked for (run_date NULL).
REALISED = """SELECT run_date, model_version, count(*) AS confirmed,
  count(*) FILTER (WHERE confirmed_melanoma) AS melanomas, count(*) FILTER (WHERE flagged) AS flagged,
  count(*) FILTER (WHERE confirmed_melanoma AND NOT flagged) AS missed,
  count(*) FILTER (WHERE confirmed_melanoma AND flagged) / nullif(count(*) FILTER (WHERE confirmed_melanoma), 0) AS sensitivity,
  count(*) FILTER (WHERE NOT confirmed_melanoma AND NOT flagged) / nullif(count(*) FILTER (WHERE NOT confirmed_melanoma), 0)
    AS specificity,
  list(struct_pack(risk := melanoma_risk, positive := confirmed_melanoma)) AS pairs
FROM confirmed GROUP BY GROUPING SETS ((run_date, model_version), (model_version))
ORDER BY run_date NULLS LAST, model_version"""


class QueryError(MelanomaError):
    """A one-line, user-facing reason why a question cannot be answered."""


def dates(scores_uri: str) -> list[str]:
    """The nights present (names of run_date=D directories), oldest first; a listing, no file is read."""
    if storage.info(scores_uri).type != pafs.FileType.Directory:
        raise QueryError(f"{scores_uri}: no scores dataset there (no such directory or prefix)")
    fs, path = storage.pyarrow_fs(scores_uri)
    try:
        entries = fs.get_file_info(pafs.FileSelector(path))
    except OSError as exc:
        raise QueryError(f"{scores_uri}: cannot list the dataset: {str(exc).strip().splitlines()[0]}") from None
    nights = [e.base_name for e in entries if e.type == pafs.FileType.Directory and e.base_name.startswith(PARTITION)]
    found = sorted(name[len(PARTITION) :] for name in nights)
    if not found:
        raise QueryError(f"{scores_uri}: no partitions (no {PARTITION}YYYY-MM-DD directories): not a scores dataset yet")
    return found


def connect(scores_uri: str, nights: list[str] | None = None, outcomes_uri: str | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the view `scores` over the given nights (default: every night), and with
    an outcome store also the table `outcomes` and the view `confirmed`."""
    if nights is None:
        dates(scores_uri)  # a clear error for a missing dataset or one without partitions
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    con.execute("SET TimeZone = 'UTC'")
    if storage.is_s3(scores_uri):
        fs, path = storage.fsspec_fs(scores_uri)
        con.register_filesystem(fs)
        root = f"s3://{path}"
    else:
        root = storage.fsspec_fs(scores_uri)[1]
    globs = [f"{root}/{PARTITION}{night}/*.parquet" for night in (nights or ["*"])]
    files = ", ".join("'" + g.replace("'", "''") + "'" for g in globs)
    try:
        con.execute(
            "CREATE VIEW scores AS SELECT * FROM "
            f"read_parquet([{files}], hive_partitioning = true, hive_types = {{'run_date': DATE}})"
        )
    except duckdb.Error as exc:
        con.close()
        raise QueryError(f"{scores_uri}: {_first_line(exc)}") from None
    if outcomes_uri:
        con.register("outcomes", outcomes.read_store(outcomes_uri))
        con.execute(CONFIRMED_VIEW)
    return con


def sql(scores_uri: str, statement: str, outcomes_uri: str | None = None) -> pa.Table:
    """Runs one SQL statement against the view `scores` (and `outcomes`, `confirmed` with an outcome store;
    RECIPES has the everyday questions)."""
    con = connect(scores_uri, outcomes_uri=outcomes_uri)
    try:
        return _run(con, statement)
    finally:
        con.close()


def night_counts(scores_uri: str, run_date: str) -> pa.Table:
    """One night's rows per model version: images, scored, errors, flagged (only that night's files are read)."""
    return _on_night(
        scores_uri,
        run_date,
        "SELECT model_version, count(*) AS images, count(*) FILTER (WHERE error IS NULL) AS scored, "
        "count(*) FILTER (WHERE error IS NOT NULL) AS errors, count(*) FILTER (WHERE flagged) AS flagged "
        "FROM scores GROUP BY model_version ORDER BY model_version",
    )


def night_risks(scores_uri: str, run_date: str) -> pa.Table:
    """The melanoma_risk of every image scored that night (rows with an error have none)."""
    return _on_night(scores_uri, run_date, "SELECT melanoma_risk FROM scores WHERE error IS NULL")


def _on_night(scores_uri: str, run_date: str, statement: str) -> pa.Table:
    con = connect(scores_uri, [iso_date(run_date)])
    try:
        return _run(con, statement)
    finally:
        con.close()


def query(
    scores_uri: str,
    date: str | None = None,
    since: str | None = None,
    until: str | None = None,
    flagged: bool = False,
    min_risk: float | None = None,
    cls: str | None = None,
    top: int | None = None,
    errors: bool = False,
) -> pa.Table:
    """Rows of the dataset, riskiest first; every argument narrows them (errors=True: only rows that failed)."""
    if date and (since or until):
        raise QueryError("give either a date or a since/until range, not both")
    if cls is not None and cls not in CLASS_NAMES:
        raise QueryError(f"unknown class '{cls}' (one of: {', '.join(CLASS_NAMES)})")
    if top is not None and top < 1:
        raise QueryError(f"top must be at least 1, got {top}")
    nights = _nights(scores_uri, date, since, until)
    conditions, params = [], []
    if flagged:
        conditions.append("flagged")
    if errors:
        conditions.append("error IS NOT NULL")
    if min_risk is not None:
        conditions.append("melanoma_risk >= ?")
        params.append(float(min_risk))
    if cls is not None:
        conditions.append("predicted_class = ?")
        params.append(cls)
    statement = "SELECT * FROM scores"
    if conditions:
        statement += " WHERE " + " AND ".join(conditions)
    statement += " ORDER BY melanoma_risk DESC NULLS LAST, run_date, image_uri"
    if top is not None:
        statement += f" LIMIT {int(top)}"
    con = connect(scores_uri, nights)
    try:
        return _run(con, statement, params)
    finally:
        con.close()


def _nights(scores_uri: str, date: str | None, since: str | None, until: str | None) -> list[str] | None:
    """The nights asked for, each checked to be present; None for every night."""
    date, since, until = (iso_date(d) for d in (date, since, until))
    present = dates(scores_uri)
    if date and date not in present:
        raise QueryError(f"{scores_uri}: no partition {PARTITION}{date} (nights present: {_span(present)})")
    nights = [d for d in present if (not since or d >= since) and (not until or d <= until) and (not date or d == date)]
    if not nights:
        span = f"between {since or 'the first'} and {until or 'the last'}"
        raise QueryError(f"{scores_uri}: no night {span} (nights present: {_span(present)})")
    return nights if (date or since or until) else None


def realised(scores_uri: str, outcomes_uri: str, since: str | None = None, until: str | None = None) -> tuple[pa.Table, pa.Table]:
    """(missed melanomas, realised figures) of the scores against the confirmed outcomes. The figures: per night and
    model version, then per model version over those nights (run_date null), the confirmed images, melanomas,
    flagged and missed, sensitivity and specificity of the alert (`flagged`) and the AUC of melanoma_risk."""
    con = connect(scores_uri, _nights(scores_uri, None, since, until), outcomes_uri)
    try:
        missed = _run(con, RECIPES["missed_melanomas"])
        figures = _run(con, REALISED)
    finally:
        con.close()
    aucs = [
        metrics.roc_auc(np.array([p["risk"] for p in pairs], dtype=float), np.array([p["positive"] for p in pairs], dtype=bool))
        for pairs in figures.column("pairs").to_pylist()
    ]
    figures = figures.drop_columns(["pairs"]).append_column("auc", pa.array(aucs, pa.float64()))
    return missed, figures


RUN_FIGURES = ("size", "brightness", "red_share", "blue_share", "sharpness", "melanoma_risk")
RUNS_SCHEMA = pa.schema(
    [
        ("run_date", pa.date32()), ("model_version", pa.string()), ("images", pa.int64()), ("scored", pa.int64()),
        ("errors", pa.int64()), ("flagged", pa.int64()), ("flagged_share", pa.float64()), ("drift_alert", pa.bool_()),
        ("drift_reasons", pa.string()), ("drift_reference", pa.string()),
        *[(f"psi_{name}", pa.float64()) for name in (*RUN_FIGURES, "flagged_share", "class_mix")],
    ]
)  # fmt: skip


def runs(scores_uri: str, since: str | None = None, until: str | None = None) -> pa.Table:
    """One row per night with a run summary, oldest first (a night still running has none): its counts, the drift
    alert with its reasons (joined by "; ") and the PSI of each compared figure; drift columns are null for a night
    scored without a drift reference or before the drift watch."""
    rows = []
    for night in _nights(scores_uri, None, since, until) or dates(scores_uri):
        if not storage.exists(layout.summary_uri(scores_uri, night)):
            continue
        summary = layout.read_summary(scores_uri, night)
        drift = summary.get("drift") or {}
        compared = "features" in drift
        psi = {f"psi_{name}": f["psi"] for name, f in drift.get("features", {}).items() if name in RUN_FIGURES}
        rows.append({
            "run_date": dt.date.fromisoformat(night), "model_version": summary.get("model_version"),
            "images": summary.get("rows"), "scored": summary.get("scored"), "errors": summary.get("errors"),
            "flagged": summary.get("flagged"),
            "flagged_share": summary["flagged"] / summary["scored"] if summary.get("scored") else None,
            "drift_alert": drift["alert"] if compared else None,
            "drift_reasons": "; ".join(drift["reasons"]) if compared else None,
            "drift_reference": drift.get("reference"),
            **psi,
            "psi_flagged_share": drift["flagged_share"]["psi"] if compared else None,
            "psi_class_mix": drift["class_mix"]["psi"] if compared else None,
        })  # fmt: skip
    return pa.Table.from_pylist(rows, schema=RUNS_SCHEMA)


def iso_date(text: str | None) -> str | None:
    """YYYY-MM-DD, checked (None stays None): only such strings are put into SQL text."""
    if text is None:
        return None
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise QueryError(f"'{text}' is not a date YYYY-MM-DD") from None


def _run(con: duckdb.DuckDBPyConnection, statement: str, params: list | None = None) -> pa.Table:
    try:
        return con.sql(statement, params=params or None).to_arrow_table()
    except duckdb.Error as exc:
        raise QueryError(_first_line(exc)) from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _span(nights: list[str]) -> str:
    return nights[0] if len(nights) == 1 else f"{nights[0]} .. {nights[-1]}, {len(nights)} in all"


def format_table(table: pa.Table, fmt: str = "table") -> str:
    """table: aligned text for a terminal; csv: with a header row; json: one array of objects."""
    if fmt == "csv":
        sink = io.BytesIO()
        pacsv.write_csv(table, sink)
        return sink.getvalue().decode().rstrip("\n")
    if fmt == "json":
        return json.dumps(table.to_pylist(), default=_json_value, indent=1)
    if fmt != "table":
        raise QueryError(f"unknown format '{fmt}' (one of: {', '.join(FORMATS)})")
    header = table.column_names  # may repeat a name (SELECT a.*, b.* ...), so work by column position
    columns = [[_cell(v) for v in column.to_pylist()] for column in table.columns]
    widths = [max([len(h), *map(len, cells)]) for h, cells in zip(header, columns)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in zip(*columns)]
    lines.append(f"({table.num_rows} rows)")
    return "\n".join(lines)


def format_realised(missed: pa.Table, figures: pa.Table, fmt: str = "table") -> str:
    """What realised() returns, the missed melanomas first: two titled tables, or one JSON object."""
    if fmt == "json":
        return json.dumps({"missed_melanomas": missed.to_pylist(), "realised": figures.to_pylist()}, default=_json_value, indent=1)
    if fmt != "table":
        raise QueryError(f"outcomes print two tables: format table or json, not '{fmt}' (one table: SQL over the view `confirmed`)")
    return "\n".join([
        f"missed melanomas (confirmed melanoma, not flagged): {missed.num_rows}", format_table(missed), "",
        "realised per night and model version (no run_date: all those nights)", format_table(figures),
    ])  # fmt: skip


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dt.datetime):
        return value.isoformat(timespec="seconds")
    return str(value)


def _json_value(value):
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
