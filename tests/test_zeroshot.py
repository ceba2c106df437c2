"""Zero-shot classification: metrics, class text features from templates, the task's predictions,
the ModelNet40 (h5, folders), Objaverse-LVIS and embedded builders, and the task through evaluate.py
in one process and under torchrun (every sample once)."""
import json
import logging

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from lavis.common.registry import registry
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import lavis_point  # noqa: F401
from lavis_point.datasets import shapes
from lavis_point.models.point_qformer import PointQFormer
from lavis_point.tasks.ranking_metrics import mean_per_class_accuracy, topk_accuracy
from lavis_point.tasks.zeroshot import PointZeroShotClassificationTask, class_text_features
from tests.understanding_runs import SIZES, evaluate, run_evaluate


def builder_config(name, config_type="default", **build_info):
    cfg = OmegaConf.load(registry.get_builder_class(name).default_config_path(config_type)).datasets[name]
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    cfg.vis_processor.eval.num_points = cfg.vis_processor.train.num_points = 64
    return cfg


def build(name, config_type="default", **build_info):
    return registry.get_builder_class(name)(builder_config(name, config_type, **build_info)).build_datasets()


def test_topk_and_mean_per_class_accuracy():
    labels = [0, 0, 0, 1]
    assert topk_accuracy([[0, 1], [1, 0], [1, 0], [1, 0]], labels, 1) == 0.5
    assert topk_accuracy([[0, 1], [1, 0], [1, 0], [1, 0]], labels, 2) == 1.0
    # class 0: 1 of 3 right, class 1: 1 of 1 -> mean 2/3 while overall top-1 is 1/2
    assert mean_per_class_accuracy([0, 1, 1, 1], labels) == pytest.approx(2 / 3)


class WordModel(nn.Module):
    """Text features count the class words they contain; a cloud's feature is its class's one-hot."""

    def __init__(self, words):
        super().__init__()
        self.words = words
        self.unused = nn.Parameter(torch.zeros(1))

    def encode_text(self, texts):
        feats = torch.tensor([[float(w in t.split()) for w in self.words] + [1.0] for t in texts])
        return torch.nn.functional.normalize(feats, dim=-1)

    def encode_points(self, points):
        labels = points[:, 0, 0].long()
        feats = torch.nn.functional.one_hot(labels, len(self.words) + 1).float()[:, None]
        return None, None, feats

    point_text_similarity = staticmethod(PointQFormer.point_text_similarity)


def test_class_features_average_the_templates_and_underscores_become_spaces():
    model = WordModel(["flower", "pot", "cone"])
    feats = class_text_features(model, ["flower_pot", "cone"], ["a {}", "a big {}"])
    assert feats.shape == (2, 4) and torch.allclose(feats.norm(dim=-1), torch.ones(2))
    assert feats[0, 0] > 0 and feats[0, 1] > 0 and feats[0, 2] == 0  # "flower pot" names both words


def test_task_predicts_the_class_whose_text_matches_the_cloud():
    task = PointZeroShotClassificationTask(templates=["a {}"], top_k=2)
    model = WordModel(["cube", "cone", "torus"])
    task.before_evaluation(model, type("Set", (), {"classnames": ["cube", "cone", "torus"]})())
    points = torch.tensor([2.0, 0.0, 1.0])[:, None, None].expand(3, 4, 6)
    rows = task.valid_step(model, {"point": points, "label": torch.tensor([2, 0, 0]), "instance_id": ["a", "b", "c"]})
    assert [r["top_k"][0] for r in rows] == [2, 0, 1] and all(len(r["top_k"]) == 2 for r in rows)
    with pytest.raises(ValueError, match="exactly one"):
        PointZeroShotClassificationTask(templates=["no slot"])


