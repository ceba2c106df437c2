"""The bad-input suite: what a long run meets in real data, and what happens.

Each case ends one of two ways: an error naming the file and the problem (annotations, checkpoints:
read once, at start-up), or a counted skip (clouds and captions, met mid-epoch: logged when met,
summed over ranks and logged at the end of the epoch; training batches keep their size). Never a
crash mid-epoch, never code run from a file.

Also covered elsewhere, not repeated here: read_cloud on every bad file format (test_data_io.py),
annotation entries without a cloud file at build time (test_cap3d.py, counted and skipped), bad files
during conversion to shards (test_convert_points.py, listed in the report).
"""
import json
import logging
import os
import pathlib
import re
import types

import numpy as np
import pytest
import torch
from lavis.processors.blip_processors import BlipCaptionProcessor
from torch.utils.data import DataLoader

import lavis_point  # noqa: F401
from lavis_point.data_io import PointCloudError
from lavis_point.data_io.shards import ShardedClouds
from lavis_point.datasets.bad_samples import MAX_ATTEMPTS
from lavis_point.datasets.cap3d import CloudFiles, read_annotations
from lavis_point.datasets.classification import CloudFileList, PointClassificationDataset, read_lvis_annotations
from lavis_point.datasets import qa
from lavis_point.datasets.qa import PointQADataset, read_qa_annotations
from lavis_point.datasets.point_caption import PointCaptionDataset, read_jsonl
from lavis_point.models.checkpoint import CheckpointError, read_checkpoint
from lavis_point.processors.point_processors import PointEvalProcessor, PointTrainProcessor
from lavis_point.runners.runner_point import RunnerPoint
from lavis_point.tasks.base import PointBaseTask
from tests import point_files as pf
from tests.small_models import small_stage1, small_stage2
from tests.two_ranks import run_two_ranks

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_POINTS = 64


def processors(train=True):
    cfg = {"num_points": NUM_POINTS}
    vis = PointTrainProcessor.from_config(cfg) if train else PointEvalProcessor.from_config(cfg)
    return vis, BlipCaptionProcessor()


# ---- arrays: what the processors accept and refuse ----------------------------------------------

def n_by(n, width, dtype=np.float32, seed=0):
    return np.random.default_rng(seed).random((n, width)).astype(dtype)


ACCEPTED_ARRAYS = {
    "N x 3 (no colour: white)": n_by(500, 3),
    "N x 6": n_by(500, 6),
    "int64 xyz": np.random.default_rng(0).integers(-50, 50, (500, 3)),
    "int32 xyz + uint8-range rgb": np.concatenate([np.random.default_rng(0).integers(-5, 5, (500, 3)),
                                                   np.random.default_rng(1).integers(0, 256, (500, 3))],
                                                  axis=1).astype(np.int32),
    "float64": n_by(500, 6, np.float64),
    "float16": n_by(500, 6, np.float16),
    "one point": n_by(1, 6),
    "two points": n_by(2, 6),
    "fewer points than asked": n_by(NUM_POINTS - 1, 6),
    "duplicates only": np.tile(n_by(1, 6), (300, 1)),
}

REFUSED_ARRAYS = {
    "NaN": (np.where(np.arange(600).reshape(100, 6) == 7, np.nan, 1.0), "1 points have NaN or infinite"),
    "+inf": (np.where(np.arange(600).reshape(100, 6) == 0, np.inf, 1.0), "NaN or infinite"),
    "-inf in colour": (np.where(np.arange(600).reshape(100, 6) == 5, -np.inf, 1.0), "NaN or infinite"),
    "N x 4": (n_by(100, 4), r"\(N, 3\) or \(N, 6\).*\(100, 4\)"),
    "N x 7": (n_by(100, 7), r"\(100, 7\)"),
    "3 x N (transposed)": (n_by(100, 3).T, r"\(3, 100\)"),
    "1-D": (np.zeros(300), r"\(300,\)"),
    "zero points": (np.zeros((0, 3)), "no points"),
    "strings": (np.array([["1", "2", "3"]]), "dtype <U1"),
}


@pytest.mark.parametrize("name", ACCEPTED_ARRAYS)
@pytest.mark.parametrize("train", [True, False])
def test_odd_but_valid_clouds_become_the_configured_tensor(name, train):
    out = processors(train)[0](ACCEPTED_ARRAYS[name])
    assert out.shape == (NUM_POINTS, 6) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out[:, 3:].abs().max() <= 1


