"""Clouds per second through the training dataset (cap3d_point_caption), from converted shards vs from
one pickle per cloud, on the same clouds in the same run.

Both read the same N Cap3D-like clouds (8192 x 6 float32, one pickle each, GPT4Point-style annotation
JSON), converted once to shards, with the same training processor (``point_train``, 8192 points).
Each pass visits every item once in one shuffled order, as training does:
- "read": dataset.cloud_of(entry) to a float32 array, item by item (the part the storage decides);
- "loader, per item": a DataLoader (the run's batch size from projects/cap3d/stage1.yaml,
  num_workers=0, the dataset's collater) over the dataset with ``__getitems__`` hidden, so every item
  is read and processed alone (how training read before batched reads);
- "loader, batched": the same DataLoader over the dataset itself, as training reads it now: torch
  passes each batch's indices to ``__getitems__``; pickles still open and unpickle one file per
  cloud, shards are read by the processor's kernel itself, each shard's rows in file order straight
  from the memory map; both are processed in one kernel call into one batch tensor, which the
  collater returns whole.
"cold" passes first evict every file from the page cache (posix_fadvise DONTNEED), as when a dataset
is larger than memory; "warm" passes reread what is cached. Each measurement is the median of
--repeats passes, pickles and shards alternating (the machine may be shared). torch runs on one thread, as in a
DataLoader worker (training uses num_workers: 4). Prints one JSON line per measurement, the load
average before and after, the disk's own rate (cold plain sequential reads of each source's files, beside
the cold batched pass's rate in MB of those files), where a warm batched pass spends its time per
cloud, and the shard/pickle ratios last.

    python scripts/bench_data.py [--clouds 2000]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lavis_point  # noqa: E402,F401
from lavis.common.registry import registry  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lavis_point.data_io.convert import convert_split  # noqa: E402
from lavis_point.datasets.batching import PerItem  # noqa: E402
from lavis_point.datasets.cap3d import locate_clouds, read_annotations  # noqa: E402


def make_pickles(root, n, num_points):
    import pickle
    os.makedirs(os.path.join(root, "clouds"), exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        cloud = np.concatenate([rng.normal(size=(num_points, 3)), rng.random((num_points, 3))], axis=1)
        with open(os.path.join(root, "clouds", f"obj{i:06d}.pkl"), "wb") as f:
            pickle.dump(cloud.astype(np.float32), f)
    rows = [{"point": f"obj{i:06d}.pkl", "caption": f"object {i}"} for i in range(n)]
    path = os.path.join(root, "annotations", "train.json")
    with open(path, "w") as f:
        json.dump(rows, f)
    return path


def evict(folder):
    """Drop ``folder``'s files from the page cache (advice, honoured by Linux for clean pages)."""
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_mb_per_s(folder):
    """MB/s of plain sequential reads of every file in ``folder`` after evicting it: what the disk
    gives, to set beside a cold pass's MB/s."""
    evict(folder)
    started, total = time.perf_counter(), 0
    for name in sorted(os.listdir(folder)):
        with open(os.path.join(folder, name), "rb", buffering=0) as f:
            while chunk := f.read(1 << 23):
                total += len(chunk)
    return total / (time.perf_counter() - started) / 1e6


def dataset(root, source):
    cfg = OmegaConf.load(registry.get_builder_class("cap3d_point_caption").default_config_path())
    cfg = cfg.datasets.cap3d_point_caption
    cfg.build_info = OmegaConf.merge(cfg.build_info, {"root": root, "source": source, "splits": ["train"]})
    return registry.get_builder_class("cap3d_point_caption")(cfg).build_datasets()["train"]


def rate(ds, order, what, batch_size):
    started = time.perf_counter()
    if what == "read":
        for i in order:
            np.asarray(ds.cloud_of(ds.annotations[i]), dtype=np.float32)  # materialised, as items are
    else:
        loader = torch.utils.data.DataLoader(ds if what == "batched" else PerItem(ds), batch_size=batch_size,
                                             sampler=order.tolist(), num_workers=0, collate_fn=ds.collater)
        for _ in loader:
            pass
    return len(order) / (time.perf_counter() - started)


