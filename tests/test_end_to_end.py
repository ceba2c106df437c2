"""The README's pipeline, shortened: stage 1 -> stage 2 (from stage 1's checkpoint) -> caption
evaluation, through train.py / evaluate.py and LAVIS's runner, as a user runs them; and stage 1
under torchrun with 2 CPU processes (gloo)."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from lavis.models import load_model

import lavis_point  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DATA = ["datasets.shapes_point_caption.build_info.sizes.train=64",
              "datasets.shapes_point_caption.build_info.sizes.val=16",
              "datasets.shapes_point_caption.build_info.sizes.test=16",
              "datasets.shapes_point_caption.build_info.num_points=2048"]


def run(args, out, env_extra=None, timeout=900):
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


def options(out, job, *extra):
    return ["--options", f"run.output_dir={out}", f"run.job_id={job}", "run.max_epoch=1",
            "run.batch_size_train=16", "run.batch_size_eval=16", "run.warmup_steps=2", *SMALL_DATA, *extra]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs"))
    run(["train.py", "--cfg-path", "projects/embedded/stage1.yaml", *options(out, "stage1")], out)
    stage1 = os.path.join(out, "stage1", "checkpoint_last.pth")
    stage2_log = run(["train.py", "--cfg-path", "projects/embedded/stage2.yaml",
                      *options(out, "stage2", f"model.pretrained={stage1}")], out)
    with open(os.path.join(out, "stage2_output.log"), "w") as f:
        f.write(stage2_log)
    stage2 = os.path.join(out, "stage2", "checkpoint_last.pth")
    log = run(["evaluate.py", "--cfg-path", "projects/embedded/caption_eval.yaml",
               *options(out, "eval", f"model.finetuned={stage2}")], out)
    return out, log


def test_stage1_checkpoint_is_written_and_loads(pipeline):
    out, _ = pipeline
    path = os.path.join(out, "stage1", "checkpoint_last.pth")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 0 and any(k.startswith("Qformer.") for k in ckpt["model"])
    load_model("point_qformer", "pretrain_tiny", checkpoint=path)


def test_stage2_starts_from_stage1_weights(pipeline):
    """Stage 2 loads stage 1's encoder, projection and query path; so the encoder's first conv of the
    stage-2 checkpoint stays close to stage 1's (one short epoch), not a fresh random init."""
    out, _ = pipeline
    s1 = torch.load(os.path.join(out, "stage1", "checkpoint_last.pth"), weights_only=True)["model"]
    s2 = torch.load(os.path.join(out, "stage2", "checkpoint_last.pth"), weights_only=True)["model"]
    key = "point_encoder.encoder.first_conv.0.weight"
    fresh = load_model("point_opt", "caption_tiny").state_dict()[key]
    assert (s2[key] - s1[key]).abs().mean() < (s2[key] - fresh).abs().mean()
    assert "opt_proj.weight" in s2 and "itm_head.weight" not in s2


def test_stage2_yaml_reuses_each_clouds_encoder_tokens(pipeline):
    """projects/embedded/stage2.yaml caches the frozen encoder's tokens and trains without
    augmentation, so a cloud met again (its QA items reuse the 64 caption clouds) is a cache hit:
    what keeps the main job within its time budget."""
    out, _ = pipeline
    with open(os.path.join(out, "stage2_output.log")) as f:
        found = re.findall(r"Point token cache: (\d+) of \d+ clouds held; (\d+) hits, (\d+) misses", f.read())
    assert found, "no token cache summary in the stage-2 log"
    held, hits, misses = map(int, found[-1])
    assert held == 64 and misses < 64 + 16 and hits > misses  # each cloud encoded about once


def test_evaluation_writes_lavis_results_and_metrics(pipeline):
    out, log = pipeline
    results = json.load(open(os.path.join(out, "eval", "result", "test_epochbest.json")))
    assert len(results) == 16 and all(set(r) == {"image_id", "caption"} for r in results)
    assert all(r["image_id"].startswith("test_") for r in results)
    metrics = json.load(open(os.path.join(out, "eval", "metrics.json")))["test"]
    for key in ("bleu_1", "bleu_4", "meteor", "rouge_l", "cider", "sbert_similarity", "shape_accuracy",
                "color_accuracy", "num_samples"):
        assert key in metrics
    assert metrics["num_samples"] == 16


def test_stage1_under_torchrun_with_two_cpu_processes(tmp_path):
    out = str(tmp_path)
    log = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
               "--cfg-path", "projects/embedded/stage1.yaml", *options(out, "ddp")], out,
              env_extra={"OMP_NUM_THREADS": "1"})
    path = os.path.join(out, "ddp", "checkpoint_last.pth")
    assert os.path.isfile(path), log[-3000:]
    model = load_model("point_qformer", "pretrain_tiny", checkpoint=path)  # 1-process load
    assert model is not None