@pytest.mark.parametrize("name", REFUSED_ARRAYS)
def test_unusable_clouds_are_refused_with_the_reason(name):
    array, reason = REFUSED_ARRAYS[name]
    with pytest.raises(PointCloudError, match=reason):
        processors()[0](array)


# ---- clouds and captions met mid-epoch: counted skips -------------------------------------------

def write_cloud_files(folder, marker):
    """{name: (path, expected outcome)} for per-object cloud files, bad and good."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def npy(name, array, outcome):
        np.save(folder / f"{name}.npy", array)
        files[name] = (str(folder / f"{name}.npy"), outcome)

    def pkl(name, value, outcome):
        files[name] = (pf.write_pickle(folder / f"{name}.pkl", value), outcome)

    for i in range(6):
        npy(f"good{i}", pf.coloured_cloud(200, seed=i), "ok")
    npy("one_point", pf.coloured_cloud(1), "ok")
    npy("duplicates", np.tile(pf.coloured_cloud(1), (50, 1)), "ok")
    npy("ints", np.arange(300).reshape(100, 3), "ok")
    npy("float64", pf.coloured_cloud(100).astype(np.float64), "ok")
    pkl("truncated_pkl", pf.coloured_cloud(100), "truncated")
    pf.truncate(files["truncated_pkl"][0])
    npy("truncated_npy", pf.coloured_cloud(100), "unreadable")
    pf.truncate(files["truncated_npy"][0])
    pkl("dict_pickle", {"points": [1, 2, 3]}, "holds a dict")
    pkl("code_pickle", pf.CreatesFileWhenUnpickled(marker), "unsafe pickle")
    nan = pf.coloured_cloud(100)
    nan[3, 0] = np.nan
    npy("nan", nan, "NaN")
    inf = pf.coloured_cloud(100)
    inf[9, 2] = np.inf
    npy("inf", inf, "infinite")
    npy("n_by_4", pf.coloured_cloud(100)[:, :4], r"\(100, 4\)")
    npy("n_by_7", np.ones((100, 7), np.float32), r"\(100, 7\)")
    npy("three_by_n", pf.coloured_cloud(100)[:, :3].T.copy(), r"\(3, 100\)")
    npy("empty", np.zeros((0, 6), np.float32), "no points")
    files["deleted"] = (str(folder / "deleted.npy"), "no such file")  # listed, then gone mid-run
    return files


BAD_CAPTIONS = {"empty": "", "whitespace": " \t\n ", "punctuation only": "!!! ...", "lone surrogate": "a \udcff",
                "not text": 42, "null": None}
GOOD_CAPTIONS = {"very long": "a red cube " * 20000, "non-latin": "一个红色的立方体",
                 "control char": "a\x00red cube"}


def annotations_for(files):
    entries = [{"id": name, "path": path, "captions": [f"a thing called {name}"], "outcome": outcome}
               for name, (path, outcome) in files.items()]
    good_path = next(path for _, (path, outcome) in files.items() if outcome == "ok")
    entries += [{"id": f"caption_{k}", "path": good_path, "captions": [v], "outcome": "no usable caption"}
                for k, v in BAD_CAPTIONS.items()]
    entries += [{"id": f"caption_{k}", "path": good_path, "captions": [v], "outcome": "ok"}
                for k, v in GOOD_CAPTIONS.items()]
    # one bad caption among good ones: the good ones are used
    entries.append({"id": "caption_some_empty", "path": good_path, "captions": ["", "a blue cone"], "outcome": "ok"})
    return entries


@pytest.fixture
def mixed(tmp_path):
    marker = tmp_path / "marker"
    return annotations_for(write_cloud_files(tmp_path / "clouds", marker)), marker


def dataset(entries, train):
    vis, text = processors(train)
    return PointCaptionDataset(CloudFiles(), entries, vis, text, is_train=train)


def test_training_replaces_bad_samples_and_counts_each_with_its_file_and_reason(mixed, caplog):
    entries, marker = mixed
    data = dataset(entries, train=True)
    loader = DataLoader(data, batch_size=4, shuffle=False, collate_fn=data.collater)
    failures, rows = [], 0
    with caplog.at_level(logging.WARNING):
        for batch in loader:
            failures.extend(batch.pop("skipped"))
            n = len(batch["instance_id"])
            assert batch["point"].shape == (n, NUM_POINTS, 6) and torch.isfinite(batch["point"]).all()
            assert all(isinstance(t, str) and t.strip() for t in batch["text_input"])
            assert all(len(t.split()) <= 50 for t in batch["text_input"])  # very long captions are cut
            rows += n
    assert rows == len(entries)  # every batch kept its size: bad samples were replaced
    bad = [e for e in entries if e["outcome"] != "ok"]
    assert len(failures) >= len(bad)  # a substitute may itself be bad: then it is counted too
    for e in bad:
        mine = [f for f in failures if f.startswith(f"item {entries.index(e)} (id {e['id']!r}")]
        assert mine and re.search(e["outcome"], mine[0]), (e["id"], mine)
        if e["id"] in ("nan", "truncated_pkl", "deleted"):
            assert e["path"] in mine[0]  # the message names the file
    assert all(f in caplog.text for f in failures[:3])  # each is logged when met
    assert not marker.exists()  # the pickle that would run code never ran


def test_evaluation_drops_bad_samples_and_counts_them(mixed):
    entries, _ = mixed
    data = dataset(entries, train=False)
    loader = DataLoader(data, batch_size=4, shuffle=False, collate_fn=data.collater)
    ids, failures = [], []
    for batch in loader:
        failures.extend(batch.pop("skipped"))
        ids.extend(batch.get("instance_id", []))
    good = [e["id"] for e in entries if e["outcome"] == "ok"]
    assert ids == good  # each good cloud exactly once, in order: no substitutes in metrics
    assert len(failures) == len(entries) - len(good)


class _RecordingTask(PointBaseTask):
    def valid_step(self, model, samples):
        return list(samples["instance_id"])


def test_the_evaluation_loop_survives_a_batch_of_only_bad_samples(mixed, caplog):
    entries, _ = mixed
    bad = [e for e in entries if e["outcome"] != "ok"][:4]
    good = [e for e in entries if e["outcome"] == "ok"][:3]
    data = dataset(bad + good, train=False)
    loader = DataLoader(data, batch_size=4, shuffle=False, collate_fn=data.collater)  # batch 1: all bad
    with caplog.at_level(logging.WARNING):
        results = _RecordingTask().evaluation(torch.nn.Linear(1, 1), loader)
    assert results == [e["id"] for e in good]
    assert "evaluation: skipped 4 bad samples over all ranks" in caplog.text


def test_a_bad_item_two_ranks_meet_through_the_samplers_padding_is_counted_once(mixed, tmp_path):
    """3 items on 2 ranks: the DistributedSampler pads rank 1 with item 0 again, which is bad. It is
    one bad sample, so the metrics' num_skipped must say 1 on every rank."""
    entries, _ = mixed
    bad = next(e for e in entries if e["outcome"] != "ok")
    good = [e for e in entries if e["outcome"] == "ok"][:2]

    def evaluate(rank):
        data = dataset([bad] + good, train=False)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=2, rank=rank, shuffle=False)
        task = _RecordingTask()
        results = task.evaluation(torch.nn.Linear(1, 1), DataLoader(data, batch_size=2, sampler=sampler,
                                                                     collate_fn=data.collater))
        return {"results": results, "skipped": task.skipped_in_evaluation}

    reports = run_two_ranks(evaluate, tmp_path)
    assert sorted(reports[0]["results"] + reports[1]["results"]) == sorted(e["id"] for e in good)
    assert [r["skipped"] for r in reports] == [1, 1]


