"""Listing and batch fetching of archives: loose files and tar shards, in path order, with per-row errors."""

from __future__ import annotations

import tarfile

import pytest

from melanoma import archive, storage
from helpers import make_image


def _archive(root, shards=2, per_shard=5, loose=3):
    """loose/<i>.jpg plus shard-<k>.tar of per_shard members each; returns {relative name: bytes}."""
    content = {}
    for i in range(loose):
        path = make_image(root / "loose" / f"l{i}.jpg", seed=i)
        content[f"loose/l{i}.jpg"] = path.read_bytes()
    for k in range(shards):
        members = root / f"members-{k}"
        with tarfile.open(root / f"shard-{k}.tar", "w") as tar:
            for j in range(per_shard):
                path = make_image(members / f"s{k}-{j}.jpg", size=(40 + j, 30), seed=100 * k + j)
                tar.add(path, arcname=f"day/s{k}-{j}.jpg")
                content[f"shard-{k}.tar#day/s{k}-{j}.jpg"] = path.read_bytes()
        for path in members.iterdir():
            path.unlink()
        members.rmdir()
    return content


def test_list_inputs_keeps_path_order_across_loose_files_and_shards(tmp_path):
    content = _archive(tmp_path)
    inputs, skipped = archive.list_inputs(str(tmp_path))
    assert skipped == 0
    names = [u[len(str(tmp_path)) + 1 :] for u in inputs["image_uri"]]
    assert names == sorted(content, key=lambda n: n.split("#")[0]) and len(names) == 13
    assert inputs["image_id"].tolist()[:3] == ["l0", "l1", "l2"]


def test_fetch_all_returns_each_rows_bytes_with_one_read_per_shard(tmp_path, monkeypatch):
    content = _archive(tmp_path)
    inputs, _ = archive.list_inputs(str(tmp_path))
    batch = inputs.sample(frac=1.0, random_state=0).reset_index(drop=True)  # any order in, same order out
    reads = []
    real = storage.read_range
    monkeypatch.setattr(storage, "read_range", lambda uri, offset, size: reads.append(uri) or real(uri, offset, size))
    fetched = archive.fetch_all(batch, threads=4)
    for uri, data in zip(batch["image_uri"], fetched):
        assert data == content[uri[len(str(tmp_path)) + 1 :]], uri
    assert sorted(reads) == sorted(str(tmp_path / f"shard-{k}.tar") for k in range(2))  # 10 members, 2 reads


def test_fetch_all_splits_spans_at_the_gap_and_size_limits(tmp_path, monkeypatch):
    content = _archive(tmp_path, shards=1, per_shard=6, loose=0)
    inputs, _ = archive.list_inputs(str(tmp_path))
    expected = [content[u[len(str(tmp_path)) + 1 :]] for u in inputs["image_uri"]]
    assert [len(p) for p, *_ in archive._spans(inputs)] == [6]
    step = int(inputs["offset"][1] - inputs["offset"][0])  # members are evenly spaced (header blocks + data)
    monkeypatch.setattr(archive, "MAX_SPAN", step + int(inputs["size"].max()))  # two fit in a span, three do not
    assert [len(p) for p, *_ in archive._spans(inputs)] == [2, 2, 2]
    assert archive.fetch_all(inputs, threads=2) == expected
    monkeypatch.setattr(archive, "MAX_GAP", 0)  # a tar header lies between any two members
    assert [len(p) for p, *_ in archive._spans(inputs)] == [1] * 6
    assert archive.fetch_all(inputs, threads=2) == expected


def test_fetch_all_gives_a_missing_file_its_own_error_and_reads_the_rest(tmp_path):
    content = _archive(tmp_path, shards=1, per_shard=2, loose=2)
    inputs, _ = archive.list_inputs(str(tmp_path))
    (tmp_path / "loose" / "l0.jpg").unlink()
    fetched = archive.fetch_all(inputs, threads=2)
    assert isinstance(fetched[0], storage.StorageError) and "l0.jpg: no such file" in str(fetched[0])
    assert fetched[1:] == [content[u[len(str(tmp_path)) + 1 :]] for u in inputs["image_uri"][1:]]


def test_fetch_all_raises_storage_unavailable_and_stops_reading(tmp_path, monkeypatch):
    _archive(tmp_path, shards=0, loose=40)
    inputs, _ = archive.list_inputs(str(tmp_path))
    calls = []

    def dead_endpoint(uri):
        calls.append(uri)
        raise storage.StorageUnavailable(f"{uri}: cannot reach the S3 endpoint")

    monkeypatch.setattr(storage, "read_bytes", dead_endpoint)
    with pytest.raises(storage.StorageUnavailable, match="cannot reach"):
        archive.fetch_all(inputs, threads=2)
    assert len(calls) < len(inputs)  # queued reads were cancelled


def test_fetch_uris_reads_loose_files_and_members_by_uri_with_an_error_for_each_missing_one(tmp_path):
    content = _archive(tmp_path, shards=1, per_shard=3, loose=2)
    (tmp_path / "broken.tar").write_bytes(b"not a tar")
    wanted = ["shard-0.tar#day/s0-2.jpg", "loose/l1.jpg", "loose/gone.jpg", "shard-0.tar#day/nope.jpg", "broken.tar#x.jpg"]

    got = archive.fetch_uris([f"{tmp_path}/{name}" for name in wanted], threads=2)

    assert got[:2] == [content["shard-0.tar#day/s0-2.jpg"], content["loose/l1.jpg"]]
    assert [type(g) for g in got[2:]] == [storage.StorageError] * 3
    assert str(got[2]).endswith("loose/gone.jpg: no such file")
    assert str(got[3]).endswith("shard-0.tar#day/nope.jpg: no such member in the shard")
    assert "broken.tar: not a readable tar shard" in str(got[4])