def test_a_cloud_with_nan_scores_is_never_counted_right(caplog):
    """topk over NaN picks some class, which may be the label: a diverged model must not score."""
    task = PointZeroShotClassificationTask(templates=["a {}"], top_k=2)
    model = WordModel(["cube", "cone", "torus"])
    task.before_evaluation(model, type("Set", (), {"classnames": ["cube", "cone", "torus"]})())
    nan_feats = model.encode_points
    model.encode_points = lambda points: (None, None, nan_feats(points)[2] * float("nan"))
    points = torch.tensor([0.0, 1.0, 2.0])[:, None, None].expand(3, 4, 6)
    with caplog.at_level(logging.WARNING):
        rows = task.valid_step(model, {"point": points, "label": torch.tensor([0, 1, 2]), "instance_id": list("abc")})
    assert all(r["top_k"] == [-1, -1] for r in rows)
    assert topk_accuracy([r["top_k"] for r in rows], [0, 1, 2], 2) == 0.0
    assert "3 of 3 clouds have a similarity that is not finite" in caplog.text


def write_h5(path, data, labels):
    with h5py.File(path, "w") as f:
        f["data"], f["label"] = data, labels


def test_modelnet40_h5_reads_files_labels_and_class_names(tmp_path):
    (tmp_path / "shape_names.txt").write_text("airplane\nbathtub\nflower_pot\n")
    rng = np.random.default_rng(0)
    write_h5(tmp_path / "ply_data_test0.h5", rng.random((3, 32, 3), dtype=np.float32), np.array([[0], [2], [1]]))
    write_h5(tmp_path / "ply_data_test1.h5", rng.random((2, 32, 3), dtype=np.float32), np.array([[2], [2]]))
    (tmp_path / "test_files.txt").write_text("data/modelnet40_ply_hdf5_2048/ply_data_test0.h5\n"
                                             "data/modelnet40_ply_hdf5_2048/ply_data_test1.h5\n")
    test = build("modelnet40", "h5", storage=str(tmp_path))["test"]
    assert len(test) == 5 and test.classnames == ["airplane", "bathtub", "flower_pot"]
    assert test.labels == [0, 2, 1, 2, 2]
    item = test[1]
    assert item["point"].shape == (64, 6) and item["label"] == 2
    assert torch.all(item["point"][:, 3:] == 1.0)  # no colour in ModelNet40: white


def test_modelnet40_h5_names_a_file_without_labels(tmp_path):
    (tmp_path / "shape_names.txt").write_text("a\n")
    with h5py.File(tmp_path / "ply_data_test0.h5", "w") as f:
        f["data"] = np.zeros((1, 8, 3), dtype=np.float32)
    with pytest.raises(KeyError, match="ply_data_test0.h5: no 'label'"):
        build("modelnet40", "h5", storage=str(tmp_path))


def test_modelnet40_folder_with_list_files_drops_the_normals(tmp_path):
    (tmp_path / "modelnet40_shape_names.txt").write_text("chair\ncone\n")
    (tmp_path / "modelnet40_test.txt").write_text("cone_0001\nchair_0002\n")
    for name in ("cone", "chair"):
        (tmp_path / name).mkdir()
    rows = "\n".join("0.1,0.2,0.3,0.0,0.0,-1.0" for _ in range(10))
    (tmp_path / "cone" / "cone_0001.txt").write_text(rows)
    np.save(tmp_path / "chair" / "chair_0002.npy", np.ones((10, 3), dtype=np.float32))
    test = build("modelnet40", "folder", storage=str(tmp_path))["test"]
    assert test.labels == [1, 0] and test.ids == ["cone_0001", "chair_0002"]
    assert torch.all(test[0]["point"][:, 3:] == 1.0)  # normals are not colours


def test_modelnet40_folder_of_class_and_split_subfolders(tmp_path):
    for name in ("bed", "desk"):
        (tmp_path / name / "test").mkdir(parents=True)
        np.save(tmp_path / name / "test" / f"{name}_1.npy", np.random.rand(20, 3).astype(np.float32))
    test = build("modelnet40", "folder", storage=str(tmp_path))["test"]
    assert test.classnames == ["bed", "desk"] and test.labels == [0, 1] and test.ids == ["bed/test/bed_1",
                                                                                            "desk/test/desk_1"]


def test_class_names_with_a_byte_order_mark_lose_no_class(tmp_path):
    (tmp_path / "shape_names.txt").write_text("\ufeffairplane\nbathtub\n", encoding="utf-8")
    for name in ("airplane", "bathtub"):
        (tmp_path / name / "test").mkdir(parents=True)
        np.save(tmp_path / name / "test" / f"{name}_1.npy", np.random.rand(20, 3).astype(np.float32))
    test = build("modelnet40", "folder", storage=str(tmp_path))["test"]
    assert test.classnames == ["airplane", "bathtub"] and test.labels == [0, 1]


