import json
import os

import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from omegaconf import OmegaConf

import lavis_point  # noqa: F401
from lavis_point.datasets import shapes

SIZES = {"train": 16, "val": 8, "test": 8}


def config(name, **build_info):
    cfg = OmegaConf.load(registry.get_builder_class(name).default_config_path()).datasets[name]
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    return cfg


def test_embedded_builder_generates_and_reads_all_splits(tmp_path):
    cfg = config("shapes_point_caption", root=str(tmp_path), sizes=SIZES, num_points=2048)
    datasets = registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()
    assert {k: len(v) for k, v in datasets.items()} == SIZES
    item = datasets["test"][0]
    assert item["point"].shape == (1024, 6) and item["point"].dtype == torch.float32
    assert isinstance(item["text_input"], str) and item["instance_id"] == "test_00000"
    test = datasets["test"]
    assert len(test.references["test_00000"]) == 5
    assert (test.attributes["test_00000"]["shape"], test.attributes["test_00000"]["color"]) in \
        shapes.heldout_combinations()
    assert set(test.vocabularies) == {"shape", "color", "size"}


def test_eval_items_are_deterministic_and_train_items_are_augmented(tmp_path):
    cfg = config("shapes_point_caption", root=str(tmp_path), sizes=SIZES, num_points=2048)
    datasets = registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()
    assert torch.equal(datasets["val"][1]["point"], datasets["val"][1]["point"])
    assert not torch.equal(datasets["train"][1]["point"], datasets["train"][1]["point"])


def test_shard_builder_reads_a_folder_of_shards(tmp_path):
    folder = shapes.ensure_embedded_dataset(str(tmp_path), sizes={"train": 8, "test": 8}, num_points=1024)
    cfg = config("point_caption_shards", storage=folder, splits=["train", "test"])
    cfg.vis_processor.train.num_points = cfg.vis_processor.eval.num_points = 512
    datasets = registry.get_builder_class("point_caption_shards")(cfg).build_datasets()
    assert len(datasets["train"]) == 8 and datasets["test"][3]["point"].shape == (512, 6)


def test_shard_builder_names_the_missing_file(tmp_path):
    cfg = config("point_caption_shards", storage=str(tmp_path), splits=["train"])
    with pytest.raises(FileNotFoundError, match="train_points.npy"):
        registry.get_builder_class("point_caption_shards")(cfg).build_datasets()


def test_match_by_gives_alike_items_one_match_id_through_the_batched_path(tmp_path):
    cfg = config("shapes_point_caption", root=str(tmp_path), sizes=SIZES, num_points=2048)
    cfg.match_by = ["color", "size"]
    train = registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()["train"]
    batch = train.collater(train.__getitems__(list(range(len(train)))))
    keys = [(a["color"], a["size"]) for a in train.annotations]
    ids = batch["match_id"].tolist()
    assert len(set(keys)) < len(keys)  # some items are alike, so the check below means something
    assert all((ids[i] == ids[j]) == (keys[i] == keys[j]) for i in range(len(keys)) for j in range(len(keys)))
    del cfg.match_by  # without it, items are alike only when they are the same object
    plain = registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()["train"]
    ids = plain.collater(plain.__getitems__(list(range(len(plain)))))["match_id"].tolist()
    assert len(set(ids)) == len({a["id"] for a in plain.annotations}) == len(plain)


def test_match_ids_agree_across_datasets_only_where_the_values_do():
    """Two datasets concatenated for stage 1: per-dataset numbering gave "a small red cube" of one and
    "a large blue sphere" of the other the same id, so they became positives."""
    from lavis_point.datasets.point_caption import PointCaptionDataset

    def dataset(anns):
        d = PointCaptionDataset(None, anns, None, None, True)
        d.set_match_by(["shape", "color"])
        return d.match_ids

    a = dataset([{"id": "a0", "shape": "cube", "color": "red"}, {"id": "a1", "shape": "cone", "color": "red"}])
    b = dataset([{"id": "b0", "shape": "sphere", "color": "blue"}, {"id": "b1", "shape": "cube", "color": "red"}])
    assert a[0] != b[0] and a[0] == b[1] and len({*a, *b}) == 3


def test_match_by_names_the_annotation_file_and_the_missing_field(tmp_path):
    cfg = config("shapes_point_caption", root=str(tmp_path), sizes=SIZES, num_points=2048)
    cfg.match_by = ["shape", "material"]
    with pytest.raises(ValueError, match=r"train\.jsonl: match_by \['shape', 'material'\]: annotation 0 .*'material'"):
        registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()


