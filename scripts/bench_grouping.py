"""Grouping speed: 8192 -> 512 FPS plus 32-NN for a batch of surface clouds, the pure-torch
reference vs the path the encoder uses, in one process, same thread count for both.

Reference: the per-step torch FPS loop (``grouping.reference_farthest_point_sample``) and the
straightforward torch kNN (cdist + top-k, what the encoder ran before the kernels). Also times the
torch fallback kNN, and checks that the fast path's centres and neighbours equal the reference's.

    python scripts/bench_grouping.py [--batch 8] [--threads 1]
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch

from lavis_point.datasets.shapes import SHAPES, sample_cloud
from lavis_point.models import grouping, grouping_kernels


def median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--points", type=int, default=8192)
    parser.add_argument("--groups", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="for torch and numba alike")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # the kernels run as many clouds at once as torch has threads
    rng = np.random.default_rng(0)
    xyz = torch.from_numpy(np.stack([
        sample_cloud(SHAPES[i % len(SHAPES)], "red", "large", rng, args.points)[:, :3] for i in range(args.batch)
    ]))
    print(f"batch {args.batch} x {args.points} points -> {args.groups} centres x {args.group_size} neighbours; "
          f"threads {args.threads}; kernels {'numba' if grouping_kernels.available() else 'absent (torch path)'}")
    print(f"load average before: {os.getloadavg()[0]:.2f}")

    grouping.farthest_point_sample(xyz[:, :256], 8)  # compile (or load the compiled cache) first
    grouping.knn(xyz[:, :256], xyz[:, :8], 4)
    ref_idx = grouping.reference_farthest_point_sample(xyz, args.groups)
    centres = torch.gather(xyz, 1, ref_idx.unsqueeze(-1).expand(-1, -1, 3))

    k = args.group_size
    timings = {
        "reference FPS loop": median_ms(lambda: grouping.reference_farthest_point_sample(xyz, args.groups),
                                        args.repeats),
        "reference kNN (cdist + top-k)": median_ms(
            lambda: torch.cdist(centres, xyz).topk(k, dim=-1, largest=False), args.repeats),
        "torch fallback kNN": median_ms(lambda: grouping.torch_knn(xyz, centres, k), args.repeats),
        "fast FPS": median_ms(lambda: grouping.farthest_point_sample(xyz, args.groups), 4 * args.repeats),
        "fast kNN": median_ms(lambda: grouping.knn(xyz, centres, k), 4 * args.repeats),
    }
    for name, ms in timings.items():
        print(f"  {name:32s} {ms:9.1f} ms")
    ref = timings["reference FPS loop"] + timings["reference kNN (cdist + top-k)"]
    fast = timings["fast FPS"] + timings["fast kNN"]
    print(f"FPS ratio  {timings['reference FPS loop'] / timings['fast FPS']:.1f}x")
    print(f"kNN ratio  {timings['reference kNN (cdist + top-k)'] / timings['fast kNN']:.1f}x")
    print(f"grouping (FPS + kNN): reference {ref:.1f} ms, fast {fast:.1f} ms, ratio {ref / fast:.1f}x")

    same_centres = torch.equal(grouping.farthest_point_sample(xyz, args.groups), ref_idx)
    same_neighbours = torch.equal(grouping.knn(xyz, centres, k), grouping.reference_knn(xyz, centres, k))
    print(f"identical to the reference: centres {same_centres}, neighbours {same_neighbours}")
    print(f"load average after: {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")
    if not (same_centres and same_neighbours):
        raise SystemExit("the fast path disagrees with the reference")


if __name__ == "__main__":
    main()
