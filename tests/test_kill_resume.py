"""Kill and resume, as a user meets it: a stage-1 ``train.py`` run is killed with SIGKILL the moment
its epoch-0 ``checkpoint_last.pth`` appears, then resumed from that file with
``run.resume_ckpt_path``. Against an uninterrupted run with the same seed it must end at the same
optimiser step count, see the same loss at every step after the resume (so the same batches,
augmentation and matching negatives: the checkpoint carries every random stream), and end with the
same weights. (tests/test_resume.py covers the resume contract itself: epochs, keys, hand-over.)"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from lavis_point.datasets import shapes
from tests.test_end_to_end import ROOT

SIZES = {"train": 32, "val": 8, "test": 8}
STEPS_PER_EPOCH = SIZES["train"] // 8
# The embedded stage-1 config made small (same code path), so each run takes seconds.
SMALL_MODEL = ["model.qformer_init=null", "model.num_query_token=4", "model.embed_dim=32",
               "model.qformer.hidden_size=64", "model.qformer.num_layers=2", "model.qformer.num_heads=4",
               "model.qformer.intermediate_size=128", "model.qformer.encoder_width=64",
               "model.point_encoder.width=64", "model.point_encoder.depth=1", "model.point_encoder.num_heads=4",
               "model.point_encoder.num_groups=16", "model.point_encoder.pointnet_dims=[32,32,64]",
               "model.point_encoder.encoder_dims=32",
               "datasets.shapes_point_caption.vis_processor.train.num_points=256",
               "datasets.shapes_point_caption.vis_processor.eval.num_points=256"]
STEP_LINE = re.compile(r"Train: data epoch: \[(\d+)\]\s+\[\s*(\d+)/\d+\].*?\bloss: ([-\d.]+)")


def command(out, data, job, *extra):
    return [sys.executable, "train.py", "--cfg-path", "projects/embedded/stage1.yaml", "--options",
            f"run.output_dir={out}", f"run.job_id={job}", "run.max_epoch=2", "run.batch_size_train=8",
            "run.warmup_steps=2", "run.log_freq=1", "model.itg_delay_steps=2",
            f"datasets.shapes_point_caption.build_info.root={data}",
            *[f"datasets.shapes_point_caption.build_info.sizes.{k}={v}" for k, v in SIZES.items()],
            "datasets.shapes_point_caption.build_info.num_points=1024", *SMALL_MODEL, *extra]


def start(cmd, log_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # one thread: the same arithmetic in every run
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)


def step_losses(log_path):
    """{(epoch, step): loss} from the runner's per-step log lines."""
    text = open(log_path).read()
    return {(int(e), int(s)): float(loss) for e, s, loss in STEP_LINE.findall(text)}, text


