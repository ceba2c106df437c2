"""scripts/convert_points.py and data_io/convert.py: a folder mixing good and bad files -> shards."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from lavis_point.data_io import convert
from lavis_point.data_io.shards import ShardedClouds, stats_name
from lavis_point.datasets.cap3d import locate_clouds, read_annotations
from lavis_point.processors.point_processors import PointTrainProcessor, cloud_statistics
from tests.seeded import seeded
from tests import point_files as pf
from tests.rounding import assert_within_rounding, one_pass_tolerance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_convert(annotations, folder, out, **kwargs):
    located, missing = locate_clouds(read_annotations(annotations), folder)
    return convert.convert_split(located, missing, folder, out, "train", progress=False, **kwargs)


def index_of(out, split="train"):
    with open(os.path.join(out, f"{split}.jsonl")) as f:
        return {entry["id"]: entry for entry in map(json.loads, f)}


@pytest.fixture
def mixed(tmp_path):
    marker = tmp_path / "marker"
    annotations, good, bad = pf.mixed_folder(str(tmp_path / "clouds"), marker)
    return annotations, str(tmp_path / "clouds"), good, bad, marker


def test_good_clouds_land_in_shards_bit_exact_and_bad_ones_are_reported(mixed, tmp_path):
    annotations, folder, good, bad, marker = mixed
    out = str(tmp_path / "shards")
    report = run_convert(annotations, folder, out, num_points=2048, shard_size=4, workers=2)
    assert not marker.exists()  # the pickle whose __reduce__ opens a file never ran
    assert (report["objects"], report["converted"], report["bad"]) == (len(good) + len(bad), len(good), len(bad))
    reasons = {b["id"]: b["reason"] for b in report["bad_files"]}
    assert set(reasons) == set(bad)
    for object_id, fragment in bad.items():
        assert fragment in reasons[object_id], (object_id, reasons[object_id])
    with open(os.path.join(out, "train_report.json")) as f:
        assert json.load(f) == report

    index, clouds = index_of(out), ShardedClouds(out, "train")
    assert set(index) == set(good)
    assert report["centred"] == 0 and not any("offset" in entry for entry in index.values())  # stored as read
    for object_id, expected in good.items():
        row = clouds[index[object_id]]
        assert row.dtype == np.float16 and row.shape == (2048, 6)
        assert index[object_id]["captions"] == [f"a thing called {object_id}"]
        if expected is not None:
            assert np.array_equal(row, expected.astype(np.float16)), object_id
    mesh = clouds[index["mesh0"]].astype(np.float32)
    assert np.all(mesh[:, 2] == 0) and np.allclose(mesh[:, 3:], [1, 0, 0])
    shards = sorted({entry["shard"] for entry in index.values()})
    assert len(shards) > 1 and all(np.load(os.path.join(out, n), mmap_mode="r").dtype == np.float16 for n in shards)
    for name in shards:  # each shard's statistics, of its float16 values as stored
        assert np.array_equal(np.load(os.path.join(out, stats_name(name))), cloud_statistics(clouds.shard(name)))
    assert sorted(n for n in os.listdir(out) if n.endswith(".npy")) == sorted(shards + [stats_name(n) for n in shards])


def test_shards_converted_with_or_without_statistics_give_the_same_batches_to_float_rounding(mixed, tmp_path):
    annotations, folder, _, _, _ = mixed
    out = str(tmp_path / "shards")
    run_convert(annotations, folder, out, num_points=2048, shard_size=4)
    entries = list(index_of(out).values())
    processor = seeded(PointTrainProcessor, {"num_points": 2048, "seed": 1})
    with_stats = ShardedClouds(out, "train").parts(entries)
    for name in {entry["shard"] for entry in entries}:  # as a conversion made before statistics left them
        os.remove(os.path.join(out, stats_name(name)))
    without = ShardedClouds(out, "train").parts(entries)
    assert all(part[3] is not None for part in with_stats) and all(part[3] is None for part in without)
    one, ok1 = processor.batch_from(with_stats, len(entries))
    three, ok3 = processor.batch_from(without, len(entries))
    assert ok1.all() and ok3.all()
    stats = np.concatenate([part[3] for part in with_stats])
    assert_within_rounding(one, three, one_pass_tolerance(stats, max(processor.scale), processor.shift))


def test_clouds_of_other_sizes_are_resampled_reproducibly(tmp_path):
    folder, out_a, out_b = tmp_path / "clouds", str(tmp_path / "a"), str(tmp_path / "b")
    folder.mkdir()
    big, small = pf.coloured_cloud(5000, seed=1), pf.coloured_cloud(300, seed=2)
    np.save(folder / "big.npy", big)
    np.save(folder / "small.npy", small)
    (tmp_path / "captions.csv").write_text('big,"a big one, with a comma"\nsmall,a small one\n')
    run_convert(str(tmp_path / "captions.csv"), str(folder), out_a, num_points=1024)
    run_convert(str(tmp_path / "captions.csv"), str(folder), out_b, num_points=1024)
    index, clouds = index_of(out_a), ShardedClouds(out_a, "train")
    assert index["big"]["captions"] == ["a big one, with a comma"]
    rows = {i: clouds[index[i]] for i in ("big", "small")}
    assert all(r.shape == (1024, 6) for r in rows.values())
    assert np.array_equal(np.load(os.path.join(out_a, "train_points_00000.npy")),
                          np.load(os.path.join(out_b, "train_points_00000.npy")))
    as_rows = lambda a: {tuple(r) for r in a.astype(np.float16).tolist()}  # noqa: E731
    assert as_rows(rows["big"]) <= as_rows(big) and len(as_rows(rows["big"])) == 1024  # a subset, no repeats
    assert as_rows(rows["small"]) == as_rows(small)  # every point kept, some repeated


def sphere(n, radius, centre, seed=0):
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3))
    xyz = xyz / np.linalg.norm(xyz, axis=1, keepdims=True) * radius + centre
    return np.concatenate([xyz, rng.random((n, 3))], axis=1).astype(np.float32)


def test_a_cloud_far_from_the_origin_for_its_size_is_stored_centred_with_its_offset_and_listed(tmp_path):
    folder, out = tmp_path / "clouds", str(tmp_path / "shards")
    folder.mkdir()
    clouds = {"far": (sphere(1024, 1, [3000, 0, 0]), 1), "beyond": (sphere(1024, 5, [1e5, -2e5, 7], 1), 5),
              "near": (sphere(1024, 1, [0.5, 0, 0.2], 2), 1)}  # far: float16 kept 1 distinct point of 1024
    for name, (cloud, _) in clouds.items():
        np.save(folder / f"{name}.npy", cloud)
    (tmp_path / "captions.csv").write_text("far,a\nbeyond,b\nnear,c\n")
    report = run_convert(str(tmp_path / "captions.csv"), str(folder), out, num_points=1024)
    index, shards = index_of(out), ShardedClouds(out, "train")
    assert (report["converted"], report["bad"], report["centred"]) == (3, 0, 2)
    assert {c["id"] for c in report["centred_files"]} == {"far", "beyond"}
    assert all("stored relative to its centre" in c["reason"] for c in report["centred_files"])
    for name in ("far", "beyond"):
        (cloud, radius), row = clouds[name], shards[index[name]]
        assert len({tuple(r) for r in row.tolist()}) == 1024  # every point still distinct
        restored = row[:, :3].astype(np.float64) + index[name]["offset"]
        assert np.abs(restored - cloud[:, :3]).max() < 1e-3 * radius
        assert np.array_equal(row[:, 3:], cloud[:, 3:].astype(np.float16))
    assert "offset" not in index["near"]
    assert np.array_equal(shards[index["near"]], clouds["near"][0].astype(np.float16))  # bit-exact, as read


class Interrupted(Exception):
    """Stands in for Ctrl-C or a killed job between two chunks."""


def test_an_interrupted_conversion_resumes_without_redoing_finished_chunks(mixed, tmp_path, monkeypatch):
    annotations, folder, _, _, _ = mixed
    out, fresh = str(tmp_path / "resumed"), str(tmp_path / "fresh")
    write_chunk, calls, interrupt = convert._write_chunk, [], [True]

    def interrupted_on_second_chunk(*args):
        calls.append(args[2])
        if len(calls) == 2 and interrupt[0]:
            raise Interrupted
        write_chunk(*args)

    monkeypatch.setattr(convert, "_write_chunk", interrupted_on_second_chunk)
    with pytest.raises(Interrupted):
        run_convert(annotations, folder, out, num_points=2048, shard_size=4)
    assert not os.path.exists(os.path.join(out, "train.jsonl"))
    first = os.stat(os.path.join(out, "train_points_00000.npy")).st_mtime_ns

    calls.clear()
    interrupt[0] = False
    report = run_convert(annotations, folder, out, num_points=2048, shard_size=4)
    assert 0 not in calls and calls == sorted(calls) and calls  # chunk 0 was kept, the rest done now
    assert os.stat(os.path.join(out, "train_points_00000.npy")).st_mtime_ns == first
    monkeypatch.setattr(convert, "_write_chunk", write_chunk)
    assert report == run_convert(annotations, folder, fresh, num_points=2048, shard_size=4)
    assert index_of(out) == index_of(fresh)
    for name in os.listdir(fresh):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(os.path.join(out, name)), np.load(os.path.join(fresh, name)))


def test_resuming_with_other_settings_is_refused(mixed, tmp_path):
    annotations, folder, _, _, _ = mixed
    out = str(tmp_path / "shards")
    run_convert(annotations, folder, out, num_points=2048, shard_size=4)
    with pytest.raises(ValueError, match="num_points"):
        run_convert(annotations, folder, out, num_points=1024, shard_size=4)


def test_rerunning_after_fixing_captions_takes_the_new_captions_without_redoing_chunks(tmp_path):
    folder, out, captions = tmp_path / "clouds", str(tmp_path / "shards"), tmp_path / "captions.csv"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"obj{i}.npy", pf.coloured_cloud(256, seed=i))
    captions.write_text("obj0,a chiar\nobj1,a tabel\nobj2,a lamp\n")
    run_convert(str(captions), str(folder), out, num_points=256, shard_size=2)
    shard = os.path.join(out, "train_points_00000.npy")
    written = os.stat(shard).st_mtime_ns
    captions.write_text("obj0,a chair\nobj1,a table\nobj1,a small table\nobj2,a lamp\n")
    run_convert(str(captions), str(folder), out, num_points=256, shard_size=2)
    assert os.stat(shard).st_mtime_ns == written  # finished chunks were kept, only the index rewritten
    assert {i: e["captions"] for i, e in index_of(out).items()} == \
        {"obj0": ["a chair"], "obj1": ["a table", "a small table"], "obj2": ["a lamp"]}


def assert_same_conversion(out, fresh):
    assert index_of(out) == index_of(fresh)
    assert sorted(n for n in os.listdir(out) if n.endswith(".npy")) == \
        sorted(n for n in os.listdir(fresh) if n.endswith(".npy"))
    for name in os.listdir(fresh):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(os.path.join(out, name)), np.load(os.path.join(fresh, name))), name


@pytest.mark.parametrize("change", ["clouds", "sources", "contents", "fewer", "earlier release"])
def test_a_rerun_converts_again_exactly_the_chunks_whose_objects_or_files_changed(tmp_path, change):
    """One object per chunk: obj0 never changes, so its chunk is kept; obj1's chunk is converted again
    and the report says why; the result equals a fresh conversion."""
    first, second, out, fresh = tmp_path / "first", tmp_path / "second", str(tmp_path / "out"), str(tmp_path / "fresh")
    for folder in (first, second):
        folder.mkdir()
        for i in range(3):  # the same names; obj1 and obj2 hold other clouds in the second folder
            np.save(folder / f"obj{i}.npy", pf.coloured_cloud(256, seed=i + (folder == second and i > 0) * 10))
    os.utime(second / "obj0.npy", ns=(os.stat(first / "obj0.npy").st_atime_ns, os.stat(first / "obj0.npy").st_mtime_ns))
    np.save(first / "other.npy", pf.coloured_cloud(256, seed=99))
    annotations = tmp_path / "a.json"
    annotations.write_text(json.dumps([{"point": f"obj{i}.npy", "caption": "x"} for i in range(3)]))
    run_convert(str(annotations), str(first), out, num_points=256, shard_size=1)
    kept = os.stat(os.path.join(out, "train_points_00000.npy")).st_mtime_ns

    folder, why = first, None
    if change == "clouds":  # another folder: obj0 is the same file (size, mtime), obj1 and obj2 are not
        folder, why = second, "obj1.npy changed"
    elif change == "sources":  # obj1 now points at another file of the same folder
        annotations.write_text(json.dumps([{"point": "obj0.npy", "caption": "x"},
                                           {"uid": "obj1", "point": "other.npy", "caption": "x"},
                                           {"point": "obj2.npy", "caption": "x"}]))
        why = "it held obj1 (obj1.npy), now obj1 (other.npy)"
    elif change == "contents":  # obj1's file rewritten in place, same name and size
        np.save(first / "obj1.npy", pf.coloured_cloud(256, seed=7))
        os.utime(first / "obj1.npy", ns=(0, os.stat(first / "obj1.npy").st_mtime_ns + 10**9))
        why = "obj1.npy changed"
    elif change == "fewer":  # obj2 dropped (its chunk must not stay beside the index), obj1 touched
        annotations.write_text(json.dumps([{"point": f"obj{i}.npy", "caption": "x"} for i in range(2)]))
        os.utime(first / "obj1.npy", ns=(0, os.stat(first / "obj1.npy").st_mtime_ns + 10**9))
        why = "obj1.npy changed"
    else:  # a chunk record written before records listed their files
        path = os.path.join(out, "train_points_00001.json")
        record = json.load(open(path))
        del record["sources"]
        open(path, "w").write(json.dumps(record))
        why = "earlier lavis-point"
    report = run_convert(str(annotations), str(folder), out, num_points=256, shard_size=1)
    assert os.stat(os.path.join(out, "train_points_00000.npy")).st_mtime_ns == kept
    assert report["reconverted"][0]["chunk"] == 1 and why in report["reconverted"][0]["why"]
    assert all(r["chunk"] != 0 for r in report["reconverted"])
    fresh_report = run_convert(str(annotations), str(folder), fresh, num_points=256, shard_size=1)
    assert fresh_report["reconverted"] == [] and {**report, "reconverted": []} == fresh_report
    assert_same_conversion(out, fresh)


def test_the_script_splits_a_cap3d_csv_by_id_and_reports(tmp_path):
    folder = tmp_path / "clouds"
    folder.mkdir()
    rows = []
    for i in range(12):
        pf.write_pickle(folder / f"uid{i:02d}.pkl", pf.coloured_cloud(256, seed=i))
        rows.append(f"uid{i:02d},object number {i}")
    (folder / "uid99.pkl").write_bytes(b"\x80\x04garbage")
    rows.append("uid99,a broken one")
    (tmp_path / "Cap3D.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "scripts/convert_points.py", "--annotations", str(tmp_path / "Cap3D.csv"),
                           "--clouds", str(folder), "--out", str(out), "--split-fractions",
                           "train=0.5,val=0.25,test=0.25", "--num-points", "256", "--workers", "0",
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"converted": 12}
    assert "uid99.pkl: truncated or corrupt pickle" in proc.stdout
    ids = {split: set(index_of(str(out), split)) for split in ("train", "val", "test")}
    assert set().union(*ids.values()) == {f"uid{i:02d}" for i in range(12)}
    assert all(ids.values()) and sum(map(len, ids.values())) == 12
    assert convert.split_by_id([{"id": "uid03"}], {"train": 0.5, "val": 0.25, "test": 0.25}) == \
        {s: [{"id": "uid03"}] if "uid03" in ids[s] else [] for s in ("train", "val", "test")}


def test_the_script_refuses_bad_annotations_with_one_line_not_a_traceback(tmp_path):
    (tmp_path / "a.yaml").write_text("{}")
    proc = subprocess.run([sys.executable, "scripts/convert_points.py", "--annotations", str(tmp_path / "a.yaml"),
                           "--clouds", str(tmp_path), "--out", str(tmp_path / "out"), "--workers", "0"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"convert_points: {tmp_path / 'a.yaml'}: unknown annotation format "
                                                "'.yaml'; expected .json, .jsonl or .csv"]


def test_float16_of_rounds_every_float32_as_numpy_does():
    """The converter's fast float32 -> float16 must store what ``astype(np.float16)`` would: checked
    here on 4M random bit patterns plus the edges (ties, subnormals, overflow, -0); a one-off run over
    all 2^32 float32 values found no finite one that differs."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=4 << 20, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, 1e-8, 5.96e-8, 2.98e-8, 6.1e-5, 1.0009765625,
                      1.00048828125, 1.000732421875, -2049.0, 2049.0, 3.4e38, -3.4e38], dtype=np.float32)
    values = np.concatenate([bits.view(np.float32), edges])
    values = values[np.isfinite(values)]
    with np.errstate(over="ignore"):  # beyond 65504 both give inf
        assert np.array_equal(convert.float16_of(values).view(np.uint16), values.astype(np.float16).view(np.uint16))
    cloud = pf.coloured_cloud(100).astype(np.float32)
    assert np.array_equal(convert.float16_of(cloud[:, :4]), cloud[:, :4].astype(np.float16))  # strided input


