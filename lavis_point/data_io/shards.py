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


def read_rows(shard, index) -> np.ndarray:
    """shard[index] for many rows in one read: the rows are fetched in file order (sequential on disk,
    one fancy index) and returned in the order asked. (len(index), P, 6)."""
    index = np.asarray(index, dtype=np.int64)
    order = np.argsort(index, kind="stable")
    rows = np.empty((len(index),) + shard.shape[1:], shard.dtype)
    rows[order] = shard[index[order]]
    return rows


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

    def rows(self, entries) -> np.ndarray:
        """The rows of many entries, in their order: one ``read_rows`` per shard file. (len, P, 6)."""
        by_shard = {}
        for k, entry in enumerate(entries):
            by_shard.setdefault(entry.get("shard", self.default), []).append(k)
        out = None
        for name, ks in by_shard.items():
            shard = self.shard(name)
            if out is None:
                out = np.empty((len(entries),) + shard.shape[1:], shard.dtype)
            out[ks] = read_rows(shard, [entries[k]["index"] for k in ks])  # ValueError if shards' shapes differ
        return out

    def __getstate__(self):  # memory maps are reopened, not pickled, when workers are spawned
        return {"folder": self.folder, "default": self.default, "_open": {}}
