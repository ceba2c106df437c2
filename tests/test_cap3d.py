"""The cap3d_point_caption builder: annotations (GPT4Point JSON, Cap3D CSV, JSONL), clouds read from
per-object files or from converted shards, and a tiny run of projects/cap3d/stage1.yaml."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from lavis.models import load_model
from omegaconf import OmegaConf

import lavis_point  # noqa: F401
from lavis_point.data_io.convert import convert_split
from lavis_point.datasets.builders import read_index
from lavis_point.datasets.cap3d import locate_clouds, read_annotations
from lavis_point.datasets.packed import PackedEntries
from tests import point_files as pf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IDS = 12


def config(**build_info):
    cfg = OmegaConf.load(registry.get_builder_class("cap3d_point_caption").default_config_path())
    cfg = cfg.datasets.cap3d_point_caption
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    cfg.vis_processor.train.num_points = cfg.vis_processor.eval.num_points = 512
    return cfg


def build(cfg):
    return registry.get_builder_class("cap3d_point_caption")(cfg).build_datasets()


@pytest.fixture(scope="module")
def cap3d_root(tmp_path_factory):
    """root/clouds/<uid>.pkl, root/annotations/{split}.json (GPT4Point style), root/shards (converted)."""
    root = tmp_path_factory.mktemp("cap3d")
    (root / "clouds").mkdir()
    (root / "annotations").mkdir()
    for i in range(NUM_IDS):
        pf.write_pickle(root / "clouds" / f"uid{i:02d}.pkl", pf.coloured_cloud(1024, seed=i))
    splits = {"train": range(0, 8), "val": range(8, 10), "test": range(10, NUM_IDS)}
    for split, ids in splits.items():
        rows = [{"point": f"uid{i:02d}.pkl", "caption": f"object {i} in red"} for i in ids]
        (root / "annotations" / f"{split}.json").write_text(json.dumps(rows))
        located, missing = locate_clouds(read_annotations(str(root / "annotations" / f"{split}.json")),
                                         str(root / "clouds"))
        convert_split(located, missing, str(root / "clouds"), str(root / "shards"), split, num_points=1024,
                      shard_size=3, progress=False)
    return root


def test_gpt4point_json_groups_captions_by_object(tmp_path):
    rows = [{"point": "objs/aaa.pkl", "caption": "one"}, {"point": "objs/bbb.pkl", "caption": "two"},
            {"point": "objs/aaa.pkl", "caption": "three"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert read_annotations(str(tmp_path / "a.json")) == [
        {"id": "aaa", "point": "objs/aaa.pkl", "captions": ["one", "three"]},
        {"id": "bbb", "point": "objs/bbb.pkl", "captions": ["two"]}]


def test_cap3d_csv_with_or_without_header_and_commas_in_captions(tmp_path):
    (tmp_path / "a.csv").write_text('uid,caption\nabc,"red, round chair"\ndef,a lamp\n')
    (tmp_path / "b.csv").write_text('abc,"red, round chair"\ndef,a lamp\n')
    expected = [{"id": "abc", "point": None, "captions": ["red, round chair"]},
                {"id": "def", "point": None, "captions": ["a lamp"]}]
    assert read_annotations(str(tmp_path / "a.csv")) == expected == read_annotations(str(tmp_path / "b.csv"))


@pytest.mark.parametrize("content,name,reason", [
    ('[{"point": "a.pkl"}]', "a.json", "entry 1: no caption"),
    ('{"point": "a.pkl"}', "a.json", "expected a JSON list"),
    ("abc\n", "a.csv", "row 1: expected 'uid,caption'"),
    ("{}", "a.yaml", "unknown annotation format"),
])
def test_bad_annotations_name_the_file_and_entry(tmp_path, content, name, reason):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=reason) as caught:
        read_annotations(str(tmp_path / name))
    assert str(tmp_path / name) in str(caught.value)


def test_files_source_reads_per_object_pickles_from_the_env_var_root(cap3d_root, tmp_path, monkeypatch):
    monkeypatch.setenv("LAVIS_POINT_CAP3D", str(cap3d_root))
    datasets = build(config(source="files"))
    assert {k: len(v) for k, v in datasets.items()} == {"train": 8, "val": 2, "test": 2}
    item = datasets["test"][0]
    assert item["point"].shape == (512, 6) and item["instance_id"] == "uid10"
    assert item["text_input"] == "object 10 in red"


def test_files_source_skips_and_counts_objects_without_a_cloud(cap3d_root, tmp_path, caplog):
    rows = [{"point": "uid00.pkl", "caption": "a"}, {"point": "gone.pkl", "caption": "b"}]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    datasets = build(config(root=str(cap3d_root), source="files", splits=["train"],
                            annotations={"train": str(tmp_path / "train.json")}))
    assert len(datasets["train"]) == 1 and "1 of 2 objects have no cloud file" in caplog.text


def test_shards_and_files_give_the_same_items_up_to_float16(cap3d_root):
    from_shards = build(config(root=str(cap3d_root), source="shards"))
    from_files = build(config(root=str(cap3d_root), source="files"))
    for split in ("train", "val", "test"):
        assert len(from_shards[split]) == len(from_files[split])
        for i in range(len(from_files[split])):
            a = from_shards[split][i]
            b = from_files[split][i]
            assert a["instance_id"] == b["instance_id"] and a["text_input"] == b["text_input"]
            if split != "train":  # eval items are deterministic: same cloud, same tensor (float16 storage)
                assert torch.allclose(a["point"], b["point"], atol=2e-3)


@pytest.mark.parametrize("source", ["shards", "files"])
def test_datasets_hold_their_entries_packed_as_they_were_read(cap3d_root, source):
    train = build(config(root=str(cap3d_root), source=source))["train"]
    if source == "shards":
        expected = read_index(str(cap3d_root / "shards" / "train.jsonl"), sharded=True)
    else:
        expected, _ = locate_clouds(read_annotations(str(cap3d_root / "annotations" / "train.json")),
                                    str(cap3d_root / "clouds"))
    assert isinstance(train.annotations, PackedEntries) and list(train.annotations) == expected


@pytest.mark.parametrize("source, annotations", [("shards", "train.jsonl"), ("files", "train.json")])
def test_both_sources_honour_the_prompt_and_match_by_options(cap3d_root, source, annotations):
    cfg = config(root=str(cap3d_root), source=source)
    cfg.prompt, cfg.match_by = "a 3D model of", ["id"]  # a stage-2 mix with QA; items alike by id
    train = build(cfg)["train"]
    assert train[0]["prompt"] == "a 3D model of" and len({train[i]["match_id"] for i in range(3)}) == 3
    cfg.match_by = ["shape"]
    with pytest.raises(ValueError, match=f"{annotations}: match_by .* has no"):
        build(cfg)


def test_a_hand_written_shard_index_is_read_as_the_cap3d_files_are(cap3d_root, tmp_path):
    """source: shards over an index written by hand, not by convert_points: integer ids (a tensor in the
    batch: LAVIS's save_result failed after generation), a lone 'captions' string (trained on letters),
    one row per caption (references kept the last row's only) and one id for two clouds (scored against
    another cloud's references) are read as read_annotations reads them, or refused."""
    (tmp_path / "shards").mkdir()
    for name in ("test_points_00000.npy", "test_points_00000_stats.npy"):
        (tmp_path / "shards" / name).write_bytes((cap3d_root / "shards" / name).read_bytes())
    rows = [{"id": 10, "shard": "test_points_00000.npy", "index": 0, "captions": "a red chair"},
            {"id": 11, "shard": "test_points_00000.npy", "index": 1, "caption": "a blue lamp"},
            {"id": 11, "shard": "test_points_00000.npy", "index": 1, "caption": "a lamp"}]
    (tmp_path / "shards" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = build(config(root=str(tmp_path), source="shards", splits=["test"]))["test"]
    assert test.references == {"10": ["a red chair"], "11": ["a blue lamp", "a lamp"]}
    assert test.collater([test[0], test[1]])["instance_id"] == ["10", "11"]
    rows.append({**rows[0], "index": 1})
    (tmp_path / "shards" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"test\.jsonl: id '10' on lines 1 and 4 names two different clouds"):
        build(config(root=str(tmp_path), source="shards", splits=["test"]))


def test_an_unknown_source_is_refused(cap3d_root):
    with pytest.raises(ValueError, match="source: expected 'shards' or 'files'"):
        build(config(root=str(cap3d_root), source="tar"))


def test_a_tiny_stage1_run_of_the_cap3d_project_yaml(cap3d_root, tmp_path):
    """projects/cap3d/stage1.yaml with its model swapped for the tiny one (LAVIS picks a model's default
    config from the YAML's model_type, not from --options) and a few steps, on converted shards."""
    cfg = OmegaConf.load(os.path.join(ROOT, "projects", "cap3d", "stage1.yaml"))
    assert "cap3d_point_caption" in cfg.datasets and cfg.datasets.cap3d_point_caption.build_info.source == "shards"
    cfg.model = {"arch": "point_qformer", "model_type": "pretrain_tiny"}
    OmegaConf.save(cfg, tmp_path / "stage1_tiny.yaml")
    out = str(tmp_path / "runs")
    options = [f"datasets.cap3d_point_caption.build_info.root={cap3d_root}",
               "datasets.cap3d_point_caption.vis_processor.train.num_points=1024",
               "datasets.cap3d_point_caption.vis_processor.eval.num_points=1024",
               "run.device=cpu", "run.distributed=false", "run.amp=false", "run.num_workers=0",
               "run.batch_size_train=4", "run.max_epoch=1", "run.warmup_steps=1", f"run.output_dir={out}",
               "run.job_id=tiny"]
    proc = subprocess.run([sys.executable, "train.py", "--cfg-path", str(tmp_path / "stage1_tiny.yaml"),
                           "--options", *options], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    path = os.path.join(out, "tiny", "checkpoint_last.pth")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 0 and any(k.startswith("Qformer.") for k in ckpt["model"])
    assert load_model("point_qformer", "pretrain_tiny", checkpoint=path) is not None
    with open(os.path.join(out, "tiny", "log.txt")) as f:
        logged = [json.loads(line) for line in f if line.startswith('{"train')]
    assert logged and np.isfinite(float(logged[-1]["train_loss"]))


def test_annotations_with_a_byte_order_mark_read_as_without(tmp_path):
    """Spreadsheet exports often start with one; it must not become part of the first id or hide the
    CSV header."""
    files = {"a.csv": 'uid,caption\nabc,a lamp\n', "b.csv": 'abc,a lamp\n',
             "c.json": '[{"uid": "abc", "caption": "a lamp"}]', "d.jsonl": '{"uid": "abc", "caption": "a lamp"}\n'}
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert read_annotations(str(tmp_path / name)) == [{"id": "abc", "point": None, "captions": ["a lamp"]}], name


def test_a_captions_string_is_one_caption_and_a_zero_uid_is_an_id(tmp_path):
    rows = [{"uid": 0, "point": "x/b2.pkl", "captions": "a wooden chair"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert read_annotations(str(tmp_path / "a.json")) == [{"id": "0", "point": "x/b2.pkl",
                                                          "captions": ["a wooden chair"]}]


@pytest.mark.parametrize("rows", [
    [{"point": "a/model.npy", "caption": "a red chair"}, {"point": "b/model.npy", "caption": "a blue car"}],
    [{"uid": "m", "point": "a/model.npy", "caption": "a red chair"},
     {"uid": "m", "point": "b/model.npy", "caption": "a blue car"}],
])
def test_one_id_for_two_cloud_paths_is_refused(tmp_path, rows):
    """ShapeNet / Objaverse-XL keep one model.* per folder: the stem is no id there. The second cloud was
    dropped and its caption given to the first."""
    (tmp_path / "a.json").write_text(json.dumps([{"point": "c.npy", "caption": "x"}] + rows))
    with pytest.raises(ValueError) as caught:
        read_annotations(str(tmp_path / "a.json"))
    message = str(caught.value)
    for part in (str(tmp_path / "a.json"), "entries 2 and 3", f"'{rows[0].get('uid', 'model')}'",
                 "'a/model.npy'", "'b/model.npy'", "its own 'uid'"):
        assert part in message, (part, message)


def test_rows_for_one_cloud_or_one_csv_uid_still_merge_their_captions(tmp_path):
    rows = [{"point": "a/model.npy", "caption": "one"}, {"uid": "b", "caption": "two"},
            {"point": "a/model.npy", "caption": "three"}, {"uid": "b", "point": "x/b.npy", "caption": "four"}]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    assert read_annotations(str(tmp_path / "a.json")) == [
        {"id": "model", "point": "a/model.npy", "captions": ["one", "three"]},
        {"id": "b", "point": None, "captions": ["two", "four"]}]
    (tmp_path / "a.csv").write_text("abc,a lamp\ndef,a chair\nabc,a desk lamp\n")
    assert read_annotations(str(tmp_path / "a.csv")) == [
        {"id": "abc", "point": None, "captions": ["a lamp", "a desk lamp"]},
        {"id": "def", "point": None, "captions": ["a chair"]}]


def test_an_id_naming_several_files_in_the_folder_is_missing_with_the_reason(tmp_path, caplog):
    """Looked up by id (Cap3D's CSV has no paths), 'model' matched a/model.npy and b/model.pkl and the
    first was taken silently."""
    clouds = tmp_path / "clouds"
    for name in ("a/model.npy", "b/model.pkl", "c/lamp.npy", "c/d/model.ply"):
        (clouds / name).parent.mkdir(parents=True, exist_ok=True)
        (clouds / name).write_bytes(b"")
    (tmp_path / "a.csv").write_text("model,a chair\nlamp,a lamp\ngone,a ghost\n")
    located, missing = locate_clouds(read_annotations(str(tmp_path / "a.csv")), str(clouds))
    assert [(e["id"], e["path"]) for e in located] == [("lamp", str(clouds / "c" / "lamp.npy"))]
    assert [e["id"] for e in missing] == ["model", "gone"] and "reason" not in missing[1]
    reason = missing[0]["reason"]
    for part in ("a/model.npy", "b/model.pkl", "c/d/model.ply", "'point'"):
        assert part in reason, (part, reason)
    build(config(root=str(tmp_path), source="files", clouds="clouds", splits=["train"],
                 annotations={"train": str(tmp_path / "a.csv")}))
    assert "2 of 3 objects" in caplog.text and "a/model.npy" in caplog.text
