"""Build a large, real nightly archive by re-keying the HAM10000 JPEGs, as loose files and/or as tar shards.

    python benchmarks/make_archive.py --copies 2                      # 2 x 10,015 = 20,030 images, own SeaweedFS
    python benchmarks/make_archive.py --copies 10                     # the full 100k archive (~1.1 GB uploaded)
    AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
        python benchmarks/make_archive.py --copies 10 --prefix s3://bucket/bench   # into a running S3 endpoint

Copy c of `ISIC_0024306.jpg` becomes `ISIC_0024306_r<c>.jpg` (same bytes, new key and image id), so the
archive holds copies x sources distinct inputs. Layout under the prefix:

    <prefix>/loose/part-00000/ISIC_0024306_r00.jpg ...  (at most --shard-size keys per folder)
    <prefix>/shards/shard-00000.tar ...                  (--shard-size members per shard, built in memory)

Both layouts hold the same images in the same order, so scoring either gives the same rows (only the
image_uri differs). Without --prefix a SeaweedFS server is started (in --root-dir, or a temp dir), filled,
timed and stopped (it gets new random credentials each start); `scaling.py archive` imports build() and
does the same inside the server it scores from.
Prints the counts, bytes, and upload time and rate of each layout, with the load average before and after.
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DEFAULT_IMAGES = Path(__file__).resolve().parents[2] / "shared/data/ham10000/images"


def load(short: bool = False) -> str:
    one, five, fifteen = os.getloadavg()
    if short:
        return f"load {one:.1f}/{five:.1f}/{fifteen:.1f}"
    return f"load avg {one:.1f}/{five:.1f}/{fifteen:.1f} (1/5/15 min) on {os.cpu_count()} CPUs"


def rekeyed(files: list[Path], copies: int) -> list[tuple[str, Path]]:
    """(new file name, source file) for every copy, copy-major: copy 0 of every source, then copy 1, ..."""
    return [(f"{f.stem}_r{c:02d}{f.suffix}", f) for c in range(copies) for f in files]


def _tar_bytes(members: list[tuple[str, Path]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, source in members:
            data = source.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build(prefix: str, files: list[Path], copies: int, shard_size: int = 1000, layouts=("loose", "shards"),
          workers: int = 16) -> dict:
    """Upload the re-keyed archive under prefix (s3:// or local); returns per-layout counts, bytes and seconds."""
    from melanoma import storage

    items = rekeyed(files, copies)
    groups = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    stats = {"images": len(items), "shard_size": shard_size}
    if "loose" in layouts:
        jobs = [(storage.join(prefix, "loose", f"part-{g:05d}", name), src) for g, group in enumerate(groups) for name, src in group]
        started = time.time()
        with ThreadPoolExecutor(workers) as pool:
            sizes = list(pool.map(lambda job: _put(job[0], job[1].read_bytes()), jobs))
        seconds = time.time() - started
        stats["loose"] = {"uri": storage.join(prefix, "loose"), "objects": len(jobs), "bytes": sum(sizes),
                          "upload_seconds": round(seconds, 1), "objects_per_second": round(len(jobs) / seconds, 1)}
    if "shards" in layouts:
        started = time.time()
        # Few workers: each holds one shard (shard_size images, ~5 MB at HAM10000 sizes) in memory.
        with ThreadPoolExecutor(min(workers, 4)) as pool:
            sizes = list(pool.map(
                lambda g: _put(storage.join(prefix, "shards", f"shard-{g:05d}.tar"), _tar_bytes(groups[g])), range(len(groups))
            ))
        seconds = time.time() - started
        stats["shards"] = {"uri": storage.join(prefix, "shards"), "objects": len(groups), "bytes": sum(sizes),
                           "upload_seconds": round(seconds, 1), "objects_per_second": round(len(groups) / seconds, 2)}
    return stats


def _put(uri: str, data: bytes) -> int:
    from melanoma import storage

    storage.write_bytes(uri, data)
    return len(data)


def source_files(images: str, limit: int = 0) -> list[Path]:
    files = sorted(Path(images).glob("*.jpg"))
    if not files:
        raise SystemExit(f"no *.jpg under {images}")
    return files[:limit] if limit else files


def print_stats(stats: dict) -> None:
    for layout in ("loose", "shards"):
        if layout in stats:
            s = stats[layout]
            print(f"  {layout:6s}: {s['objects']:7d} objects, {s['bytes'] / 2**20:8.1f} MiB, uploaded in "
                  f"{s['upload_seconds']:7.1f} s ({s['objects_per_second']} objects/s)  {s['uri']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(DEFAULT_IMAGES), help="folder of source JPEGs (HAM10000)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N source images (0: all)")
    parser.add_argument("--copies", type=int, default=10, help="re-keyed copies of every source image")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (and per loose folder)")
    parser.add_argument("--layout", choices=("both", "loose", "shards"), default="both")
    parser.add_argument("--prefix", help="s3://bucket/prefix of a running endpoint (AWS_* variables) or a local dir")
    parser.add_argument("--root-dir", help="without --prefix: SeaweedFS data dir to keep (default: a temp dir, removed)")
    parser.add_argument("--workers", type=int, default=16, help="upload threads")
    args = parser.parse_args()

    files = source_files(args.images, args.limit)
    layouts = ("loose", "shards") if args.layout == "both" else (args.layout,)
    print(f"{len(files)} source images x {args.copies} copies = {len(files) * args.copies} images, "
          f"{args.shard_size} per shard; {load()}")
    if args.prefix:
        stats = build(args.prefix, files, args.copies, args.shard_size, layouts, args.workers)
    else:
        from melanoma.local import SeaweedServer

        with SeaweedServer(args.root_dir) as server:
            os.environ.update(server.env())
            prefix = server.make_bucket("archive") + "/bench"
            stats = build(prefix, files, args.copies, args.shard_size, layouts, args.workers)
            print(f"SeaweedFS at {server.endpoint} (stopped on exit; data dir {server.data_dir})")
    print_stats(stats)
    print(f"after: {load()}")


if __name__ == "__main__":
    main()