def test_a_training_epoch_with_bad_samples_finishes_and_reports_the_count(mixed, caplog):
    from lavis.common.optims import LinearWarmupCosineLRScheduler

    entries, marker = mixed
    bad = [e for e in entries if e["outcome"] != "ok"]
    entries = bad[::2] + [e for e in entries if e["outcome"] == "ok"][:2]  # 12 items, 3 steps: seconds
    data = dataset(entries, train=True)
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=data.collater)
    model = small_stage1().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = LinearWarmupCosineLRScheduler(optimizer, max_epoch=1, min_lr=1e-5, init_lr=1e-4)
    with caplog.at_level(logging.WARNING):
        stats = PointBaseTask()._train_inner_loop(0, len(loader), model, loader, optimizer, schedule, log_freq=100)
    assert stats["skipped_samples"] >= len(bad[::2])  # substitutes that are bad count too
    assert f"train epoch 0: skipped {stats['skipped_samples']} bad samples over all ranks" in caplog.text
    assert np.isfinite(float(stats["loss"])) and not marker.exists()


def test_a_broken_data_set_stops_with_a_clear_error_instead_of_looping(tmp_path):
    entries = [{"id": str(i), "path": str(tmp_path / f"gone{i}.npy"), "captions": ["a cube"]} for i in range(50)]
    with pytest.raises(RuntimeError, match=f"{MAX_ATTEMPTS} bad samples in a row.*gone"):
        dataset(entries, train=True)[0]