def test_a_class_folder_without_clouds_is_named_in_a_warning(tmp_path, caplog):
    (tmp_path / "shape_names.txt").write_text("bed\ndesk\n")
    (tmp_path / "bed" / "test").mkdir(parents=True)
    np.save(tmp_path / "bed" / "test" / "bed_1.npy", np.random.rand(20, 3).astype(np.float32))
    (tmp_path / "Desk" / "test").mkdir(parents=True)  # misspelt: the class 'desk' has nothing
    np.save(tmp_path / "Desk" / "test" / "desk_1.npy", np.random.rand(20, 3).astype(np.float32))
    with caplog.at_level(logging.WARNING):
        test = build("modelnet40", "folder", storage=str(tmp_path))["test"]
    assert test.labels == [0] and "1 classes have no test clouds" in caplog.text and "['desk']" in caplog.text


@pytest.mark.parametrize("junk", [b"not hdf5 at all", "airplane\n".encode("utf-16")])
def test_unreadable_modelnet40_files_are_named(tmp_path, junk):
    (tmp_path / "shape_names.txt").write_text("airplane\n")
    write_h5(tmp_path / "ply_data_test0.h5", np.zeros((1, 8, 3), dtype=np.float32), np.array([[0]]))
    if junk.startswith(b"not"):
        (tmp_path / "ply_data_test0.h5").write_bytes(junk)
        bad = "ply_data_test0.h5: not a readable HDF5 file"
    else:
        (tmp_path / "shape_names.txt").write_bytes(junk)
        bad = "shape_names.txt: not UTF-8 text"
    with pytest.raises((OSError, ValueError), match=bad):
        build("modelnet40", "h5", storage=str(tmp_path))


@pytest.mark.parametrize("layout", ["id_to_category", "category_to_ids"])
def test_objaverse_lvis_skips_and_counts_objects_without_a_cloud(tmp_path, layout):
    (tmp_path / "points").mkdir()
    for uid in ("u1", "u2"):
        np.save(tmp_path / "points" / f"{uid}.npy", np.random.rand(30, 6).astype(np.float32))
    category = {"u1": "banana", "u2": "apple", "u3": "apple"}
    data = category if layout == "id_to_category" else {"apple": ["u2", "u3"], "banana": ["u1"]}
    (tmp_path / "lvis.json").write_text(json.dumps(data))
    test = build("objaverse_lvis", annotations=str(tmp_path / "lvis.json"), points_dir=str(tmp_path / "points"))["test"]
    assert test.classnames == ["apple", "banana"] and test.ids == ["u1", "u2"] and test.labels == [1, 0]
    assert test.num_skipped == 1


class SaysApple(WordModel):
    """Every cloud is an apple."""

    def encode_points(self, points):
        return None, None, torch.nn.functional.one_hot(torch.zeros(len(points), dtype=torch.long), 3).float()[:, None]


def test_zeroshot_evaluation_scores_the_clouds_that_are_readable(tmp_path, monkeypatch, caplog):
    (tmp_path / "points").mkdir()
    clouds = {uid: np.random.rand(30, 6).astype(np.float32) for uid in ("u1", "u2", "u3")}
    clouds["u2"][0, 0] = np.nan
    for uid, cloud in clouds.items():
        np.save(tmp_path / "points" / f"{uid}.npy", cloud)
    (tmp_path / "lvis.json").write_text(json.dumps({"u1": "apple", "u2": "apple", "u3": "banana"}))
    test = build("objaverse_lvis", annotations=str(tmp_path / "lvis.json"), points_dir=str(tmp_path / "points"))["test"]
    for name in ("result_dir", "output_dir"):
        monkeypatch.setitem(registry.mapping["paths"], name, str(tmp_path))
    task, model = PointZeroShotClassificationTask(templates=["a {}"], top_k=1), SaysApple(["apple", "banana"])
    task.before_evaluation(model, test)
    with caplog.at_level(logging.WARNING):
        results = task.evaluation(model, DataLoader(test, batch_size=2, collate_fn=test.collater))
    metrics = task.after_evaluation(results, "test", 0)
    assert metrics["num_samples"] == 2 and metrics["top1_accuracy"] == 0.5  # u1 right, u3 wrong, u2 dropped
    assert metrics["num_skipped"] == 1
    assert "evaluation: skipped 1 bad samples" in caplog.text and "u2.npy" in caplog.text


