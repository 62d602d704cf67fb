"""melanoma.outcomes on local CSVs and stores: every kind of bad row is refused with one line naming the file and
line, and then nothing is written; repeats are skipped, contradictions of the store refused."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from melanoma import outcomes

SHA = "ab" * 32


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def store_files(store: Path) -> list[Path]:
    return sorted(store.glob("*.parquet")) if store.exists() else []


def test_every_kind_of_bad_row_is_one_line_and_nothing_is_written(tmp_path):
    csv = write(tmp_path / "bad.csv", "\n".join([
        "image_id,sha256,diagnosis,melanoma,confirmed_on,note",
        "ISIC_1,,melanoma,yes,2026-11-20,fine",           # line 2: good
        ",,nevus,,2026-11-20,",                            # 3: no key
        "ISIC_3,xyz,nevus,,2026-11-20,",                   # 4: bad sha256
        "ISIC_4,,melanom,,2026-11-20,",                    # 5: unknown class
        "ISIC_5,,,maybe,2026-11-20,",                      # 6: bad melanoma value
        "ISIC_6,,,,2026-11-20,",                           # 7: no diagnosis at all
        "ISIC_7,,nevus,yes,2026-11-20,",                   # 8: diagnosis contradicts melanoma
        "ISIC_8,,nevus,,20.11.2026,",                      # 9: bad date
        "ISIC_9,,nevus,,2026-12-24,",                      # 10: in the future
        "ISIC_10,,nevus,,2026-11-20,a,b",                  # 11: too many fields
        "ISIC_1,,nevus,,2026-11-21,",                      # 12: contradicts line 2
        "ISIC_12,,nevus,,,",                               # 13: no date
    ]) + "\n")
    store = tmp_path / "store"

    with pytest.raises(outcomes.OutcomeError) as caught:
        outcomes.read_csv(csv, today=date(2026, 12, 1))
    lines = str(caught.value).splitlines()
    assert lines[0] == f"{csv}: 11 bad rows, nothing written"
    said = {int(line.split(" line ")[1].split(":")[0]): line for line in lines[1:]}
    assert sorted(said) == list(range(3, 14)) and len(lines) == 12
    assert said[3].endswith("neither image_id nor sha256 given")
    assert "sha256 'xyz' is not 64 hex digits" in said[4]
    assert "diagnosis 'melanom' is not one of the 9 classes" in said[5]
    assert "melanoma must be yes, no, 1 or 0, got 'maybe'" in said[6]
    assert said[7].endswith("neither diagnosis nor melanoma given")
    assert "diagnosis 'nevus' contradicts melanoma=yes" in said[8]
    assert "confirmed_on '20.11.2026' is not a date YYYY-MM-DD" in said[9]
    assert "confirmed_on 2026-12-24 is after today (2026-12-01)" in said[10]
    assert "7 fields where the header has 6" in said[11]
    assert said[12].endswith("nevus, confirmed 2026-11-21 contradicts line 2 (melanoma, confirmed 2026-11-20)")
    assert said[13].endswith("confirmed_on is empty")
    assert all(line.startswith(f"{csv} line ") for line in lines[1:])

    with pytest.raises(outcomes.OutcomeError):
        outcomes.add(csv, str(store))
    assert not store.exists(), "a refused CSV wrote something"


@pytest.mark.parametrize("header, said", [
    ("image_id,diagnosis,confirmed_on,comment", "unknown column 'comment'"),
    ("diagnosis,confirmed_on", "needs an image_id or a sha256 column"),
    ("image_id,confirmed_on", "needs a diagnosis or a melanoma column"),
    ("image_id,melanoma", "needs a confirmed_on column"),
])  # fmt: skip
def test_a_bad_header_is_one_line(tmp_path, header, said):
    csv = write(tmp_path / "o.csv", header + "\n")
    with pytest.raises(outcomes.OutcomeError, match=f"^{csv} line 1: {said}"):
        outcomes.read_csv(csv)


def test_rows_are_stored_typed_and_repeats_are_skipped(tmp_path):
    store = tmp_path / "store"
    first = write(tmp_path / "first.csv", "sha256,image_id,melanoma,confirmed_on,lesion_id\n"
                  f"{SHA.upper()},ISIC_1,1,2026-11-20,L1\n,ISIC_2,no,2026-11-21,\n,ISIC_2,0,2026-11-22,\n")
    added = outcomes.add(first, str(store))
    assert (added.rows, added.added, added.already_known) == (3, 2, 1)
    assert [Path(added.file)] == store_files(store)

    rows = outcomes.read_store(str(store)).to_pylist()
    assert [(r["image_id"], r["sha256"], r["diagnosis"], r["melanoma"], r["confirmed_on"], r["lesion_id"], r["line"])
            for r in rows] == [("ISIC_1", SHA, None, True, date(2026, 11, 20), "L1", 2),
                               ("ISIC_2", None, None, False, date(2026, 11, 21), None, 3)]  # fmt: skip
    assert outcomes.read_store(str(store)).schema == outcomes.STORE_SCHEMA

    # the same images again (one by its sha256 only, with a diagnosis that agrees) and one new: only that is written
    second = write(tmp_path / "second.csv", f"sha256,image_id,diagnosis,confirmed_on\n{SHA},,melanoma,2026-11-23\n"
                   ",ISIC_2,nevus,2026-11-23\n,ISIC_3,basal cell carcinoma,2026-11-23\n")
    added = outcomes.add(second, str(store))
    assert (added.added, added.already_known) == (1, 2)
    assert len(store_files(store)) == 2
    assert outcomes.add(second, str(store)).file is None and len(store_files(store)) == 2


def test_a_row_contradicting_the_store_is_refused_and_nothing_is_written(tmp_path):
    store = tmp_path / "store"
    outcomes.add(write(tmp_path / "a.csv", "image_id,diagnosis,confirmed_on\nISIC_1,nevus,2026-11-20\n"), str(store))
    csv = write(tmp_path / "b.csv", "image_id,diagnosis,confirmed_on\nISIC_9,nevus,2026-11-22\nISIC_1,melanoma,2026-11-22\n")

    with pytest.raises(outcomes.OutcomeError) as caught:
        outcomes.add(csv, str(store))
    assert str(caught.value).splitlines() == [
        f"{csv}: 1 bad rows, nothing written",
        f"{csv} line 3: melanoma, confirmed 2026-11-22 contradicts the store (nevus, confirmed 2026-11-20, "
        f"from {tmp_path / 'a.csv'} line 2)",
    ]
    assert len(store_files(store)) == 1 and len(outcomes.read_store(str(store))) == 1


def test_an_empty_or_missing_store_reads_as_no_outcomes(tmp_path):
    assert outcomes.read_store(str(tmp_path / "none")).num_rows == 0
    with pytest.raises(outcomes.OutcomeError, match="no rows"):
        outcomes.read_csv(write(tmp_path / "empty.csv", "image_id,melanoma,confirmed_on\n"))