def test_a_rewrite_interrupted_after_its_shard_is_not_taken_for_the_old_chunk(tmp_path, monkeypatch):
    """Chunk 0 is rewritten for changed annotations and interrupted between its shard and its record;
    the annotations are then changed back. The old record must not vouch for the new shard."""
    folder, out, fresh = tmp_path / "clouds", str(tmp_path / "out"), str(tmp_path / "fresh")
    folder.mkdir()
    for i in range(2):
        np.save(folder / f"obj{i}.npy", pf.coloured_cloud(256, seed=i))
    annotations = tmp_path / "a.json"
    original = json.dumps([{"point": f"obj{i}.npy", "caption": "x"} for i in range(2)])
    annotations.write_text(original)
    run_convert(str(annotations), str(folder), out, num_points=256, shard_size=1)
    annotations.write_text(json.dumps([{"point": f"obj{i}.npy", "caption": "x"} for i in (1, 0)]))

    def interrupted(clouds):
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(convert, "cloud_statistics", interrupted)  # after the shard is written
        with pytest.raises(Interrupted):
            run_convert(str(annotations), str(folder), out, num_points=256, shard_size=1)
    annotations.write_text(original)
    run_convert(str(annotations), str(folder), out, num_points=256, shard_size=1)  # chunk 0: unfinished, redone
    run_convert(str(annotations), str(folder), fresh, num_points=256, shard_size=1)
    assert_same_conversion(out, fresh)


