"""run.batch_group_by: training batches made of a few groups of alike items (grouped_batches.py)."""
import pytest
import torch

from lavis_point.runners.grouped_batches import GroupedBatchSampler, group_ids_of


def group_ids(sizes):
    return [g for g, n in enumerate(sizes) for _ in range(n)]


def test_each_batch_is_whole_chunks_of_one_group_and_no_item_repeats():
    ids = group_ids([16, 24, 8, 32, 16])  # every group a multiple of the chunk (8 / 4 = 2)
    sampler = GroupedBatchSampler(ids, batch_size=8, groups_per_batch=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 96 // 8
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen)) == 96
    for batch in batches:
        assert len(batch) == 8
        for chunk in (batch[k:k + 2] for k in range(0, 8, 2)):
            assert len({ids[i] for i in chunk}) == 1


def test_remainders_are_pooled_and_the_length_is_exact():
    ids = group_ids([5, 7, 3, 9, 1, 6])  # 31 items, chunk 4: 5 whole chunks; remainders 1,3,3,1,1,2 -> 2 more
    sampler = GroupedBatchSampler(ids, batch_size=8, groups_per_batch=2)
    for _ in range(3):
        batches = list(sampler)
        assert len(batches) == len(sampler) == 7 // 2
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) and all(len(b) == 8 for b in batches)


def test_one_process_draws_from_torch_random_state_so_a_resume_replays_it():
    sampler = GroupedBatchSampler(group_ids([8] * 6), batch_size=8, groups_per_batch=2)
    torch.manual_seed(3)
    first = list(sampler)
    second = list(sampler)
    torch.manual_seed(3)
    assert list(sampler) == first and first != second


def test_ranks_take_disjoint_shares_of_the_same_batches_and_epochs_differ():
    ids = group_ids([12, 20, 8, 16, 8])
    ranks = [GroupedBatchSampler(ids, batch_size=4, groups_per_batch=2, num_replicas=2, rank=r, seed=7)
             for r in range(2)]
    epoch0 = [list(s) for s in ranks]
    assert len(epoch0[0]) == len(epoch0[1]) == len(ranks[0]) == 64 // 4 // 2
    flat = [i for batches in epoch0 for b in batches for i in b]
    assert len(flat) == len(set(flat))
    epoch1 = [list(s) for s in ranks]
    assert epoch1 != epoch0
    again = GroupedBatchSampler(ids, batch_size=4, groups_per_batch=2, num_replicas=2, rank=0, seed=7, epoch=1)
    assert list(again) == epoch1[0]  # a resumed rank starting at epoch 1 rebuilds that epoch's batches