def understanding_set(kind, files, train):
    """A QA or classification set with one item per file of ``write_cloud_files``; ids are the names."""
    vis, text = processors(train)
    names, paths = list(files), [path for path, _ in files.values()]
    if kind == "qa":
        entries = [{"question_id": n, "cloud": p, "question": "what is it?", "answers": ["a thing"]}
                   for n, p in zip(names, paths)]
        return PointQADataset(qa.CloudFiles(), entries, vis, text, is_train=train)
    return PointClassificationDataset(CloudFileList(paths), [0] * len(names), names, ["thing"], vis)


@pytest.mark.parametrize("kind", ["qa", "classification"])
def test_qa_and_classification_evaluation_drop_bad_clouds_and_count_them(tmp_path, kind):
    files = write_cloud_files(tmp_path / "clouds", tmp_path / "marker")
    data = understanding_set(kind, files, train=False)
    ids, failures = [], []
    for batch in DataLoader(data, batch_size=4, shuffle=False, collate_fn=data.collater):
        failures.extend(batch.pop("skipped"))
        ids.extend(batch.get("instance_id", []))
    assert ids == [n for n, (_, outcome) in files.items() if outcome == "ok"]  # each good cloud once
    bad = [(n, path, outcome) for n, (path, outcome) in files.items() if outcome != "ok"]
    assert len(failures) == len(bad)
    for failure, (name, path, outcome) in zip(failures, bad):
        assert repr(name) in failure and path in failure and re.search(outcome, failure), failure
    assert not (tmp_path / "marker").exists()


def test_qa_training_replaces_bad_clouds_and_counts_them(tmp_path):
    files = write_cloud_files(tmp_path / "clouds", tmp_path / "marker")
    data = understanding_set("qa", files, train=True)
    rows, failures = 0, []
    for batch in DataLoader(data, batch_size=4, shuffle=False, collate_fn=data.collater):
        failures.extend(batch.pop("skipped"))
        assert batch["point"].shape == (len(batch["text_input"]), NUM_POINTS, 6)
        assert list(batch["text_input"]) == ["a thing"] * len(batch["text_input"])
        rows += len(batch["text_input"])
    assert rows == len(files)  # batches kept their size
    assert len(failures) >= sum(outcome != "ok" for _, outcome in files.values())
    assert not (tmp_path / "marker").exists()


# ---- shards: missing, truncated, short ----------------------------------------------------------

def test_shard_problems_are_counted_skips_that_name_the_shard(tmp_path):
    np.save(tmp_path / "train_points_00000.npy", np.stack([pf.coloured_cloud(100, seed=i) for i in range(4)]))
    np.save(tmp_path / "train_points_00001.npy", np.stack([pf.coloured_cloud(100, seed=i) for i in range(4)]))
    pf.truncate(str(tmp_path / "train_points_00001.npy"), 0.5)
    entries = [{"id": f"ok{i}", "shard": "train_points_00000.npy", "index": i, "caption": "a cube"} for i in range(4)]
    entries += [{"id": "short", "shard": "train_points_00000.npy", "index": 9, "caption": "a cube"},
                {"id": "missing", "shard": "train_points_00002.npy", "index": 0, "caption": "a cube"},
                {"id": "truncated", "shard": "train_points_00001.npy", "index": 0, "caption": "a cube"}]
    vis, text = processors(train=False)
    data = PointCaptionDataset(ShardedClouds(str(tmp_path), "train"), entries, vis, text, is_train=False)
    batch = data.collater([data[i] for i in range(len(entries))])
    assert list(batch["instance_id"]) == ["ok0", "ok1", "ok2", "ok3"]
    failures = batch["skipped"]
    assert len(failures) == 3
    assert "train_points_00000.npy[9]" in failures[0] and "index 9 is out of bounds" in failures[0]
    assert "train_points_00002.npy: point shard named by the index is missing" in failures[1]
    assert "train_points_00001.npy[0]" in failures[2]


