"""The shard format training reads: contiguous float16 (n, P, 6) ``.npy`` arrays, memory-mapped, plus a
JSONL index with one entry per cloud.

Two layouts, both read by ``ShardedClouds``:
  one file:   ``{split}_points.npy``; entries carry ``index`` (the row)
  many files: ``{split}_points_00000.npy``, ``..._00001.npy``, ... (what scripts/convert_points.py
              writes, one per chunk, so a conversion can resume); entries carry ``shard`` (the file
              name) and ``index`` (the row in it)

Beside a shard ``X.npy`` the conversion writes ``X_stats.npy``: (n, 5) float64, each cloud's centre,
radius and colour range (``cloud_statistics``), which lets the processor transform the cloud in one
pass. Shards without one (written before, or by hand) are read the same way and processed in three
passes, which find those statistics from the rows.
"""
import logging
import os

import numpy as np


# Memory maps one process keeps open (one file descriptor each; the soft limit is often 1024).
MAX_OPEN_SHARDS = 128


def single_shard_name(split):
    return f"{split}_points.npy"


def shard_name(split, number):
    return f"{split}_points_{number:05d}.npy"


def stats_name(shard):
    return shard[:-len(".npy")] + "_stats.npy"


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
        self._open, self._stats = {}, {}

    def shard(self, name):
        """The shard's memory map. Each holds a file descriptor, so a process keeps the
        MAX_OPEN_SHARDS used last and lets go of older ones (closed once no row of theirs is held)."""
        array = self._open.pop(name, None)
        if array is None:
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: point shard named by the index is missing")
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        self._open[name] = array  # the most recently used last
        if len(self._open) > MAX_OPEN_SHARDS:
            del self._open[next(iter(self._open))]
        return array

    def stats(self, name):
        """The shard's per-cloud statistics (read once per process), or None when it has none or they
        do not fit the shard (a warning names the file; its clouds then take the three-pass path)."""
        if name not in self._stats:
            path, stats = os.path.join(self.folder, stats_name(name)), None
            if os.path.isfile(path):
                try:
                    stats = np.load(path, allow_pickle=False)
                    problem = None if stats.shape == (len(self.shard(name)), 5) and stats.dtype == np.float64 \
                        else f"{stats.dtype} {stats.shape}"
                except (OSError, ValueError) as e:
                    problem = str(e)
                if problem:
                    logging.warning(f"{path}: expected ({len(self.shard(name))}, 5) float64 statistics of the "
                                    f"shard's clouds, got {problem}; ignored (the clouds are processed without)")
                    stats = None
            self._stats[name] = stats
        return self._stats[name]

    def __getitem__(self, entry):
        return self.shard(entry.get("shard", self.default))[entry["index"]]

    def parts(self, entries):
        """Where the clouds of many entries lie: one (shard, rows, positions, stats) per shard file, the
        rows in file order, positions[k] the entry that rows[k] belongs to, stats the shard's statistics
        or None (what ``batch_from`` takes)."""
        by_shard = {}
        for k, entry in enumerate(entries):
            by_shard.setdefault(entry.get("shard", self.default), []).append(k)
        return [rows_in_file_order(self.shard(name), [entries[k]["index"] for k in ks], ks) + (self.stats(name),)
                for name, ks in by_shard.items()]

    def __getstate__(self):  # memory maps are reopened, not pickled, when workers are spawned
        return {"folder": self.folder, "default": self.default, "_open": {}, "_stats": {}}