def test_several_groupings_share_each_epoch_and_each_chunk_is_alike_under_its_own():
    """batch_group_by: [[color, size], [color]] on the embedded set: half the items grouped finely, half
    coarsely, so batches hold both kinds of hard negatives. Here fine = i // 8, coarse = parity."""
    n = 960
    fine, coarse = [i // 8 for i in range(n)], [i % 2 for i in range(n)]
    sampler = GroupedBatchSampler([fine, coarse], batch_size=8, groups_per_batch=4)
    for _ in range(2):
        batches = list(sampler)
        assert len(batches) == len(sampler) == n // 8
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat)) == n  # every item once
        chunks = [b[k:k + 2] for b in batches for k in range(0, 8, 2)]
        fine_only = sum(fine[a] == fine[b] and coarse[a] != coarse[b] for a, b in chunks)
        coarse_only = sum(coarse[a] == coarse[b] and fine[a] != fine[b] for a, b in chunks)
        neither = sum(fine[a] != fine[b] and coarse[a] != coarse[b] for a, b in chunks)
        # a fine chunk mixes parities 4/7 of the time, a coarse one splits fine groups ~all the time
        assert fine_only > 0.12 * len(chunks) and coarse_only > 0.4 * len(chunks)  # 0.21 and 0.51 at worst in 200 epochs
        assert neither <= (n // 8 + 2) // 2  # only pooled remainders (at most one per group and share)


def test_groupings_must_cover_the_same_items():
    with pytest.raises(ValueError, match="one id per item"):
        GroupedBatchSampler([[0, 0, 1], [0, 1]], batch_size=2, groups_per_batch=1)


def test_groups_per_batch_must_divide_the_batch():
    with pytest.raises(ValueError, match="must divide the batch size"):
        GroupedBatchSampler([0, 1], batch_size=8, groups_per_batch=3)


class Member:
    def __init__(self, annotations):
        self.annotations = annotations

    def __len__(self):
        return len(self.annotations)


class Concat:
    def __init__(self, *members):
        self.datasets = members


def test_group_ids_come_from_annotation_fields_per_member():
    captions = Member([{"color": "red", "size": "small"}, {"color": "red", "size": "small"},
                       {"color": "blue", "size": "small"}, {"color": "red"}])
    questions = Member([{"color": "red", "size": "small"}])
    ids = group_ids_of(Concat(captions, questions), ["color", "size"])
    assert ids[0] == ids[1] != ids[2]
    assert ids[3] == (0, None)  # without the fields: the member's own group
    assert ids[4] != ids[0]  # another member is another group, even with equal fields
    assert len(set(ids)) == 4


def test_no_annotation_with_the_fields_is_an_error_naming_them():
    with pytest.raises(ValueError, match=r"\['shade'\]"):
        group_ids_of(Member([{"color": "red"}]), ["shade"])


class Items(Member):
    def __getitem__(self, i):
        return i


def test_the_runner_builds_grouped_training_batches_from_run_batch_group_by():
    from types import SimpleNamespace

    from lavis_point.runners.runner_point import RunnerPoint

    annotations = [{"color": c, "size": "small"} for c in ("red", "blue") for _ in range(8)]
    run_cfg = {"batch_group_by": ["color"], "batch_groups_per_batch": 2, "seed": 0}
    runner = SimpleNamespace(use_distributed=False, device=torch.device("cpu"), start_epoch=0,
                             config=SimpleNamespace(run_cfg=run_cfg))
    (loader,) = RunnerPoint.create_loaders(runner, [Items(annotations)], 0, [4], [True], [list])
    assert isinstance(loader._dataloader.batch_sampler, GroupedBatchSampler) and len(loader) == 4
    for _ in range(len(loader)):
        batch = next(loader)
        for chunk in (batch[:2], batch[2:]):
            assert len({annotations[i]["color"] for i in chunk}) == 1


def test_run_batch_group_by_may_list_several_groupings():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from lavis_point.runners.runner_point import RunnerPoint

    annotations = [{"color": c, "size": s} for c in ("red", "blue") for s in ("small", "large") for _ in range(8)]
    run_cfg = OmegaConf.create({"batch_group_by": [["color", "size"], "size"], "batch_groups_per_batch": 2})
    runner = SimpleNamespace(use_distributed=False, device=torch.device("cpu"), start_epoch=0,
                             config=SimpleNamespace(run_cfg=run_cfg))
    (loader,) = RunnerPoint.create_loaders(runner, [Items(annotations)], 0, [4], [True], [list])
    sampler = loader._dataloader.batch_sampler
    by_color_size = [(a["color"], a["size"]) for a in annotations]
    assert len(sampler.codes) == 2
    assert len(set(sampler.codes[0])) == 4 and len(set(sampler.codes[1])) == 2
    assert all((sampler.codes[0][i] == sampler.codes[0][j]) == (by_color_size[i] == by_color_size[j])
               for i in range(32) for j in range(32))


@pytest.mark.parametrize("num_items", [4, 24])  # fewer and more questions than the 12 clouds
def test_a_member_whose_annotations_are_not_its_items_is_one_group_of_its_own(num_items, caplog):
    """The stage-2 mix: a QA set's ``annotations`` are its clouds, its items ``num_items`` questions."""
    import numpy as np
    from lavis.datasets.datasets.base_dataset import ConcatDataset

    from lavis_point.datasets.point_caption import PointCaptionDataset
    from lavis_point.datasets.qa import ShapesQADataset

    annotations = [{"id": f"train_{i}", "index": i, "shape": "cube", "color": ["red", "blue"][i % 2],
                    "size": "small", "captions": ["a cube"]} for i in range(12)]
    clouds = np.zeros((12, 4, 6), np.float32)
    captions = PointCaptionDataset(clouds, annotations, None, None, True)
    questions = ShapesQADataset(clouds, annotations, None, None, True, ["color"], num_items=num_items)
    train = ConcatDataset([captions, questions])
    ids = group_ids_of(train, ["color", "size"])
    assert len(ids) == len(train) == 12 + num_items
    assert ids[:12] == [(0, (c, "small")) for c in ["red", "blue"] * 6]  # the captions keep their groups
    assert ids[12:] == [(1, None)] * num_items
    assert f"member 1 (ShapesQADataset) has 12 annotations for {num_items} items" in caplog.text
    drawn = [i for batch in GroupedBatchSampler(ids, batch_size=4, groups_per_batch=2) for i in batch]
    assert sorted(drawn) == list(range(len(train)))  # every item once, none past the end