def test_zeroshot_evaluation_with_no_readable_cloud_is_an_error_not_nan_metrics(tmp_path, monkeypatch):
    (tmp_path / "points").mkdir()
    for uid in ("u1", "u2"):
        np.save(tmp_path / "points" / f"{uid}.npy", np.full((30, 6), np.nan, dtype=np.float32))
    (tmp_path / "lvis.json").write_text(json.dumps({"u1": "apple", "u2": "banana"}))
    test = build("objaverse_lvis", annotations=str(tmp_path / "lvis.json"), points_dir=str(tmp_path / "points"))["test"]
    for name in ("result_dir", "output_dir"):
        monkeypatch.setitem(registry.mapping["paths"], name, str(tmp_path))
    task, model = PointZeroShotClassificationTask(templates=["a {}"], top_k=1), SaysApple(["apple", "banana"])
    task.before_evaluation(model, test)
    results = task.evaluation(model, DataLoader(test, batch_size=2, collate_fn=test.collater))
    with pytest.raises(RuntimeError, match="no cloud of the split could be read \\(2 unreadable"):
        task.after_evaluation(results, "test", 0)
    assert not (tmp_path / "metrics.json").exists()


def test_objaverse_lvis_without_any_cloud_file_says_so(tmp_path):
    (tmp_path / "lvis.json").write_text(json.dumps({"u1": "apple"}))
    with pytest.raises(FileNotFoundError, match="none of the 1 objects"):
        build("objaverse_lvis", annotations=str(tmp_path / "lvis.json"), points_dir=str(tmp_path))


def test_embedded_classification_labels_are_the_shape_family(tmp_path):
    sizes = {"train": 8, "test": 8}
    test = build("shapes_point_classification", root=str(tmp_path), sizes=sizes, num_points=1024)["test"]
    folder = shapes.ensure_embedded_dataset(str(tmp_path), sizes=sizes, num_points=1024)
    with open(f"{folder}/test.jsonl") as f:
        truth = [json.loads(line)["shape"] for line in f]
    assert test.classnames == list(shapes.SHAPES) and [test.classnames[y] for y in test.labels] == truth


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("zeroshot"))
    cfg, builder = "projects/embedded/zeroshot_eval.yaml", "shapes_point_classification"
    return [evaluate(cfg, out, job, builder, "model.finetuned=null", nproc=n) for job, n in (("one", 1), ("two", 2))]


def test_zeroshot_through_evaluate_in_one_process_and_under_torchrun(runs):
    one, two = runs
    for metrics in runs:
        assert metrics["num_samples"] == SIZES["test"] and metrics["num_classes"] == 8
        assert 0.0 <= metrics["top1_accuracy"] <= metrics["top5_accuracy"] <= 1.0
    assert two["top1_accuracy"] == pytest.approx(one["top1_accuracy"], abs=0.07)


def test_the_modelnet40_project_yaml_runs_on_h5_files(tmp_path):
    """projects/modelnet40/zeroshot_eval.yaml as shipped, with the tiny model and a tiny h5 set."""
    (tmp_path / "shape_names.txt").write_text("airplane\nbathtub\n")
    write_h5(tmp_path / "ply_data_test0.h5", np.random.rand(3, 64, 3).astype(np.float32), np.array([[0], [1], [1]]))
    metrics = run_evaluate("projects/modelnet40/zeroshot_eval.yaml", str(tmp_path / "out"), "mn40",
                           f"datasets.modelnet40.build_info.storage={tmp_path}", "model.model_type=pretrain_tiny",
                           "model.point_encoder.model_type=tiny", "model.finetuned=null", "run.device=cpu",
                           "model.qformer.num_layers=2", "model.num_query_token=4",
                           "datasets.modelnet40.vis_processor.eval.num_points=1024")
    assert metrics["num_samples"] == 3 and metrics["num_classes"] == 2
