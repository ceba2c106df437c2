"""Clouds per second through the training dataset (cap3d_point_caption), from converted shards vs from
one pickle per cloud, on the same clouds in the same run.

Both read the same N Cap3D-like clouds (8192 x 6 float32, one pickle each, GPT4Point-style annotation
JSON), converted once to shards. Each pass visits every item in one shuffled order (as training does),
measured twice: "read" (dataset.cloud_of to a float32 array: the part the storage decides) and "item"
(dataset[i]: read + the training processor at 8192 points). "cold" passes first evict every file from
the page cache (posix_fadvise DONTNEED), as when a dataset is larger than memory; "warm" passes reread
what is cached. Prints one JSON line per measurement and the shard/pickle ratios last.

    python scripts/bench_data.py [--clouds 2000]
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lavis_point  # noqa: E402,F401
from lavis.common.registry import registry  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lavis_point.data_io.convert import convert_split  # noqa: E402
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


def dataset(root, source):
    cfg = OmegaConf.load(registry.get_builder_class("cap3d_point_caption").default_config_path())
    cfg = cfg.datasets.cap3d_point_caption
    cfg.build_info = OmegaConf.merge(cfg.build_info, {"root": root, "source": source, "splits": ["train"]})
    return registry.get_builder_class("cap3d_point_caption")(cfg).build_datasets()["train"]


def rate(ds, order, what):
    fetch = (lambda i: ds.cloud_of(ds.annotations[i])) if what == "read" else ds.__getitem__
    started = time.perf_counter()
    for i in order:
        np.asarray(fetch(i), dtype=np.float32) if what == "read" else fetch(i)  # materialised, as items are
    return len(order) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clouds", type=int, default=2000)
    parser.add_argument("--num-points", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="where to write the clouds (default: a temp folder)")
    args = parser.parse_args()
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
        results = {}
        for what in ("read", "item"):
            for cache in ("cold", "warm"):
                for source in ("pickles", "shards"):
                    if cache == "cold":
                        evict(folders[source])
                    else:
                        rate(datasets[source], order, "read")  # fill the cache
                    results[(what, cache, source)] = r = rate(datasets[source], order, what)
                    print(json.dumps({"measure": what, "cache": cache, "source": source,
                                      "clouds_per_s": round(r, 1)}))
        ratios = {f"{what}_{cache}": round(results[(what, cache, "shards")] / results[(what, cache, "pickles")], 2)
                  for what in ("read", "item") for cache in ("cold", "warm")}
        print(json.dumps({"shards_over_pickles": ratios, "clouds": args.clouds, "num_points": args.num_points,
                          "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
