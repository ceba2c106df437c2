"""Batched reads: torch's DataLoader hands a map-style dataset the whole batch's indices
(``__getitems__``); shard rows are then read in one go per shard file and processed in one call.
What training sees must not change: with the same draws (a seeded or deterministic processor) the
batches equal those of the per-item path (to float rounding where shards carry statistics), bad
samples are skipped the same way, and LAVIS's ConcatDataset (which wraps every training set) passes
the batch through."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lavis.datasets.datasets.base_dataset import ConcatDataset
from lavis.processors.blip_processors import BlipCaptionProcessor
from torch.utils.data import DataLoader, Dataset

import lavis_point  # noqa: F401
from lavis_point.data_io.shards import ShardedClouds, rows_in_file_order, shard_name, stats_name
from lavis_point.datasets.batched_concat import BatchedConcatDataset, with_batched_reads
from lavis_point.datasets.batching import PerItem, batch_tensor, collate, whole_of
from lavis_point.datasets.cap3d import CloudFiles
from lavis_point.datasets.point_caption import PointCaptionDataset
from lavis_point.processors.point_processors import PointEvalProcessor, PointTrainProcessor, cloud_statistics
from lavis_point.runners.runner_point import RunnerPoint
from tests.seeded import seeded
from tests.point_files import write_pickle
from tests.rounding import assert_within_rounding, one_pass_tolerance

P = 256


def clouds(n, points=P, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(size=(n, points, 3)), rng.random((n, points, 3))], axis=2)


def sharded(folder, n_per_shard=(5, 7), processor=None, is_train=True, with_stats=False):
    """A dataset over numbered float16 shards, as scripts/convert_points.py writes them (with each
    shard's statistics, as it writes them now, or without, as it wrote them before)."""
    entries = []
    for number, n in enumerate(n_per_shard):
        shard = clouds(n, seed=number).astype(np.float16)
        np.save(os.path.join(folder, shard_name("train", number)), shard)
        if with_stats:
            np.save(os.path.join(folder, stats_name(shard_name("train", number))), cloud_statistics(shard))
        entries += [{"id": f"s{number}_{row}", "shard": shard_name("train", number), "index": row,
                     "captions": [f"shape {number} {row}", f"thing {row}"]} for row in range(n)]
    processor = processor or seeded(PointTrainProcessor, {"num_points": P, "seed": 3})
    return PointCaptionDataset(ShardedClouds(str(folder), "train"), entries, processor, BlipCaptionProcessor(),
                               is_train)


def rounding(dataset):
    """``one_pass_tolerance`` for a ``sharded`` dataset's clouds under its processor."""
    stats = np.concatenate([part[3] for part in dataset.points.parts(dataset.annotations) if part[3] is not None])
    processor = dataset.vis_processor
    return one_pass_tolerance(stats, max(processor.scale or (1.0,)), processor.shift, processor.normalize)


def batches(dataset, batch_size=4):
    np.random.seed(0)  # caption choice draws from numpy's stream, as in a seeded run
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(1),
                        collate_fn=dataset.collater if hasattr(dataset, "collater") else dataset.dataset.collater)
    return list(loader)