def test_caption_and_qa_builders_share_one_cache_folder(tmp_path):
    """Stage 2 mixes both over the same clouds: with the same build_info they must find one folder
    (named by the parameters) and the second must not rebuild it."""
    cfg = config("shapes_point_caption", root=str(tmp_path), sizes=SIZES, num_points=2048)
    registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()
    (folder,) = tmp_path.iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    qa = config("shapes_point_qa", root=str(tmp_path), sizes=SIZES, num_points=2048, splits=["train"])
    registry.get_builder_class("shapes_point_qa")(qa).build_datasets()
    classes = config("shapes_point_classification", root=str(tmp_path), sizes=SIZES, num_points=2048,
                     splits=["test"])
    registry.get_builder_class("shapes_point_classification")(classes).build_datasets()
    assert list(tmp_path.iterdir()) == [folder]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_embedded_builder_reads_only_build_info_splits(tmp_path):
    """As the sibling builders do: an evaluation that names [test] must not build the train set."""
    cfg = config("shapes_point_caption", root=str(tmp_path), sizes=SIZES, num_points=2048, splits=["test"])
    datasets = registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()
    assert list(datasets) == ["test"] and len(datasets["test"]) == SIZES["test"]
    cfg.build_info.splits = ["val", "train"]
    assert list(registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()) == ["val", "train"]
    cfg.build_info.sizes = {"train": 8, "test": 8}  # replaced, not merged into the defaults' three
    cfg.build_info.splits = ["val"]
    with pytest.raises(ValueError, match=r"build_info.splits names 'val', which build_info.sizes .* lacks"):
        registry.get_builder_class("shapes_point_caption")(cfg).build_datasets()


