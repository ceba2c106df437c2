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
