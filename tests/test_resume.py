"""Resume and hand-over through train.py / evaluate.py, as a user runs them:

- a stage-1 run (1 epoch) writes ``checkpoint_last.pth``; a second run with ``run.max_epoch=2`` and
  ``run.resume_ckpt_path`` set resumes from it, trains only the remaining epoch and saves epoch 1;
- a stage-2 run from that stage-1 file with a frozen encoder saves a checkpoint without the encoder;
  evaluation rebuilds the encoder from stage 1 (``model.pretrained``), loads the stage-2 checkpoint
  (``model.finetuned``) and writes ``metrics.json``.
"""
import json
import os

import pytest
import torch

from tests.test_end_to_end import SMALL_DATA, run


def options(out, job, max_epoch, *extra):
    return ["--options", f"run.output_dir={out}", f"run.job_id={job}", f"run.max_epoch={max_epoch}",
            "run.batch_size_train=16", "run.batch_size_eval=16", "run.warmup_steps=2", *SMALL_DATA, *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return str(tmp_path_factory.mktemp("resume_runs"))


@pytest.fixture(scope="module")
def stage1(out):
    log = run(["train.py", "--cfg-path", "projects/embedded/stage1.yaml", *options(out, "stage1", 1)], out)
    return os.path.join(out, "stage1", "checkpoint_last.pth"), log


@pytest.fixture(scope="module")
def stage2(out, stage1):
    stage1_path, _ = stage1
    log = run(["train.py", "--cfg-path", "projects/embedded/stage2.yaml",
               *options(out, "stage2", 1, f"model.pretrained={stage1_path}", "model.freeze_encoder=True",
                        "run.save_frozen_parts=False")], out)
    return os.path.join(out, "stage2", "checkpoint_last.pth"), log


def test_first_run_writes_checkpoint_last_of_epoch_0(stage1):
    path, log = stage1
    assert os.path.isfile(path), log[-3000:]
    ckpt = load(path)
    assert ckpt["epoch"] == 0
    assert {"model", "optimizer", "config", "epoch"} <= set(ckpt)


def test_second_run_resumes_and_saves_epoch_1(out, stage1):
    stage1_path, _ = stage1
    before = load(stage1_path)
    log = run(["train.py", "--cfg-path", "projects/embedded/stage1.yaml",
               *options(out, "resumed", 2, f"run.resume_ckpt_path={stage1_path}")], out)
    assert f"Resume checkpoint from {stage1_path}" in log
    # only the remaining epoch is trained
    assert "Train: data epoch: [1]" in log and "Train: data epoch: [0]" not in log
    after = load(os.path.join(out, "resumed", "checkpoint_last.pth"))
    assert after["epoch"] == 1
    assert set(after["model"]) == set(before["model"])
    assert any(not torch.equal(after["model"][k], before["model"][k]) for k in before["model"])  # it trained
    assert after["optimizer"]["state"], "the optimiser state is saved for a further resume"


def test_stage2_checkpoint_leaves_the_frozen_encoder_out(stage2):
    path, log = stage2
    assert os.path.isfile(path), log[-3000:]
    state = load(path)["model"]
    assert not [k for k in state if k.startswith("point_encoder.")]
    assert "opt_proj.weight" in state and any(k.startswith("Qformer.") for k in state)
    assert "itm_head.weight" not in state


def test_stage2_checkpoint_evaluates_with_the_stage1_encoder(out, stage1, stage2):
    stage1_path, _ = stage1
    stage2_path, _ = stage2
    log = run(["evaluate.py", "--cfg-path", "projects/embedded/caption_eval.yaml",
               *options(out, "eval", 1, f"model.finetuned={stage2_path}", f"model.pretrained={stage1_path}",
                        "model.freeze_encoder=True")], out)
    assert f"{stage1_path}: loaded" in log and f"{stage2_path}: loaded" in log
    metrics_path = os.path.join(out, "eval", "metrics.json")
    assert os.path.isfile(metrics_path), log[-3000:]
    metrics = json.load(open(metrics_path))["test"]
    assert metrics["num_samples"] == 16
    for key in ("bleu_4", "cider", "meteor", "shape_accuracy", "color_accuracy"):
        assert key in metrics


def test_save_frozen_parts_keeps_the_frozen_stage1_encoder_in_the_stage2_file(out, stage1):
    stage1_path, _ = stage1
    log = run(["train.py", "--cfg-path", "projects/embedded/stage2.yaml",
               *options(out, "stage2_whole", 1, f"model.pretrained={stage1_path}", "model.freeze_encoder=True",
                        "run.save_frozen_parts=True")], out)
    path = os.path.join(out, "stage2_whole", "checkpoint_last.pth")
    assert os.path.isfile(path), log[-3000:]
    state, before = load(path)["model"], load(stage1_path)["model"]
    encoder = [k for k in before if k.startswith("point_encoder.")]
    assert encoder and all(torch.equal(state[k], before[k]) for k in encoder)  # frozen: the stage-1 weights
