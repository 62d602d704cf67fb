"""Confirmed diagnoses: a CSV checked row by row, appended to a flat Parquet store (local or s3://).

CSV columns (header names, any order): image_id and/or sha256 (at least one per row), diagnosis (one of the 9
classes) and/or melanoma (yes/no/1/0), confirmed_on (YYYY-MM-DD, not in the future), and optionally note,
lesion_id and patient_id. Every bad row is refused with one line naming the file, the line and what is wrong; if
any row is bad, nothing is written.

Store: `<store>/outcomes-<UTC time>-<random>.parquet`, one new file per add, written whole (STORE_SCHEMA).
A row matches a stored one when they share a sha256 or an image_id. A matching row that agrees (same melanoma
value and no different diagnosis) is already known and skipped; one that disagrees is refused: a confirmed
diagnosis is never overwritten by an add. Two adds into one store at the same moment are not checked against each
other (each reads the store once, before it writes).
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone

import pyarrow as pa
import pyarrow.fs as pafs

from melanoma import storage
from melanoma.config import CLASS_NAMES, MELANOMA
from melanoma.errors import MelanomaError

KEYS = ("image_id", "sha256")
COLUMNS = (*KEYS, "diagnosis", "melanoma", "confirmed_on", "note", "lesion_id", "patient_id")
YES, NO = ("yes", "1"), ("no", "0")
STORE_SCHEMA = pa.schema([
    ("image_id", pa.string()),
    ("sha256", pa.string()),
    ("diagnosis", pa.string()),  # one of the 9 classes, or null when only melanoma yes/no is known
    ("melanoma", pa.bool_()),
    ("confirmed_on", pa.date32()),
    ("note", pa.string()),
    ("lesion_id", pa.string()),
    ("patient_id", pa.string()),
    ("csv", pa.string()),  # where the row came from
    ("line", pa.int32()),
    ("added_at", pa.timestamp("us", tz="UTC")),
])  # fmt: skip
_SHA256 = re.compile(r"[0-9a-f]{64}")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class OutcomeError(MelanomaError):
    """Why a CSV of outcomes was refused: one line per bad row, after a first line that sums them up."""


@dataclass(frozen=True)
class Added:
    store: str
    rows: int  # rows in the CSV
    added: int
    already_known: int
    file: str | None  # the new store file, None when nothing was new


def read_csv(csv_uri: str, today: date | None = None) -> list[dict]:
    """The CSV's rows as store rows (without added_at); OutcomeError with every problem found."""
    try:
        text = storage.read_bytes(csv_uri).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise OutcomeError(f"{csv_uri}: not a UTF-8 text file") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    problem = _header_problem(header)
    if problem:
        raise OutcomeError(f"{csv_uri} line 1: {problem}")
    reader.fieldnames = header
    rows, problems = [], []
    for raw in reader:
        where = f"{csv_uri} line {reader.line_num}"
        try:
            rows.append(_row(raw, today or datetime.now(timezone.utc).date()) | {"csv": csv_uri, "line": reader.line_num})
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
    problems += _contradictions(rows, csv_uri)
    if problems:
        raise OutcomeError("\n".join([f"{csv_uri}: {len(problems)} bad rows, nothing written", *problems]))
    if not rows:
        raise OutcomeError(f"{csv_uri}: no rows")
    return rows


def _header_problem(header: list[str]) -> str | None:
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        return f"unknown column '{unknown[0]}' (columns: {', '.join(COLUMNS)})"
    if not any(k in header for k in KEYS):
        return "needs an image_id or a sha256 column"
    if "diagnosis" not in header and "melanoma" not in header:
        return "needs a diagnosis or a melanoma column"
    if "confirmed_on" not in header:
        return "needs a confirmed_on column"
    return None