def test_a_dangling_link_or_a_truncated_record_is_one_bad_file_or_one_chunk_again(tmp_path):
    folder, out = tmp_path / "clouds", str(tmp_path / "out")
    folder.mkdir()
    np.save(folder / "obj0.npy", pf.coloured_cloud(256, seed=0))
    (folder / "obj1.npy").symlink_to(folder / "gone.npy")  # listed by os.walk, not readable
    annotations = tmp_path / "a.json"
    annotations.write_text(json.dumps([{"point": f"obj{i}.npy", "caption": "x"} for i in range(2)]))
    report = run_convert(str(annotations), str(folder), out, num_points=256, shard_size=1)
    assert report["converted"] == 1 and [b["path"] for b in report["bad_files"]] == ["obj1.npy"]
    open(os.path.join(out, "train_points_00000.json"), "w").close()  # a crash before the data reached disk
    report = run_convert(str(annotations), str(folder), out, num_points=256, shard_size=1)
    assert report["converted"] == 1 and {r["chunk"] for r in report["reconverted"]} == {0, 1}
    assert "record cannot be read" in report["reconverted"][0]["why"]
    assert "could not be found" in report["reconverted"][1]["why"]


def test_worker_processes_after_torch_ran_in_the_parent_do_not_hang(tmp_path):
    """float16_of runs torch in forked workers: after a parallel torch op in the parent (a notebook,
    say) their first parallel op deadlocked. A child process, so that a hang fails instead of waiting."""
    script = f"""
import os, sys, numpy as np, torch
sys.path.insert(0, {ROOT!r})
from lavis_point.data_io.convert import convert_split
folder = {str(tmp_path / "clouds")!r}
os.makedirs(folder)
entries = []
for k in range(4):
    path = os.path.join(folder, f"obj{{k}}.npy")
    np.save(path, np.random.rand(8192, 6).astype(np.float32))
    entries.append({{"id": f"obj{{k}}", "path": path, "captions": ["x"]}})
torch.ones(8192, 6).to(torch.float16)  # a parallel torch op before the pool forks
report = convert_split(entries, [], folder, {str(tmp_path / "out")!r}, "train", num_points=8192, shard_size=2,
                       workers=2, progress=False)
print("converted", report["converted"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert done.returncode == 0 and "converted 4" in done.stdout, done.stderr[-2000:]


def colour_clouds(folder, names):
    """One 64-point cloud per name, each of its own colour, saved as {name}.npy: {name: cloud}."""
    folder.mkdir(exist_ok=True)
    clouds = {}
    for k, name in enumerate(names):
        clouds[name] = pf.coloured_cloud(64, seed=k)
        clouds[name][:, 3:] = k / len(names)
        np.save(folder / f"{name}.npy", clouds[name])
    return clouds


def test_an_interrupted_reconversion_leaves_no_index_pointing_at_rewritten_chunks(tmp_path, monkeypatch):
    """An object added at the front shifts every chunk: the old index, left while chunk 0 is already
    rewritten, would give o1's captions o0's cloud. It must go before any chunk changes."""
    from lavis_point.datasets.builders import shard_datasets

    folder, out, annotations = tmp_path / "clouds", str(tmp_path / "out"), tmp_path / "a.csv"
    clouds = colour_clouds(folder, [f"o{i}" for i in range(7)])
    annotations.write_text("".join(f"o{i},caption of o{i}\n" for i in range(1, 7)))
    run_convert(str(annotations), str(folder), out, num_points=64, shard_size=2)
    annotations.write_text("".join(f"o{i},caption of o{i}\n" for i in range(7)))
    write_chunk = convert._write_chunk

    def interrupted_after_writing(*args):
        write_chunk(*args)
        raise Interrupted

    with monkeypatch.context() as m:
        m.setattr(convert, "_write_chunk", interrupted_after_writing)
        with pytest.raises(Interrupted):
            run_convert(str(annotations), str(folder), out, num_points=64, shard_size=2)
    assert not os.path.exists(os.path.join(out, "train.jsonl"))
    assert not os.path.exists(os.path.join(out, "train_report.json"))
    with pytest.raises(FileNotFoundError, match="did not finish.*rerun scripts/convert_points.py"):
        shard_datasets(None, out, ["train"])

    run_convert(str(annotations), str(folder), out, num_points=64, shard_size=2)
    index, rows = index_of(out), ShardedClouds(out, "train")
    assert set(index) == set(clouds)
    for object_id, cloud in clouds.items():
        assert index[object_id]["captions"] == [f"caption of {object_id}"]
        assert np.array_equal(rows[index[object_id]], cloud.astype(np.float16)), object_id


def test_no_located_cloud_is_refused_without_touching_the_output(tmp_path):
    """An empty or unmounted --clouds folder must not wipe the previous conversion."""
    folder, empty, out, annotations = tmp_path / "clouds", tmp_path / "empty", str(tmp_path / "out"), tmp_path / "a.csv"
    colour_clouds(folder, ["o0", "o1", "o2"])
    empty.mkdir()
    annotations.write_text("o0,a\no1,b\no2,c\n")
    run_convert(str(annotations), str(folder), out, num_points=64, shard_size=2)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    with pytest.raises(ValueError, match=r"none of the 3 objects has a cloud file in .*empty.*--clouds.*nothing in"):
        run_convert(str(annotations), str(empty), out, num_points=64, shard_size=2)
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before


def test_a_missing_object_keeps_the_reason_it_was_not_located(tmp_path):
    folder, out = tmp_path / "clouds", str(tmp_path / "out")
    colour_clouds(folder, ["o0"])
    located = [{"id": "o0", "path": str(folder / "o0.npy"), "captions": ["a"]}]
    missing = [{"id": "twice", "point": None, "reason": "two files are named twice: twice.npy, b/twice.ply"},
               {"id": "gone", "point": "gone.npy"}]
    report = convert.convert_split(located, missing, str(folder), out, "train", num_points=64, progress=False)
    assert [b["reason"] for b in report["bad_files"]] == ["two files are named twice: twice.npy, b/twice.ply",
                                                          f"no cloud file found in {folder}"]


def killed_on_o3(task):
    """load_for_shard, except that the worker converting o3 dies as under the OOM killer."""
    if task[1] == "o3":
        os.kill(os.getpid(), 9)
    return convert_load_for_shard(task)


convert_load_for_shard = convert.load_for_shard


def test_a_worker_that_dies_costs_its_object_only_and_does_not_hang(tmp_path, monkeypatch):
    import signal

    folder, out, annotations = tmp_path / "clouds", str(tmp_path / "out"), tmp_path / "a.csv"
    clouds = colour_clouds(folder, [f"o{i}" for i in range(10)])
    annotations.write_text("".join(f"o{i},caption of o{i}\n" for i in range(10)))

    def hung(*_):
        raise TimeoutError("the conversion hung after a worker died")

    monkeypatch.setattr(convert, "load_for_shard", killed_on_o3)
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        report = run_convert(str(annotations), str(folder), out, num_points=64, shard_size=4, workers=2)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert [(b["id"], b["reason"]) for b in report["bad_files"]] == [
        ("o3", "the worker converting it died (killed by the system, e.g. out of memory, or a crash in native code)")]
    index, rows = index_of(out), ShardedClouds(out, "train")
    assert set(index) == set(clouds) - {"o3"} and report["converted"] == 9
    for object_id in index:  # as a conversion without the death stores them
        assert np.array_equal(rows[index[object_id]], clouds[object_id].astype(np.float16)), object_id


def test_each_file_reaches_the_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Otherwise, after a power loss, a chunk record could be on disk while its shard's data is not."""
    folder, out, annotations = tmp_path / "clouds", tmp_path / "out", tmp_path / "a.csv"
    colour_clouds(folder, ["o0", "o1", "o2"])
    annotations.write_text("o0,a\no1,b\no2,c\n")
    events, fsync, replace = [], os.fsync, os.replace

    def recorded_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recorded_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino, os.path.basename(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    run_convert(str(annotations), str(folder), str(out), num_points=64, shard_size=2)
    renamed = [k for k, e in enumerate(events) if e[0] == "replace"]
    assert {events[k][2] for k in renamed} >= {"train_points_00000.npy", "train_points_00000_stats.npy",
                                               "train_points_00000.json", "train.jsonl", "train_report.json"}
    for k in renamed:
        assert ("fsync", events[k][1]) in events[:k], events[k]  # the data first
        assert events[k + 1] == ("fsync", os.stat(out).st_ino), events[k]  # then the rename
