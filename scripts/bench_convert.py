"""Converter speed per cloud: ``convert.load_for_shard`` (read, validate, centring test, float16) against
the numpy version it replaced (kept below as the baseline), in one process, on the same pickles.

Cap3D-like clouds (8192 x 6 float32, rgb in [0, 1]) are written to a temporary folder and read warm
(page cache), so the figure is the CPU work a converter worker does per cloud; both versions must
store the same bytes.

    python scripts/bench_convert.py [--clouds 300] [--repeats 3]
"""
import argparse
import os
import pickle
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lavis_point.data_io.clouds import read_cloud  # noqa: E402
from lavis_point.data_io.convert import CENTRE_ABOVE, FLOAT16_MAX, id_seed, load_for_shard  # noqa: E402


def numpy_load_for_shard(task):
    """The baseline: the same decisions with numpy's (N, 3) reductions and ``astype(np.float16)``."""
    path, object_id, num_points = task
    cloud = read_cloud(path, white_if_missing=True, mesh_points=num_points, seed=id_seed(object_id))
    xyz = cloud[:, :3].astype(np.float64)
    centre = xyz.mean(axis=0)
    radius = float(np.sqrt(((xyz - centre) ** 2).sum(axis=1).max()))
    peak = float(np.abs(xyz).max())
    if peak > CENTRE_ABOVE * radius or peak > FLOAT16_MAX:
        return "ok", np.concatenate([xyz - centre, cloud[:, 3:]], axis=1).astype(np.float16), centre
    return "ok", cloud.astype(np.float16), None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clouds", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        tasks = []
        for i in range(args.clouds):
            cloud = np.concatenate([rng.normal(size=(8192, 3)), rng.random((8192, 3))], axis=1).astype(np.float32)
            path = os.path.join(folder, f"{i}.pkl")
            with open(path, "wb") as f:
                pickle.dump(cloud, f)
            tasks.append((path, str(i), 8192))
        for fn in (load_for_shard, numpy_load_for_shard):  # warm: page cache, compiled kernels
            fn(tasks[0])
        for a, b in zip(map(load_for_shard, tasks), map(numpy_load_for_shard, tasks)):
            assert np.array_equal(a[1].view(np.uint16), b[1].view(np.uint16)), "the two store different bytes"
        print(f"{args.clouds} clouds of 8192 x 6 float32, warm; load average {os.getloadavg()[0]:.2f}")
        for repeat in range(args.repeats):
            times = {}
            for name, fn in (("numpy (before)", numpy_load_for_shard), ("load_for_shard", load_for_shard)):
                start = time.perf_counter()
                for task in tasks:
                    fn(task)
                times[name] = (time.perf_counter() - start) / len(tasks) * 1e6
            print(f"run {repeat + 1}: " + ", ".join(f"{k} {v:.0f} us/cloud" for k, v in times.items())
                  + f"; {times['numpy (before)'] / times['load_for_shard']:.1f}x")


if __name__ == "__main__":
    main()
