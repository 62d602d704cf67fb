"""CPU per image of reading loose JPEGs from a local SeaweedFS, by client: pyarrow (what scoring uses: a HEAD, then
a GET), boto3 `get_object` (one GET, no HEAD) and s3fs `cat_file` (one GET). 8 threads, as `prepare` reads.

    python benchmarks/s3_reads.py [--limit 2000] [--rounds 2]

Client CPU is this process's; server CPU is the S3 server's. Each client reads every image once per round; the
best round of each is kept. The last line is one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from score_throughput import cpu_seconds, upload


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[2] / "shared/data/ham10000/images"))
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import boto3
    import s3fs

    from melanoma import storage
    from melanoma.local import SeaweedServer

    files = sorted(Path(args.images).glob("*.jpg"))[: args.limit]
    figures: dict = {"images": len(files)}
    with tempfile.TemporaryDirectory() as tmp, SeaweedServer(Path(tmp) / "s3") as server:
        os.environ.update(server.env())
        bucket = server.make_bucket("reads")
        upload(files, f"{bucket}/a")
        uris = [f"{bucket}/a/{f.name}" for f in files]
        client = boto3.client("s3")
        fs = s3fs.S3FileSystem()

        def boto3_get(uri: str) -> bytes:
            name, key = uri.removeprefix("s3://").split("/", 1)
            return client.get_object(Bucket=name, Key=key)["Body"].read()

        readers = {"pyarrow": storage.read_bytes, "boto3": boto3_get, "s3fs": lambda uri: fs.cat_file(uri.removeprefix("s3://"))}
        for name, read in readers.items():
            best = None
            for _ in range(args.rounds):
                client_cpu, server_cpu, started = own_cpu_seconds(), cpu_seconds(server.pid), time.perf_counter()
                with ThreadPoolExecutor(8) as pool:
                    total = sum(len(data) for data in pool.map(read, uris))
                seconds = time.perf_counter() - started
                assert total == sum(f.stat().st_size for f in files)
                this = (len(uris) / seconds, (own_cpu_seconds() - client_cpu) / len(uris), (cpu_seconds(server.pid) - server_cpu) / len(uris))
                best = this if best is None or this[1] + this[2] < best[1] + best[2] else best
            figures |= {f"{name}_img_s": round(best[0]), f"{name}_client_cpu_ms": round(best[1] * 1000, 2),
                        f"{name}_server_cpu_ms": round(best[2] * 1000, 2)}  # fmt: skip
            print(f"{name:8s} {best[0]:6.0f} img/s   client {best[1] * 1000:.2f} ms/img   S3 server {best[2] * 1000:.2f} ms/img")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
