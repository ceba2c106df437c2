"""Annotations + a folder of clouds (or meshes) -> the shard format training reads (shards.py).

Work goes chunk by chunk: chunk k's good clouds become ``{split}_points_{k:05d}.npy`` (float16,
(n_k, num_points, 6)) and ``{split}_points_{k:05d}_stats.npy`` (each cloud's centre, radius and
colour range, from the float16 values as stored: the processor then needs one pass per cloud), then
``{split}_points_{k:05d}.json`` records its index entries and bad files.
Both are written under a temporary name and renamed, so a chunk is either finished or absent. The
record lists each object of the chunk with its file's path, size and modification time: run again
(after an interruption, or after the annotations or files changed), a finished chunk is kept only when
that list is still the same, and converted again otherwise (the report says why); other
``num_points`` or ``shard_size`` are refused. When every chunk is done, ``{split}.jsonl`` (the index,
its captions from this run's annotations) and ``{split}_report.json`` (counts, each bad file and why,
each chunk converted again and why) are written; a run removes both before it changes any chunk, so an
interrupted one leaves no index pointing at rewritten chunks. Clouds are stored as read (xyz as is, rgb
in [0, 1], white when absent), except one far from the origin for its size, which is stored centred (see
``CENTRE_ABOVE``); a cloud with other than ``num_points`` points is resampled to it, with a seed from
its id so reruns agree.
"""
import hashlib
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numba
import numpy as np
import torch
from tqdm import tqdm

from lavis_point.data_io.clouds import CloudReadError, read_cloud
from lavis_point.data_io.shards import shard_name, stats_name
from lavis_point.processors.point_processors import cloud_statistics, resample

FLOAT16_MAX = float(np.finfo(np.float16).max)
# float16's spacing grows with the magnitude, so a cloud whose largest |coordinate| is many times its
# radius about its centre keeps little of its shape (a unit sphere at 3000 becomes one point). Past
# this ratio (2 bits fewer than the centred cloud would keep) the cloud is stored minus its centre,
# which its index entry records as "offset"; clouds near the origin (ratio about 1-2) stay as read.
CENTRE_ABOVE = 4.0


def id_seed(object_id) -> int:
    return int(hashlib.sha1(str(object_id).encode()).hexdigest()[:8], 16)


def split_by_id(entries, fractions) -> dict:
    """{split: entries}: each object goes to a split chosen by a hash of its id (stable across runs and
    annotation order). ``fractions``: {split: share}, shares summing to 1."""
    names, shares = list(fractions), np.cumsum(list(fractions.values()))
    if not np.isclose(shares[-1], 1.0):
        raise ValueError(f"split fractions {dict(fractions)} must sum to 1")
    out = {name: [] for name in names}
    for entry in entries:
        u = id_seed(entry["id"]) / 0xFFFFFFFF
        out[names[min(int(np.searchsorted(shares, u, side="right")), len(names) - 1)]].append(entry)
    return out


@numba.njit(cache=True, nogil=True)
def _placement(cloud):
    """(centre x, y, z, radius about the centre, largest |coordinate|) of a cloud's xyz, in float64:
    one compiled pass each (numpy's reductions over (N, 3) took ~450 us per 8192-point cloud)."""
    n = cloud.shape[0]
    cx = cy = cz = peak = 0.0
    for i in range(n):
        x, y, z = np.float64(cloud[i, 0]), np.float64(cloud[i, 1]), np.float64(cloud[i, 2])
        cx, cy, cz = cx + x, cy + y, cz + z
        peak = max(peak, abs(x), abs(y), abs(z))
    cx, cy, cz = cx / n, cy / n, cz / n
    r2 = 0.0
    for i in range(n):
        dx, dy, dz = cloud[i, 0] - cx, cloud[i, 1] - cy, cloud[i, 2] - cz
        r2 = max(r2, dx * dx + dy * dy + dz * dz)
    return cx, cy, cz, np.sqrt(r2), peak


def float16_of(cloud: np.ndarray) -> np.ndarray:
    """float32 -> float16, rounded to nearest even as numpy's ``astype`` does (the same value for every
    finite float32: tests/test_convert_points.py), in a vectorised loop ~15x faster than numpy's."""
    return torch.from_numpy(np.ascontiguousarray(cloud, dtype=np.float32)).to(torch.float16).numpy()


