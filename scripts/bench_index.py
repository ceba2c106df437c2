"""Memory a DataLoader worker copies from the annotation index: a list of dicts (one per cloud, as
read_index returns them, how datasets held them before) vs ``PackedEntries`` (how caption datasets hold
them now), on the same entries, in one run.

A worker is a fork of the main process: it shares the index until it writes to it, and reading a
Python object writes its reference count. Each representation is built in a fresh process of its own
(reading the index as the builders do; for the packed one the list is then dropped, as builders drop
it). That process forks two workers: one reads the entries a worker with ``--workers`` siblings reads
in an epoch (a random 1/workers of them: the id, the captions, the shard and row, as an item does), the
other reads nothing; then each runs a full garbage collection (which a worker's own allocations trigger
sooner or later). Each reports the memory it no longer shares with its parent (Private_Dirty in
/proc/self/smaps_rollup). A third process holds no index: what any of its workers copies (modules, the
collector's walk over them) is subtracted to give the index's share. The entries look like a converted
Cap3D index: a 32-hex uid, a shard name, a row and one caption of about 90 characters.

    python scripts/bench_index.py [--entries 660000] [--workers 4]
"""
import argparse
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from lavis_point.datasets.builders import read_index
from lavis_point.datasets.packed import PackedEntries


def private_mb():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:")) / 1024


def worker(entries, picks):
    """In a forked child: read the picked entries as items do, then collect garbage. Returns (MB this
    process holds privately after reading, after the collection, microseconds per entry read)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        start = private_mb()
        started = time.perf_counter()
        for i in picks:
            entry = entries[i]
            entry["id"], entry["captions"][0], entry["shard"], entry["index"]
        seconds = time.perf_counter() - started
        after_reads = private_mb() - start
        gc.collect()
        os.write(write, json.dumps([after_reads, private_mb() - start, seconds / max(len(picks), 1) * 1e6]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        result = json.loads(f.read())
    os.waitpid(pid, 0)
    return result


def child(path, kind, workers):
    """One representation in this fresh process: JSON of {"build_s", "reading": worker(...), "idle": worker(...)}.
    ``none`` builds nothing: what any worker of this process copies (modules, the garbage collector's walk)."""
    started = time.perf_counter()
    entries = []
    if kind != "none":
        entries = read_index(path, sharded=True)
    if kind == "packed":
        entries = PackedEntries(entries)  # the list is dropped here, as caption_dataset drops it
    gc.collect()
    built = time.perf_counter() - started
    picks = random.Random(1).sample(range(len(entries)), len(entries) // workers)
    print(json.dumps({"build_s": built, "reading": worker(entries, picks), "idle": worker(entries, [])}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=660000, help="Cap3D has about 660k objects")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers per rank")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "KIND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.workers)
    rng = random.Random(0)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "train.jsonl")
        with open(path, "w") as f:
            for i in range(args.entries):
                f.write(json.dumps({"id": f"{rng.getrandbits(128):032x}", "shard": f"train_points_{i // 2048:05d}.npy",
                                    "index": i % 2048, "caption": f"a wooden chair with a curved backrest, four "
                                                                  f"slender legs and a cushioned seat, number {i}"}) + "\n")
        for kind in ("none", "list", "packed"):
            out = subprocess.run([sys.executable, __file__, "--child", path, kind, "--workers", str(args.workers)],
                                 capture_output=True, text=True, check=True).stdout
            results[kind] = json.loads(out.strip().splitlines()[-1])
    floor = results["none"]["idle"][1]
    print(f"{args.entries} entries; one worker of {args.workers}, reading {args.entries // args.workers} of them: MB it "
          f"copies from its parent after the reads / after a garbage collection; the same for a worker reading "
          f"nothing; time per entry read. Any worker of a process without an index copies {floor:.0f} MB.")
    copied = {}
    for kind, name in (("list", "list of dicts"), ("packed", "PackedEntries")):
        r = results[kind]
        copied[kind] = r["reading"][1] - floor
        print(f"  {name:14s} (built in {r['build_s']:4.1f} s) {r['reading'][0]:6.0f} / {r['reading'][1]:6.0f} MB; "
              f"reading nothing {r['idle'][0]:4.0f} / {r['idle'][1]:4.0f} MB; {r['reading'][2]:5.2f} us per entry")
    print(f"the index's share per worker: {copied['list']:.0f} MB as a list of dicts, {copied['packed']:.0f} MB packed "
          f"({copied['list'] / max(copied['packed'], 1):.0f}x less); the time per entry read "
          f"{results['list']['reading'][2] / results['packed']['reading'][2]:.1f}x less")


if __name__ == "__main__":
    main()