def write_index(folder, split, rows, clouds=3, sharded=False):
    """``{split}.jsonl`` with ``rows`` (dicts, or raw lines) over ``clouds`` small coloured clouds, in one
    ``{split}_points.npy`` or (``sharded``) in the numbered shard ``{split}_points_00000.npy``."""
    rng = np.random.default_rng(0)
    points = rng.random((clouds, 256, 6)).astype(np.float16)
    name = f"{split}_points_00000.npy" if sharded else f"{split}_points.npy"
    np.save(os.path.join(folder, name), points)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    with open(os.path.join(folder, f"{split}.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


def shard_builder(folder, splits=("test",)):
    cfg = config("point_caption_shards", storage=str(folder), splits=list(splits))
    cfg.vis_processor.train.num_points = cfg.vis_processor.eval.num_points = 128
    return registry.get_builder_class("point_caption_shards")(cfg).build_datasets()


def test_integer_ids_of_a_shard_index_reach_the_batch_as_strings(tmp_path):
    """int ids became a tensor in default_collate: LAVIS's save_result could not write the captions
    (after the whole generation pass) and retrieval said the clouds were 'not evaluated by any rank'."""
    write_index(tmp_path, "test", [{"id": k, "index": k, "caption": f"thing {k}"} for k in range(3)])
    test = shard_builder(tmp_path)["test"]
    batch = test.collater(test.__getitems__([0, 1, 2]))
    assert batch["instance_id"] == ["0", "1", "2"]
    assert list(test.references) == ["0", "1", "2"]


def test_a_lone_captions_string_is_one_caption_not_its_letters(tmp_path):
    for split in ("train", "test"):
        write_index(tmp_path, split, [{"id": "a", "index": 0, "captions": "a red chair"}], clouds=1)
    datasets = shard_builder(tmp_path, ["train", "test"])
    assert datasets["test"].references == {"a": ["a red chair"]}
    assert {datasets["train"][0]["text_input"] for _ in range(10)} == {"a red chair"}


@pytest.mark.parametrize("sharded", [False, True])
def test_rows_of_one_cloud_with_one_caption_each_become_one_item_with_all_captions(tmp_path, sharded):
    """LAVIS's usual layout, one row per (object, caption): references kept only the last row's
    captions and evaluation generated for the same cloud once per row."""
    shard = {"shard": "{}_points_00000.npy"} if sharded else {}
    for split in ("train", "test"):
        rows = [{"id": "a", "index": 0, "caption": "one"}, {"id": "b", "index": 1, "captions": ["three"]},
                {"id": "a", "index": 0, "caption": "two"}, {"id": "a", "index": 0, "captions": ["four", "five"]}]
        rows = [{**r, **{k: v.format(split) for k, v in shard.items()}} for r in rows]
        write_index(tmp_path, split, rows, sharded=sharded)
    datasets = shard_builder(tmp_path, ["train", "test"])
    test, train = datasets["test"], datasets["train"]
    assert len(test) == 2 and test.references == {"a": ["one", "two", "four", "five"], "b": ["three"]}
    assert [item["instance_id"] for item in test.__getitems__([0, 1])] == ["a", "b"]
    assert len(train) == 2  # training draws each time among all captions of the cloud, as for any entry
    np.random.seed(0)
    assert {train[0]["text_input"] for _ in range(200)} == {"one", "two", "four", "five"}


@pytest.mark.parametrize("sharded", [False, True])
def test_one_id_for_two_clouds_names_the_file_the_id_and_both_lines(tmp_path, sharded):
    shard = {"shard": "test_points_00000.npy"} if sharded else {}
    rows = [{"id": "a", "index": 0, "caption": "one", **shard}, {"id": "b", "index": 1, "caption": "x", **shard},
            "", {"id": "a", "index": 2, "caption": "two", **shard}]
    write_index(tmp_path, "test", rows, sharded=sharded)
    with pytest.raises(ValueError, match=r"test\.jsonl: id 'a' on lines 1 and 4 names two different clouds"):
        shard_builder(tmp_path)


def test_one_id_in_two_shards_is_two_clouds(tmp_path):
    rows = [{"id": "a", "shard": "test_points_00000.npy", "index": 0, "caption": "one"},
            {"id": "a", "shard": "test_points_00001.npy", "index": 0, "caption": "two"}]
    write_index(tmp_path, "test", rows, sharded=True)
    np.save(tmp_path / "test_points_00001.npy", np.zeros((1, 256, 6), dtype=np.float16))
    with pytest.raises(ValueError, match=r"test\.jsonl: id 'a' on lines 1 and 2 names two different clouds"):
        shard_builder(tmp_path)


@pytest.mark.parametrize("sharded,drop,message", [
    (False, ["index"], "no 'index'"), (False, ["id"], "no 'id'"),
    (False, ["caption"], "no caption"), (True, ["shard"], "no 'shard'"), (True, ["index"], "no 'index'")])
def test_an_index_entry_missing_a_key_names_the_file_the_line_and_the_key(tmp_path, sharded, drop, message):
    """Accepted at build time, these failed later: 20 bad samples in a row in the first batch, or a bare
    KeyError 'caption' from references after the whole generation pass."""
    shard = {"shard": "test_points_00000.npy"} if sharded else {}
    rows = [{"id": f"o{k}", "index": k, "caption": f"thing {k}", **shard} for k in range(3)]
    rows[1] = {k: v for k, v in rows[1].items() if k not in drop}
    write_index(tmp_path, "test", rows, sharded=sharded)
    with pytest.raises(ValueError, match=rf"test\.jsonl:2: .*{message}"):
        shard_builder(tmp_path)


@pytest.mark.parametrize("row,message", [
    ({"id": "a", "index": 0, "captions": []}, "no caption"), ({"id": "a", "index": "0", "caption": "x"}, "'index'"),
    ({"id": "a", "index": -1, "caption": "x"}, "'index'"), (["a", 0, "x"], "expected a JSON object")])
def test_an_index_entry_that_cannot_name_a_cloud_and_its_captions_is_refused(tmp_path, row, message):
    write_index(tmp_path, "test", [row], clouds=1)
    with pytest.raises(ValueError, match=rf"test\.jsonl:1: .*{message}"):
        shard_builder(tmp_path)


def test_modelnet40_h5_with_normals_reads_xyz_only_as_the_folder_layout_does(tmp_path):
    """ply_data_*.h5 with (n, P, 6) data carries normals in columns 4-6, not colours: they were read as
    colour (normals in [-1, 1]: dark, mostly black clouds)."""
    import h5py

    (tmp_path / "shape_names.txt").write_text("airplane\nbathtub\n")
    rng = np.random.default_rng(0)
    xyz, normals = rng.random((2, 32, 3), dtype=np.float32), -np.ones((2, 32, 3), dtype=np.float32)
    with h5py.File(tmp_path / "ply_data_test0.h5", "w") as f:
        f["data"], f["label"] = np.concatenate([xyz, normals], axis=2), np.array([[0], [1]])
    cfg = OmegaConf.load(registry.get_builder_class("modelnet40").default_config_path("h5")).datasets.modelnet40
    cfg.build_info.storage, cfg.vis_processor.eval.num_points = str(tmp_path), 32
    test = registry.get_builder_class("modelnet40")(cfg).build_datasets()["test"]
    assert np.array_equal(np.asarray(test.clouds[1]), xyz[1])
    assert torch.all(test[1]["point"][:, 3:] == 1.0)  # white, as ModelNet40's folder layout gives