def load_for_shard(task):
    """(path, id, num_points) -> ("ok", float16 (num_points, 6), None or {"offset", "reason"} when stored
    centred) or ("bad", reason, None). Runs in workers."""
    path, object_id, num_points = task
    try:
        cloud = read_cloud(path, white_if_missing=True, mesh_points=num_points, seed=id_seed(object_id))
        if len(cloud) != num_points:
            cloud = resample(cloud, num_points, np.random.default_rng(id_seed(object_id)))
        *centre, radius, peak = _placement(cloud)
        if not (peak > CENTRE_ABOVE * radius or peak > FLOAT16_MAX):
            return "ok", float16_of(cloud), None  # stored as read
        moved = {"offset": list(centre), "reason": f"coordinates reach {peak:.4g} for a radius of "
                 f"{radius:.3g}: stored relative to its centre (the offset), float16 would lose its shape"}
        xyz = cloud[:, :3].astype(np.float64) - np.asarray(centre)
        if float(np.abs(xyz).max()) > FLOAT16_MAX:
            raise CloudReadError(path, f"its radius {radius:.3g} is beyond float16's range; normalise first")
        # float64 -> float16 in one rounding (through float32 would round twice)
        return "ok", np.concatenate([xyz, cloud[:, 3:]], axis=1).astype(np.float16), moved
    except CloudReadError as e:
        return "bad", e.reason, None
    except Exception as e:  # e.g. MemoryError on an absurd header: still one reported bad file
        return "bad", f"{type(e).__name__}: {e}", None


def _replace_atomically(path, write):
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        write(f)
        # on disk before the rename, or after a power loss the new name could stand for lost data
        # (a chunk record vouching for a shard whose bytes never arrived)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # the rename itself, so that the files appear in the order they were written
        fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # some filesystems refuse to fsync a directory
        pass


def _write_chunk(out, split, number, clouds, entries, bad, centred, sources):
    name = shard_name(split, number)
    # An earlier conversion's files of this chunk go, its record first: a rewrite interrupted between
    # the shard and its record must read as unfinished, not as the old chunk (whose sources might
    # come back while the shard is new); a chunk with no good cloud now must not keep an old shard.
    for stale in (name[:-4] + ".json", name, stats_name(name)):
        if os.path.isfile(os.path.join(out, stale)):
            os.remove(os.path.join(out, stale))
    if clouds:
        stacked = np.stack(clouds)
        _replace_atomically(os.path.join(out, name), lambda f: np.save(f, stacked))
        _replace_atomically(os.path.join(out, stats_name(name)), lambda f: np.save(f, cloud_statistics(stacked)))
    record = json.dumps({"entries": entries, "bad": bad, "centred": centred, "sources": sources}).encode()
    _replace_atomically(os.path.join(out, name[:-4] + ".json"), lambda f: f.write(record))


def _check_manifest(out, split, settings):
    """Refuses a folder whose conversion used other settings: every chunk would change."""
    path = os.path.join(out, f"{split}_manifest.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            started = json.load(f)
        changed = [f"{k}: {started.get(k)} -> {value}" for k, value in settings.items() if started.get(k) != value]
        if changed:
            raise ValueError(f"{path}: this folder holds a conversion started with other settings "
                             f"({'; '.join(changed)}); use another output folder or delete its {split}_* files")
    _replace_atomically(path, lambda f: f.write(json.dumps(settings, indent=1).encode()))


def _sources(chunk, folder):
    """What decides a chunk's clouds: each object's id, file (relative to the folder), size and mtime."""
    listed = []
    for e in chunk:
        try:
            st = os.stat(e["path"])
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:  # a dangling link, a file gone since: load_for_shard reports it as a bad file
            size = mtime = None
        listed.append([e["id"], os.path.relpath(e["path"], folder), size, mtime])
    return listed


def _why_redo(record_path, sources):
    """None when the finished chunk at record_path (if any) was made from these sources, else why not."""
    if not os.path.isfile(record_path):
        return "not converted yet"
    try:
        with open(record_path, encoding="utf-8") as f:
            done = json.load(f).get("sources")
    except (OSError, ValueError) as e:  # truncated by a crash, say
        return f"its record cannot be read ({e})"
    if done is None:
        return "written by an earlier lavis-point, which did not list its files"
    for was, now in zip(done, sources):
        if was[:2] != now[:2]:
            return f"it held {was[0]} ({was[1]}), now {now[0]} ({now[1]}): the annotations changed"
        if now[2] is None:  # could not be read then (and was a bad file): tried again
            return f"{now[1]} could not be found when the chunk was converted"
        if was != now:
            return f"{now[1]} changed (size or modification time) since it was converted"
    return None if len(done) == len(sources) else f"it held {len(done)} objects, now {len(sources)}"


def _remove_chunks_from(out, split, first):
    """Deletes this split's chunk files numbered ``first`` and up: left by an earlier conversion of more
    objects, they would otherwise lie beside the new index unused."""
    pattern = re.compile(re.escape(split) + r"_points_(\d{5})(_stats)?\.(npy|json)(\.partial)?")
    for name in os.listdir(out):
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) >= first:
            os.remove(os.path.join(out, name))


WORKER_DIED = "the worker converting it died (killed by the system, e.g. out of memory, or a crash in native code)"


def _executor(workers):
    # One torch thread per worker: float16_of runs torch, whose default pool of cpu_count threads per
    # worker oversubscribes the CPU, and whose OpenMP state, forked from a parent that ran a parallel
    # torch op, deadlocks the worker's first parallel op unless it is single-threaded first.
    return ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,))