def adam_steps(checkpoint):
    return {int(s["step"]) for s in checkpoint["optimizer"]["state"].values()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out, data = tmp_path_factory.mktemp("kill_resume"), tmp_path_factory.mktemp("kill_resume_data")
    shapes.ensure_embedded_dataset(str(data), seed=0, num_points=1024, sizes=SIZES, num_refs=5)  # once, not raced
    full = start(command(out, data, "full"), out / "full.log")
    victim = start(command(out, data, "killed"), out / "killed.log")
    checkpoint = out / "killed" / "checkpoint_last.pth"
    deadline = time.time() + 300
    while not checkpoint.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    killed_code = victim.wait()
    saved = torch.load(checkpoint, weights_only=True)
    resumed = start(command(out, data, "resumed", f"run.resume_ckpt_path={checkpoint}"), out / "resumed.log")
    assert full.wait(timeout=600) == 0, step_losses(out / "full.log")[1][-3000:]
    assert resumed.wait(timeout=600) == 0, step_losses(out / "resumed.log")[1][-3000:]
    return {"out": out, "killed_code": killed_code, "saved": saved}


def test_the_run_was_killed_right_after_its_epoch_0_checkpoint(runs):
    assert runs["killed_code"] == -signal.SIGKILL
    assert runs["saved"]["epoch"] == 0 and adam_steps(runs["saved"]) == {STEPS_PER_EPOCH}
    assert len(runs["saved"]["rng"]) == 1  # one process: one random state
    assert not list((runs["out"] / "killed").glob("*.tmp-*"))  # atomic save: no half-written file


def test_resumed_run_trains_only_the_remaining_epoch_and_ends_at_the_same_step(runs):
    out = runs["out"]
    resumed, text = step_losses(out / "resumed.log")
    assert f"Resume checkpoint from {out / 'killed' / 'checkpoint_last.pth'}" in text
    assert sorted(resumed) == [(1, s) for s in range(STEPS_PER_EPOCH)]
    full_end = torch.load(out / "full" / "checkpoint_last.pth", weights_only=True)
    resumed_end = torch.load(out / "resumed" / "checkpoint_last.pth", weights_only=True)
    assert full_end["epoch"] == resumed_end["epoch"] == 1
    assert adam_steps(full_end) == adam_steps(resumed_end) == {2 * STEPS_PER_EPOCH}


def test_loss_after_resume_matches_the_uninterrupted_run(runs):
    full, _ = step_losses(runs["out"] / "full.log")
    resumed, _ = step_losses(runs["out"] / "resumed.log")
    assert len(full) == 2 * STEPS_PER_EPOCH
    assert resumed[(1, 0)] == pytest.approx(full[(1, 0)], abs=1e-6)  # the first step after resuming
    for key, loss in resumed.items():
        assert loss == pytest.approx(full[key], abs=1e-6), key
    # the losses are not all alike, so equality above is evidence of the same batches, not of a constant
    assert len({round(v, 4) for v in full.values()}) > 1


def test_resumed_weights_equal_the_uninterrupted_run(runs):
    full = torch.load(runs["out"] / "full" / "checkpoint_last.pth", weights_only=True)["model"]
    resumed = torch.load(runs["out"] / "resumed" / "checkpoint_last.pth", weights_only=True)["model"]
    assert set(full) == set(resumed)
    for key in full:
        assert torch.allclose(full[key].float(), resumed[key].float(), atol=1e-6), key
    saved = runs["saved"]["model"]
    assert any(not torch.equal(saved[k], full[k]) for k in saved)  # epoch 1 did change the weights


def test_random_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from lavis_point.runners import rng_state

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    torch.save({"rng": [rng_state.capture()]}, tmp_path / "ck.pth")
    expected = draws()
    draws()  # move every stream on
    rng_state.restore(torch.load(tmp_path / "ck.pth", weights_only=True)["rng"][0])
    assert draws() == expected


class Numbers(torch.utils.data.Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, i):
        return i


def test_a_resumed_distributed_loader_continues_with_the_next_epochs_order(tmp_path):
    """LAVIS's IterLoader counts epochs from 0; resuming at epoch 1 must not replay epoch 0's order."""
    import types

    import torch.distributed as dist
    from omegaconf import OmegaConf

    from lavis_point.runners.runner_point import RunnerPoint

    data = Numbers()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        def first_batches(start_epoch, passes):
            runner = types.SimpleNamespace(use_distributed=True, start_epoch=start_epoch, device=torch.device("cpu"),
                                           use_dist_eval_sampler=True,
                                           config=OmegaConf.create({"run_cfg": {"seed": 3}}))
            (loader,) = RunnerPoint.create_loaders(runner, [data], 0, [4], [True], [None])
            return [next(loader).tolist() for _ in range(4 * passes)][-4:]

        epoch1_uninterrupted = first_batches(0, passes=2)
        assert first_batches(1, passes=1) == epoch1_uninterrupted
        assert first_batches(0, passes=1) != epoch1_uninterrupted
    finally:
        dist.destroy_process_group()


def test_the_training_loader_changes_epoch_without_lavis_two_second_pause(monkeypatch):
    """LAVIS's IterLoader sleeps 2 s at every epoch change (12 s of the main job); ours does not, and
    still starts the next epoch with every item once, in a new order."""
    import types

    from lavis.datasets.datasets import dataloader_utils
    from omegaconf import OmegaConf

    from lavis_point.runners.runner_point import RunnerPoint

    pauses = []
    monkeypatch.setattr(dataloader_utils.time, "sleep", pauses.append)
    runner = types.SimpleNamespace(use_distributed=False, start_epoch=0, device=torch.device("cpu"),
                                   use_dist_eval_sampler=True, config=OmegaConf.create({"run_cfg": {"seed": 3}}))
    torch.manual_seed(0)
    (loader,) = RunnerPoint.create_loaders(runner, [Numbers()], 0, [4], [True], [None])
    epochs = [sum((next(loader).tolist() for _ in range(4)), []) for _ in range(2)]
    assert pauses == []
    assert loader.epoch == 1
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(16)) and epochs[0] != epochs[1]