def stages(ds, order, batch_size, repeats):
    """Microseconds per cloud of a warm batched pass: in all (a loader pass); finding the batches'
    clouds (``parts_of``: for pickles the file reads, open + restricted unpickle + validation; for
    shards only grouping the index entries by shard file); the processor's kernel (``batch_from``:
    for shards it also reads the rows from the memory map, converting float16 as it goes); and the
    rest (items, captions, collate). Medians over ``repeats``, the parts timed right beside the whole."""
    runs = []
    for _ in range(repeats):
        find = kernel = 0.0
        for start in range(0, len(order), batch_size):
            anns = [ds.annotations[i] for i in order[start:start + batch_size]]
            t0 = time.perf_counter()
            parts = ds.parts_of(anns)
            t1 = time.perf_counter()
            ds.vis_processor.batch_from(parts, len(anns))
            find, kernel = find + t1 - t0, kernel + time.perf_counter() - t1
        total = len(order) / rate(ds, order, "batched", batch_size)
        runs.append((total, find, kernel, total - find - kernel))
    names = ("total", "find clouds (pickles: read files)", "kernel (shards: read rows too)",
             "rest (items, captions, collate)")
    return {name: round(float(np.median([r[k] for r in runs])) / len(order) * 1e6, 1) for k, name in enumerate(names)}


def run_batch_size():
    run = OmegaConf.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                      "projects", "cap3d", "stage1.yaml")).run
    return int(run.batch_size_train)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clouds", type=int, default=2000)
    parser.add_argument("--num-points", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=None, help="default: the Cap3D stage-1 run's")
    parser.add_argument("--repeats", type=int, default=3, help="passes per measurement (the median is kept)")
    parser.add_argument("--workdir", default=None, help="where to write the clouds (default: a temp folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    batch_size = args.batch_size or run_batch_size()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.workdir) as root:
        annotations = make_pickles(root, args.clouds, args.num_points)
        located, missing = locate_clouds(read_annotations(annotations), os.path.join(root, "clouds"))
        started = time.perf_counter()
        convert_split(located, missing, os.path.join(root, "clouds"), os.path.join(root, "shards"), "train",
                      num_points=args.num_points, workers=os.cpu_count(), progress=False)
        print(json.dumps({"converted": args.clouds, "convert_s": round(time.perf_counter() - started, 2)}))
        datasets = {"pickles": dataset(root, "files"), "shards": dataset(root, "shards")}
        folders = {"pickles": os.path.join(root, "clouds"), "shards": os.path.join(root, "shards")}
        order = np.random.default_rng(1).permutation(args.clouds)
        for source in datasets:  # compile the processor's kernel outside the timings
            datasets[source].__getitems__(order[:2].tolist())
        results = {}
        for what in ("read", "per_item", "batched"):
            for cache in ("cold", "warm"):
                runs = {"pickles": [], "shards": []}
                for _ in range(args.repeats):  # sources alternate, so both meet the same load
                    for source in ("pickles", "shards"):
                        if cache == "cold":
                            evict(folders[source])
                        else:
                            rate(datasets[source], order, "read", batch_size)  # fill the cache
                        runs[source].append(rate(datasets[source], order, what, batch_size))
                for source, rates in runs.items():
                    results[(what, cache, source)] = r = float(np.median(rates))
                    print(json.dumps({"measure": what, "cache": cache, "source": source, "clouds_per_s": round(r, 1),
                                      "runs": [round(x, 1) for x in rates]}))
        for source in ("pickles", "shards"):  # is a cold pass disk-bound? the disk's own rate beside it
            raw = [raw_read_mb_per_s(folders[source]) for _ in range(args.repeats)]
            folder_mb = sum(os.path.getsize(os.path.join(folders[source], n)) for n in os.listdir(folders[source])) / 1e6
            print(json.dumps({"measure": "raw sequential read of the files", "cache": "cold", "source": source,
                              "mb_per_s": round(float(np.median(raw)), 1), "runs": [round(x, 1) for x in raw],
                              "batched_cold_mb_per_s": round(results[("batched", "cold", source)] * folder_mb
                                                             / args.clouds, 1)}))
        for source in ("pickles", "shards"):  # where a warm batched pass spends its time, per cloud
            print(json.dumps({"source": source, "us_per_cloud": stages(datasets[source], order, batch_size,
                                                                       args.repeats)}))
        measures = ("read", "per_item", "batched")
        ratios = {f"{what}_{cache}": round(results[(what, cache, "shards")] / results[(what, cache, "pickles")], 2)
                  for what in measures for cache in ("cold", "warm")}
        print(json.dumps({"shards_over_pickles": ratios, "clouds": args.clouds, "num_points": args.num_points,
                          "batch_size": batch_size, "cpus": os.cpu_count(),
                          "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]}))


if __name__ == "__main__":
    main()
