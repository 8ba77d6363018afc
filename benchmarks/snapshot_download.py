"""A `gs://` snapshot's copy onto a serving machine (`encoder.storage.download_gcs_dir`, as `SnapshotClient` and
`publish` take one): seconds, GB/s and the process's CPU seconds, the code before (each object whole, one after
another, through the storage client) against now (objects 8 at once, the large ones in ranges of 64 MiB over
libcurl, then checked whole against their crc32c).

    python benchmarks/snapshot_download.py                          # 2 GB of files, unpaced and 100 MB/s a stream
    python benchmarks/snapshot_download.py --ways /path/to/an/older/checkout,now --paces 0,100 --gb 4

The store is `tests.support.kept_alive_store` on loopback, a process of its own on the same cores, keeping
connections alive as GCS does; `--paces` sends each of its responses at most that many MB/s (0: as fast as it
goes), as one stream from an object store is bounded by its own limits. Each measurement runs in a fresh process,
alternated, best of `--rounds`.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.common import best_of_checkouts, machine, scratch_dir  # noqa: E402

sys.path.insert(0, os.environ.get("SNAPSHOT_DOWNLOAD_CODE", str(ROOT)))  # the child's: the checkout it measures

QUIET_ENV = {"NO_GCE_CHECK": "true", "GCE_METADATA_HOST": "127.0.0.1:9", "GCE_METADATA_IP": "127.0.0.1:9"}


def write_snapshot(folder: Path, gb: float) -> None:
    """Files the sizes of a snapshot's: the vectors and the index half each, the ids, the manifest."""
    folder.mkdir(parents=True)
    half = int(gb * 1e9 / 2)
    for name, size in {
        "vectors.npy": half,
        "index.faiss": half,
        "ids.parquet": 20 << 20,
        "manifest.json": 4096,
    }.items():
        with open(folder / name, "wb") as f:
            for at in range(0, size, 64 << 20):
                f.write(os.urandom(min(64 << 20, size - at)))


def measure(files: str, port: str, target: str) -> dict:
    import google_crc32c

    os.environ.update(QUIET_ENV, STORAGE_EMULATOR_HOST=f"http://127.0.0.1:{port}")
    from encoder import storage

    bucket = storage.gcs_client().bucket("snapshots")
    blobs = []
    for path in sorted(Path(files).iterdir()):
        blob = bucket.blob(path.name)
        crc32c = base64.b64encode(google_crc32c.value(path.read_bytes()).to_bytes(4, "big")).decode()
        blob._properties.update(size=str(path.stat().st_size), crc32c=crc32c, generation="1")  # as listed
        blobs.append(blob)
    size = sum(int(b.size) for b in blobs)
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    storage._copy_objects(blobs, "", Path(target))
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    same = all((Path(target) / p.name).stat().st_size == p.stat().st_size for p in Path(files).iterdir())
    shutil.rmtree(target)
    return {"seconds": seconds, "gb_per_s": size / 1e9 / seconds, "complete": same,
            "cpu_s": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0)
    parser.add_argument("--paces", default="0,100", help="comma-separated MB/s per response; 0: unpaced")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ways", default="now", help="comma-separated: now, or folders of other checkouts")
    parser.add_argument("--measure", nargs=3, help=argparse.SUPPRESS)  # the child: the files, the port, the target
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return

    work = scratch_dir("snapshot-download")
    files = work / "files"
    write_snapshot(files, args.gb)
    print(f"machine: {machine()}\n{args.gb:g} GB of files, {args.rounds} rounds\n")
    print("| code | MB/s a stream | seconds | GB/s | CPU s |\n| --- | ---: | ---: | ---: | ---: |")
    results = {}
    for pace in (int(p) for p in args.paces.split(",")):
        store = subprocess.Popen([sys.executable, "-m", "tests.support.kept_alive_store", str(files), "--pace-mb-s",
                                  str(pace)], stdout=subprocess.PIPE, text=True, cwd=ROOT)  # fmt: skip
        try:
            port = store.stdout.readline().split()[-1]
            best = best_of_checkouts(args.ways.split(","), args.rounds, "SNAPSHOT_DOWNLOAD_CODE",
                                     lambda way, port=port: [sys.executable, __file__, "--measure", str(files), port,
                                                             str(work / "copy")], ("seconds", "cpu_s"))  # fmt: skip
        finally:
            store.kill()
            store.wait()
        for way, b in best.items():
            b["gb_per_s"] = args.gb / b["seconds"]
            print(f"| {way} | {pace or 'unpaced'} | {b['seconds']:.2f} | {b['gb_per_s']:.2f} | {b['cpu_s']:.2f} |")
            results[f"{way}@{pace}"] = b
    print(json.dumps(results))


if __name__ == "__main__":
    main()
