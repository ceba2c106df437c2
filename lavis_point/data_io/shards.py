"""The shard format training reads: contiguous float16 (n, P, 6) ``.npy`` arrays, memory-mapped, plus a
JSONL index with one entry per cloud.

Two layouts, both read by ``ShardedClouds``:
  one file:   ``{split}_points.npy``; entries carry ``index`` (the row)
  many files: ``{split}_points_00000.npy``, ``..._00001.npy``, ... (what scripts/convert_points.py
              writes, one per chunk, so a conversion can resume); entries carry ``shard`` (the file
              name) and ``index`` (the row in it)
"""
import os

import numpy as np


def single_shard_name(split):
    return f"{split}_points.npy"


def shard_name(split, number):
    return f"{split}_points_{number:05d}.npy"


def rows_in_file_order(shard, rows, positions):
    """(shard, rows, positions) sorted by row: a kernel reading the rows in this order reads the file
    front to back. positions[k] is where rows[k] goes in the batch."""
    rows, positions = np.asarray(rows, dtype=np.int64), np.asarray(positions, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    return shard, rows[order], positions[order]


class ShardedClouds:
    """``clouds[entry]`` -> the (P, 6) float16 row an index entry points at. Shards are memory-mapped
    on first use in each process, so DataLoader workers share the page cache and hold no copies."""

    def __init__(self, folder, split):
        self.folder, self.default = folder, single_shard_name(split)
        self._open = {}

    def shard(self, name):
        array = self._open.get(name)
        if array is None:
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: point shard named by the index is missing")
            array = self._open[name] = np.load(path, mmap_mode="r", allow_pickle=False)
        return array

    def __getitem__(self, entry):
        return self.shard(entry.get("shard", self.default))[entry["index"]]

    def parts(self, entries):
        """Where the clouds of many entries lie: one (shard, rows, positions) per shard file, the rows
        in file order, positions[k] the entry that rows[k] belongs to (what ``batch_from`` takes)."""
        by_shard = {}
        for k, entry in enumerate(entries):
            by_shard.setdefault(entry.get("shard", self.default), []).append(k)
        return [rows_in_file_order(self.shard(name), [entries[k]["index"] for k in ks], ks)
                for name, ks in by_shard.items()]

    def __getstate__(self):  # memory maps are reopened, not pickled, when workers are spawned
        return {"folder": self.folder, "default": self.default, "_open": {}}