# ---- annotations: read at start-up, errors name the file ----------------------------------------

@pytest.mark.parametrize("name,content,reason", [
    ("a.json", b'[{"point": "a.pkl", "caption": "a cube"', r"a\.json: malformed JSON: Expecting"),
    ("a.json", b"", r"a\.json: malformed JSON"),
    ("a.json", b'[{"point": "a.pkl", "caption": "a \xff cube"}]',
     r"a\.json: not UTF-8 text \(invalid start byte at byte 34\)"),
    ("a.csv", b"uid1,a \xfe cube\n", r"a\.csv: not UTF-8 text"),
    ("a.jsonl", b'{"point": "a.pkl", "caption": "ok"}\n{"point": \n', r"a\.jsonl:2: malformed JSON line"),
    ("a.jsonl", b'{"point": "a.pkl", "caption": "ok"}\n{"caption": "\xc3"}\n', r"a\.jsonl:2: not UTF-8 text"),
    ("a.json", b'{"nothing": 1}', r"a\.json: expected a JSON list"),
])
def test_malformed_annotation_files_name_the_file_and_the_problem(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        read_annotations(str(tmp_path / name))


@pytest.mark.parametrize("read,name,content,reason", [
    (lambda p: read_qa_annotations(p, "."), "qa.json", b'[{"point": "a.npy", "question": "q"', r"qa\.json: malformed JSON"),
    (lambda p: read_qa_annotations(p, "."), "qa.jsonl", b'{"point": "a.npy", "question": "q", "answer": "a"}\n{"po\n',
     r"qa\.jsonl:2: malformed JSON line"),
    (lambda p: read_qa_annotations(p, "."), "qa.json", b'[{"point": "a.npy", "question": "\xff"}]', r"qa\.json: not UTF-8"),
    (read_lvis_annotations, "lvis.json", b'{"u1": "apple",', r"lvis\.json: malformed JSON"),
])
def test_malformed_qa_and_label_files_name_the_file_and_the_problem(tmp_path, read, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=reason):
        read(str(tmp_path / name))


def test_a_shard_index_with_a_bad_line_names_the_line(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"id": "a", "index": 0, "caption": "x"}\n\n[1, 2\n')
    with pytest.raises(ValueError, match=r"train\.jsonl:3: malformed JSON line"):
        read_jsonl(str(tmp_path / "train.jsonl"))


# ---- checkpoints: weights_only everywhere, code never runs --------------------------------------

@pytest.fixture
def code_checkpoint(tmp_path):
    marker = tmp_path / "marker"
    path = str(tmp_path / "evil.pth")
    torch.save({"model": small_stage1().state_dict(), "extra": pf.CreatesFileWhenUnpickled(marker)}, path)
    return path, marker


@pytest.mark.parametrize("load", [
    read_checkpoint,
    lambda p: small_stage1().load_checkpoint(p),
    lambda p: small_stage2().load_from_pretrained(p),
    lambda p: RunnerPoint._load_checkpoint(types.SimpleNamespace(), p),  # resume reads the file first
])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_loader(code_checkpoint, load):
    path, marker = code_checkpoint
    with pytest.raises(CheckpointError, match=r"evil\.pth: refused to load: .*weights_only=True") as caught:
        load(path)
    assert "plain containers" in str(caught.value) and not marker.exists()


LOADS = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
                   r"|\bdill\b|joblib\.load")


def test_no_code_path_reads_a_file_with_plain_pickle():
    """Every torch.load passes weights_only=True; nothing else unpickles (the restricted unpickler in
    data_io/safe_pickle.py subclasses pickle.Unpickler and is the one exception)."""
    sources = [p for d in ("lavis_point", "scripts") for p in (ROOT / d).rglob("*.py")]
    sources += [ROOT / "train.py", ROOT / "evaluate.py"]
    found = []
    for path in sources:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if LOADS.search(code) and "weights_only=True" not in code and '"""' not in code and "``" not in code:
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, found
    assert "torch.load(path, map_location=\"cpu\", weights_only=True)" in (
        ROOT / "lavis_point/models/checkpoint.py").read_text()