def assert_same_batches(a, b, tolerance=None):
    """Equal batches; with ``tolerance``, points within the float rounding by which the one-pass kernel
    (batches from shards with statistics) may differ from the three-pass one (items alone)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        if tolerance is None:
            assert torch.equal(x["point"], y["point"])
        else:
            assert_within_rounding(x["point"], y["point"], tolerance)
        assert x["text_input"] == y["text_input"] and x["instance_id"] == y["instance_id"]
        assert x["skipped"] == y["skipped"]


def test_rows_are_read_in_file_order_and_put_back_where_asked():
    shard = np.arange(10 * 2 * 6, dtype=np.float16).reshape(10, 2, 6)
    _, rows, positions = rows_in_file_order(shard, [7, 2, 9, 2, 0], range(5))
    assert rows.tolist() == [0, 2, 2, 7, 9]
    batch = np.empty((5, 2, 6), np.float16)
    batch[positions] = shard[rows]
    assert np.array_equal(batch, shard[[7, 2, 9, 2, 0]])


def test_sharded_parts_gather_across_shard_files_in_entry_order(tmp_path):
    dataset = sharded(tmp_path)
    picked = [dataset.annotations[i] for i in (9, 0, 6, 4, 11)]
    parts = dataset.points.parts(picked)
    assert len(parts) == 2  # one per shard file, rows in file order
    batch = np.empty((5, P, 6), np.float16)
    for shard, rows, positions, stats in parts:
        assert list(rows) == sorted(rows) and stats is None  # no statistics stored beside these shards
        batch[positions] = shard[rows]
    assert np.array_equal(batch, np.stack([dataset.points[e] for e in picked]))


@pytest.mark.parametrize("with_stats", [False, True])
def test_training_batches_from_shards_equal_the_per_item_path(tmp_path, with_stats):
    dataset = sharded(tmp_path, with_stats=with_stats)
    assert all((stats is not None) == with_stats for *_, stats in dataset.points.parts(dataset.annotations))
    calls = []
    getitems = dataset.__getitems__
    dataset.__getitems__ = lambda indices: calls.append(list(indices)) or getitems(indices)
    batched, per_item = batches(dataset), batches(PerItem(dataset))
    assert len(calls) == 3 and sorted(sum(calls, [])) == list(range(12))  # one read per batch
    assert_same_batches(batched, per_item, rounding(dataset) if with_stats else None)


def test_eval_batches_from_a_single_shard_array_equal_the_per_item_path():
    points = clouds(10).astype(np.float16)
    entries = [{"id": f"obj{i}", "caption": f"object {i}", "index": 9 - i} for i in range(10)]
    dataset = PointCaptionDataset(points, entries,
                                  PointEvalProcessor.from_config({"num_points": 128}), BlipCaptionProcessor(), False)
    assert_same_batches(batches(dataset, 3), batches(PerItem(dataset), 3))


def test_per_object_files_are_read_one_by_one_and_processed_as_a_batch(tmp_path):
    entries = []
    for i, cloud in enumerate(clouds(6, points=300)):
        write_pickle(tmp_path / f"obj{i}.pkl", cloud.astype(np.float32))
        entries.append({"id": f"obj{i}", "caption": f"object {i}", "path": str(tmp_path / f"obj{i}.pkl")})
    processor = seeded(PointTrainProcessor, {"num_points": P, "seed": 5, "dropout": 0.3})
    dataset = PointCaptionDataset(CloudFiles(), entries, processor, BlipCaptionProcessor(), True)
    assert_same_batches(batches(dataset, 4), batches(PerItem(dataset), 4))


@pytest.mark.parametrize("is_train,with_stats", [(True, False), (False, False), (True, True), (False, True)])
def test_a_bad_row_in_a_batch_is_skipped_as_the_per_item_path_skips_it(tmp_path, is_train, with_stats):
    dataset = sharded(tmp_path, is_train=is_train, with_stats=with_stats)  # statistics: of the clean shard
    bad = np.load(tmp_path / shard_name("train", 1))
    bad[3, 10, 0] = np.nan
    np.save(tmp_path / shard_name("train", 1), bad)
    dataset.annotations[0]["captions"] = ["   "]  # no usable caption
    batched, per_item = batches(dataset), batches(PerItem(dataset))
    failures = [f for b in batched for f in b["skipped"]]
    assert any("'s0_0'" in f and "caption" in f for f in failures)
    assert any("'s1_3'" in f and "NaN" in f for f in failures)
    assert len(failures) == 2 or is_train  # training's substitutes may be bad ones too (both paths alike)
    assert sum(len(b["point"]) for b in batched) == (12 if is_train else 10)
    assert_same_batches(batched, per_item, rounding(dataset) if with_stats else None)


def test_each_cloud_of_a_batch_gets_its_own_augmentation():
    processor = PointTrainProcessor.from_config({"num_points": P})
    same = np.repeat(clouds(1), 4, axis=0).astype(np.float16)
    out, finite = processor.batch(same)
    assert finite.all() and out.shape == (4, P, 6)
    assert all(not torch.equal(out[a], out[b]) for a in range(4) for b in range(a + 1, 4))


def test_seeded_batches_equal_single_clouds_when_resampling_too():
    processor = seeded(PointTrainProcessor, {"num_points": P, "seed": 7, "dropout": 0.5})
    for points in (100, 400):  # fewer points than asked (repeats) and more (a subset)
        batch = clouds(3, points=points).astype(np.float32)
        out, finite = processor.batch(batch)
        assert finite.all()
        assert all(torch.equal(out[k], processor(batch[k])) for k in range(3))


def test_lavis_concat_dataset_passes_the_batch_to_each_member(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = sharded(tmp_path / "a", (4,)), sharded(tmp_path / "b", (3, 3))
    seen = []
    for member in (first, second):
        getitems = member.__getitems__
        member.__getitems__ = lambda indices, g=getitems: seen.append(list(indices)) or g(indices)
    concat = with_batched_reads(ConcatDataset([first, second]))
    assert isinstance(concat, BatchedConcatDataset)
    items = concat.__getitems__([8, 1, 4, 3, 9])
    assert seen == [[4, 0, 5], [1, 3]]  # second's local indices, in batch order, then first's
    assert [it["instance_id"] for it in items] == ["s1_1", "s0_1", "s0_0", "s0_3", "s1_2"]
    assert all(torch.equal(it["point"], concat[i]["point"]) for it, i in zip(items, [8, 1, 4, 3, 9]))


def test_the_runner_loads_training_batches_through_batched_reads(tmp_path):
    concat = ConcatDataset([sharded(tmp_path)])
    runner = SimpleNamespace(use_distributed=False, device=torch.device("cpu"), start_epoch=0,
                             config=SimpleNamespace(run_cfg={}))  # run_cfg: no batch_group_by
    (loader,) = RunnerPoint.create_loaders(runner, [concat], 0, [4], [True], [concat.collater])
    assert isinstance(loader._dataloader.dataset, BatchedConcatDataset)


def test_a_nan_among_points_that_resampling_leaves_out_still_marks_the_cloud_bad():
    processor = PointEvalProcessor.from_config({"num_points": 64})
    batch = clouds(2, points=100).astype(np.float32)
    batch[1, 1, 0] = np.nan  # evenly spaced resampling to 64 of 100 rows skips row 1
    assert processor.batch(batch)[1].tolist() == [True, False]


def test_a_full_size_cloud_keeps_its_points_rolled_to_a_random_start():
    cloud = clouds(1)[0].astype(np.float32)
    plain = PointEvalProcessor.from_config({"num_points": P})(cloud)
    starts = set()
    for seed in range(8):
        out = seeded(PointTrainProcessor, {"num_points": P, "scale": None, "shift": 0, "rotate": False,
                                           "seed": seed})(cloud)
        start = int(torch.nonzero((plain == out[0]).all(dim=1))[0])
        assert torch.equal(out, torch.roll(plain, -start, dims=0))
        starts.add(start)
    assert len(starts) > 4


def test_batch_from_puts_each_cloud_where_asked_with_that_positions_draws():
    a, b = clouds(3).astype(np.float16), clouds(2, seed=1).astype(np.float16)
    processor = PointTrainProcessor.from_config({"num_points": P, "dropout": 0.2})
    np.random.seed(0)  # the processor's draws come from numpy's stream
    out, finite = processor.batch_from([(a, [0, 2], [3, 1]), (b, [1], [0]), (a, [1], [2])], 4)
    np.random.seed(0)
    stacked, _ = processor.batch(np.stack([b[1], a[2], a[1], a[0]]))
    assert finite.all() and torch.equal(out, stacked)
    with pytest.raises(ValueError, match="each of the 4 batch positions once"):
        processor.batch_from([(a, [0, 2], [3, 1]), (b, [1], [0])], 4)
    with pytest.raises(IndexError, match="asked of 3 clouds"):
        processor.batch_from([(a, [0, 3], [0, 1])], 2)


def test_a_batch_of_shard_rows_is_collated_without_a_copy(tmp_path):
    dataset = sharded(tmp_path)
    items = dataset.__getitems__([3, 8, 0, 11])
    for collater in (dataset.collater, ConcatDataset([dataset]).collater):  # the runner calls LAVIS's
        batch = collater([dict(it) for it in items])
        assert batch["point"].data_ptr() == items[0]["point"].data_ptr()  # the kernel's tensor, not a stack
        assert all(torch.equal(batch["point"][k], it["point"]) for k, it in enumerate(items))
        assert batch["instance_id"] == ["s0_3", "s1_3", "s0_0", "s1_6"]


def test_only_every_row_of_one_tensor_in_order_is_taken_whole():
    t = torch.arange(12.0).view(4, 3)
    assert whole_of(list(t)).data_ptr() == t.data_ptr() and torch.equal(whole_of(list(t)), t)
    for rows in ([t[1], t[0], t[2], t[3]], list(t[:3]), [t[0], t[1].clone(), t[2], t[3]]):
        assert whole_of(rows) is None
        assert torch.equal(collate([{"x": r} for r in rows])["x"], torch.stack(rows))  # stacked, as default


class IsShared(Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return batch_tensor((2, 3)).is_shared()


def test_a_batch_made_in_a_loader_worker_lives_in_shared_memory():
    assert not batch_tensor((2, 3)).is_shared()
    assert list(DataLoader(IsShared(), batch_size=None, num_workers=1)) == [True]  # sent on without a copy


def test_training_draws_only_usable_captions_each_equally_often():
    entry = {"id": "a", "index": 0, "captions": ["  ", "one", "", "two"]}
    dataset = PointCaptionDataset(clouds(1).astype(np.float16), [entry], None, BlipCaptionProcessor(), True)
    np.random.seed(0)
    drawn = [dataset.caption_of(entry) for _ in range(2000)]
    assert set(drawn) == {"one", "two"} and abs(drawn.count("one") - 1000) < 100


def test_statistics_that_do_not_fit_their_shard_are_ignored_with_a_warning_naming_the_file(tmp_path, caplog):
    dataset = sharded(tmp_path, with_stats=True)
    np.save(tmp_path / stats_name(shard_name("train", 1)), np.zeros((3, 5)))  # written for another shard
    parts = {part[0].shape[0]: part for part in dataset.points.parts(dataset.annotations)}
    assert parts[5][3] is not None and parts[7][3] is None
    assert "train_points_00001_stats.npy: expected (7, 5) float64" in caplog.text
    assert_same_batches(batches(dataset), batches(PerItem(dataset)), rounding(dataset))  # shard 1: three passes


def test_collate_keeps_a_key_with_none_as_a_list_and_still_stacks_arrays():
    batch = collate([{"a": np.zeros(2), "prompt": None}, {"a": np.ones(2), "prompt": "Question: "}])
    assert batch["prompt"] == [None, "Question: "]
    assert torch.equal(batch["a"], torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64))


def test_shards_hold_a_bounded_number_of_open_files(tmp_path, monkeypatch):
    """Each memory map holds a file descriptor: with more shards than the soft limit (often 1024; a
    Cap3D conversion at --shard-size 512 makes 1290), every item of a shard opened past it failed with
    'Too many open files', and training swapped it for another as a bad sample."""
    from lavis_point.data_io import shards

    monkeypatch.setattr(shards, "MAX_OPEN_SHARDS", 2)
    for number in range(5):
        np.save(tmp_path / shard_name("train", number), np.full((3, 4, 6), number, dtype=np.float16))
    clouds = ShardedClouds(str(tmp_path), "train")

    def open_fds():
        return len(os.listdir("/proc/self/fd"))

    before = open_fds()
    for number in [0, 1, 2, 3, 4, 0, 4]:
        row = clouds[{"shard": shard_name("train", number), "index": 1}]
        assert float(row[0, 0]) == number
        del row  # a row view keeps its map (and descriptor) alive; none is held here
    assert open_fds() - before <= 2
    rows, positions = clouds.parts([{"shard": shard_name("train", n), "index": 2} for n in (3, 1)])[0][1:3]
    assert rows.tolist() == [2] and positions.tolist() == [0]


def test_running_out_of_file_descriptors_stops_instead_of_skipping_samples(monkeypatch):
    """EMFILE says nothing about the sample: skipping would drop every cloud read past the limit."""
    import errno

    from lavis_point.datasets.bad_samples import load_or_skip

    def load(i):
        raise OSError(errno.EMFILE, "Too many open files")

    with pytest.raises(OSError, match="Too many open files"):
        load_or_skip(load, 0, 10, True, str)