class _Loader:
    """load_for_shard over a chunk's tasks, in order, in ``workers`` processes (0: in this one). A worker
    that dies (the OOM killer, a crash in native code) breaks the whole pool, so the tasks not yet
    answered are then run one at a time, each death costing exactly its own object."""

    def __init__(self, workers):
        self.workers, self.pool = workers, None

    def results(self, tasks):
        if not self.workers:
            yield from map(load_for_shard, tasks)
            return
        done = 0
        try:
            self.pool = self.pool or _executor(self.workers)
            for result in self.pool.map(load_for_shard, tasks, chunksize=8):
                yield result
                done += 1
            return
        except BrokenProcessPool:
            self.close()  # the next chunk gets a fresh pool
        alone = None
        try:
            for task in tasks[done:]:
                alone = alone or _executor(1)
                try:
                    result = alone.submit(load_for_shard, task).result()
                except BrokenProcessPool:  # this task's worker died: a fresh one for the next
                    alone.shutdown(wait=False)
                    alone, result = None, ("bad", WORKER_DIED, None)
                yield result
        finally:
            if alone:
                alone.shutdown(wait=False, cancel_futures=True)

    def close(self):
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.pool = None


def convert_split(entries, missing, folder, out, split, num_points=8192, shard_size=2048, workers=0,
                  progress=True) -> dict:
    """Convert located ``entries`` (each with "path"); ``missing`` ones are reported as bad. Returns the
    report (also written to ``{out}/{split}_report.json``)."""
    if not entries and missing:  # all chunks would go: more likely a wrong or unmounted folder
        raise ValueError(f"none of the {len(missing)} objects has a cloud file in {folder}; check --clouds "
                         f"(a mount that is not up?); nothing in {out} was changed")
    os.makedirs(out, exist_ok=True)
    _check_manifest(out, split, {"num_points": num_points, "shard_size": shard_size})
    # The old index and report go before any chunk changes: left beside rewritten chunks by an
    # interruption, the index would map ids to rows that now hold other clouds. _finish writes both.
    for name in (f"{split}.jsonl", f"{split}_report.json"):
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    chunks = [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)]
    record_path = [os.path.join(out, shard_name(split, k)[:-4] + ".json") for k in range(len(chunks))]
    sources = [_sources(chunk, folder) for chunk in chunks]
    why = [_why_redo(path, listed) for path, listed in zip(record_path, sources)]
    _remove_chunks_from(out, split, len(chunks))
    todo = [k for k in range(len(chunks)) if why[k]]
    bar = tqdm(total=len(entries), initial=len(entries) - sum(len(chunks[k]) for k in todo), unit="cloud",
               desc=f"converting {split}", disable=not progress)
    loader = _Loader(workers)
    try:
        for k in todo:
            tasks = [(e["path"], e["id"], num_points) for e in chunks[k]]
            results = loader.results(tasks)
            clouds, index, bad, centred = [], [], [], []
            for entry, (status, value, moved) in zip(chunks[k], results):
                source = os.path.relpath(entry["path"], folder)
                if status == "ok":
                    # no captions: the index takes them from the current annotations (_finish)
                    index.append({"id": entry["id"], "shard": shard_name(split, k), "index": len(clouds),
                                  "source": source})
                    clouds.append(value)
                    if moved:
                        index[-1]["offset"] = moved["offset"]
                        centred.append({"id": entry["id"], "path": source, **moved})
                else:
                    bad.append({"id": entry["id"], "path": source, "reason": value})
                bar.update(1)
            _write_chunk(out, split, k, clouds, index, bad, centred, sources[k])
    finally:
        bar.close()
        loader.close()
    redone = [{"chunk": k, "why": why[k]} for k in todo if why[k] != "not converted yet"]
    return _finish(out, split, record_path, missing, folder, {e["id"]: e["captions"] for e in entries}, redone)


def _finish(out, split, record_path, missing, folder, captions, redone):
    index, bad = [], [{"id": e["id"], "path": e.get("point"),
                       "reason": e.get("reason") or f"no cloud file found in {folder}"} for e in missing]
    centred = []
    for path in record_path:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        index.extend({**entry, "captions": captions[entry["id"]]} for entry in record["entries"])
        bad.extend(record["bad"])
        centred.extend(record.get("centred", []))
    lines = "".join(json.dumps(entry) + "\n" for entry in index).encode()
    _replace_atomically(os.path.join(out, f"{split}.jsonl"), lambda f: f.write(lines))
    report = {"split": split, "objects": len(index) + len(bad), "converted": len(index), "bad": len(bad),
              "bad_files": bad, "centred": len(centred), "centred_files": centred, "reconverted": redone}
    _replace_atomically(os.path.join(out, f"{split}_report.json"),
                        lambda f: f.write(json.dumps(report, indent=1).encode()))
    return report