def _row(raw: dict, today: date) -> dict:
    """One CSV row as a store row; ValueError saying what is wrong with it."""
    if None in raw:
        raise ValueError(f"{len(raw) - 1 + len(raw[None])} fields where the header has {len(raw) - 1}")
    if None in raw.values():
        raise ValueError(f"{sum(v is not None for v in raw.values())} fields where the header has {len(raw)}")
    v = {k: (raw.get(k) or "").strip() for k in COLUMNS}
    image_id, sha = v["image_id"], v["sha256"].lower()
    if not image_id and not sha:
        raise ValueError("neither image_id nor sha256 given")
    if sha and not _SHA256.fullmatch(sha):
        raise ValueError(f"sha256 '{v['sha256']}' is not 64 hex digits")
    diagnosis, mel = v["diagnosis"], v["melanoma"].lower()
    if diagnosis and diagnosis not in CLASS_NAMES:
        raise ValueError(f"diagnosis '{diagnosis}' is not one of the 9 classes ({', '.join(CLASS_NAMES)})")
    if mel and mel not in YES + NO:
        raise ValueError(f"melanoma must be yes, no, 1 or 0, got '{v['melanoma']}'")
    if not diagnosis and not mel:
        raise ValueError("neither diagnosis nor melanoma given")
    melanoma = diagnosis == MELANOMA if diagnosis else mel in YES
    if diagnosis and mel and melanoma != (mel in YES):
        raise ValueError(f"diagnosis '{diagnosis}' contradicts melanoma={v['melanoma']}")
    confirmed_on = _date(v["confirmed_on"])
    if confirmed_on > today:
        raise ValueError(f"confirmed_on {confirmed_on} is after today ({today})")
    return {
        "image_id": image_id or None, "sha256": sha or None, "diagnosis": diagnosis or None, "melanoma": melanoma,
        "confirmed_on": confirmed_on, "note": v["note"] or None, "lesion_id": v["lesion_id"] or None,
        "patient_id": v["patient_id"] or None,
    }  # fmt: skip


def _date(text: str) -> date:
    if not text:
        raise ValueError("confirmed_on is empty")
    try:
        if _DATE.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise ValueError(f"confirmed_on '{text}' is not a date YYYY-MM-DD")


def _contradictions(rows: list[dict], where: str) -> list[str]:
    """One line per row that disagrees with an earlier row of the same image in the same CSV."""
    seen = Index()
    problems = []
    for row in rows:
        earlier = seen.match(row)
        if earlier is not None and not agrees(row, earlier):
            problems.append(f"{where} line {row['line']}: {describe(row)} contradicts line {earlier['line']} ({describe(earlier)})")
        elif earlier is None:
            seen.add(row)
    return problems


class Index:
    """Rows by sha256 and by image_id: a row matches another when they share either."""

    def __init__(self, rows: list[dict] = ()):
        self.by = {key: {} for key in KEYS}
        for row in rows:
            self.add(row)

    def add(self, row: dict) -> None:
        for key in KEYS:
            if row[key]:
                self.by[key].setdefault(row[key], row)

    def match(self, row: dict) -> dict | None:
        return next((self.by[key][row[key]] for key in KEYS if row[key] and row[key] in self.by[key]), None)


def agrees(a: dict, b: dict) -> bool:
    return a["melanoma"] == b["melanoma"] and (not a["diagnosis"] or not b["diagnosis"] or a["diagnosis"] == b["diagnosis"])


def describe(row: dict) -> str:
    return f"{row['diagnosis'] or ('melanoma' if row['melanoma'] else 'not melanoma')}, confirmed {row['confirmed_on']}"


def read_store(store_uri: str) -> pa.Table:
    """Every stored outcome (STORE_SCHEMA); an empty table when the store does not exist yet."""
    if storage.info(store_uri).type == pafs.FileType.NotFound:
        return STORE_SCHEMA.empty_table()
    fs, _ = storage.pyarrow_fs(store_uri)
    tables = [storage.read_table(storage.to_uri(fs, f.path)) for f in storage.list_files(store_uri, (".parquet",))]
    return pa.concat_tables([t.select(STORE_SCHEMA.names).cast(STORE_SCHEMA) for t in tables]) if tables else STORE_SCHEMA.empty_table()


def add(csv_uri: str, store_uri: str) -> Added:
    """Checks the CSV against itself and the store, then writes its new rows as one new store file."""
    rows = read_csv(csv_uri)
    stored = Index(read_store(store_uri).to_pylist())
    new, problems = [], []
    for row in rows:
        match = stored.match(row)
        if match is None:
            new.append(row)
        elif not agrees(row, match):
            problems.append(f"{csv_uri} line {row['line']}: {describe(row)} contradicts the store ({describe(match)}, "
                            f"from {match['csv']} line {match['line']})")  # fmt: skip
    if problems:
        raise OutcomeError("\n".join([f"{csv_uri}: {len(problems)} bad rows, nothing written", *problems]))
    new = _unique(new)
    if not new:
        return Added(store_uri, len(rows), 0, len(rows), None)
    now = datetime.now(timezone.utc)
    target = storage.join(store_uri, f"outcomes-{now:%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}.parquet")
    storage.write_parquet(target, pa.Table.from_pylist([r | {"added_at": now} for r in new], schema=STORE_SCHEMA))
    return Added(store_uri, len(rows), len(new), len(rows) - len(new), target)


def _unique(rows: list[dict]) -> list[dict]:
    """The rows minus repeats of an earlier row of the same image (the CSV's contradictions are refused already)."""
    seen = Index()
    out = []
    for row in rows:
        if seen.match(row) is None:
            seen.add(row)
            out.append(row)
    return out
