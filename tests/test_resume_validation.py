"""Resume with a validation split, through the real ``RunnerPoint.train()`` with a one-weight model
and a task that records what it saw (each run takes seconds): the best checkpoint survives the
resume (a worse later epoch does not replace it), and the resumed run continues exactly as the
uninterrupted one. (test_kill_resume.py checks a real stage-1 run, which has no validation split.)"""
import os
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import lavis.common.optims  # noqa: F401  registers the lr schedulers
import lavis_point  # noqa: F401  registers runner_point
from lavis_point.runners.runner_point import RunnerPoint

VAL_METRIC = {0: 0.9, 1: 0.5, 2: 0.4}  # validation agg_metrics by epoch: epoch 0 is the best


class OneWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    @property
    def device(self):
        return self.lin.weight.device


class Recording:
    """A task that trains on the numbers it is given and records, per epoch, the batches and the
    losses; validation draws from torch's generator, as the matching head's negatives would."""

    def __init__(self):
        self.batches, self.losses, self.tested = {}, {}, []

    def train_epoch(self, epoch, model, data_loader, optimizer, lr_scheduler, **kwargs):
        self.batches[epoch], self.losses[epoch] = [], []
        for step in range(len(data_loader)):
            lr_scheduler.step(cur_epoch=epoch, cur_step=step)
            x = next(data_loader)["x"].float().view(-1, 1)
            loss = (model.lin(x) - torch.randn_like(x)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            self.batches[epoch].append(x.view(-1).tolist())
            self.losses[epoch].append(loss.item())
        return {}

    def before_evaluation(self, model, dataset, **kwargs):
        pass

    def evaluation(self, model, data_loader, cuda_enabled=None):
        torch.rand(3)
        self.tested.append(model.lin.weight.item())
        return [batch for batch in data_loader]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        return {"agg_metrics": VAL_METRIC.get(epoch, -1.0)}


class Numbers(torch.utils.data.Dataset):
    def __init__(self, start, n):
        self.start, self.n = start, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": self.start + i}

    def collater(self, samples):
        return torch.utils.data.default_collate(samples)


class Config:
    def __init__(self, **run):
        self.run_cfg = OmegaConf.create(dict(dict(
            device="cpu", distributed=False, max_epoch=3, init_lr=1e-2, min_lr=1e-3, warmup_lr=1e-3,
            warmup_steps=2, weight_decay=0.0, lr_sched="linear_warmup_cosine_lr", batch_size_train=4,
            batch_size_eval=4, num_workers=0, seed=1, evaluate=False, train_splits=["train"],
            valid_splits=["val"], test_splits=["test"], resume_ckpt_path=None, amp=False), **run))

    def to_dict(self):
        return {"run": OmegaConf.to_container(self.run_cfg)}


def train(out, job, **run):
    """One run as train.py makes it (seeded as cli_run does); keeps each epoch's checkpoint_last as
    ``last_<epoch>.pth``, the file a kill after that epoch would leave."""
    import random
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    task = Recording()
    datasets = {"numbers": {"train": Numbers(0, 16), "val": Numbers(100, 8), "test": Numbers(200, 4)}}
    runner = RunnerPoint(cfg=Config(output_dir=str(out), **run), task=task, model=OneWeight(),
                         datasets=datasets, job_id=job)
    save = runner._save_checkpoint

    def save_and_keep(cur_epoch, is_best=False, name=None, **kwargs):
        save(cur_epoch, is_best, name, **kwargs)
        if name == "last":
            shutil.copy(os.path.join(runner.output_dir, "checkpoint_last.pth"),
                        os.path.join(runner.output_dir, f"last_{cur_epoch}.pth"))

    runner._save_checkpoint = save_and_keep
    runner.train()
    return task, runner.output_dir


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted run, and one resumed from its checkpoint_last of epoch 0 (the best epoch)."""
    out = tmp_path_factory.mktemp("resume_validation")
    first, first_dir = train(out, "first")
    resumed, resumed_dir = train(out, "resumed", resume_ckpt_path=os.path.join(first_dir, "last_0.pth"))
    return first, first_dir, resumed, resumed_dir


def test_a_resumed_run_with_a_validation_split_continues_exactly(runs):
    """Validation draws from torch's generator (its loader's seed, the task's negatives), so the
    random state a resume restores must be the one after validation."""
    first, _, resumed, _ = runs
    assert sorted(resumed.batches) == [1, 2]
    for epoch in (1, 2):
        assert resumed.batches[epoch] == first.batches[epoch], epoch
        assert resumed.losses[epoch] == first.losses[epoch], epoch
    assert first.batches[1] != first.batches[2]  # the order changes by epoch: equality above means something


def test_a_worse_epoch_after_a_resume_does_not_replace_the_best_checkpoint(runs):
    first, first_dir, resumed, resumed_dir = runs
    assert load(os.path.join(first_dir, "checkpoint_best.pth"))["epoch"] == 0
    assert sorted(resumed.batches) == [1, 2]  # it did resume after epoch 0
    best = load(os.path.join(resumed_dir, "checkpoint_best.pth"))
    assert best["epoch"] == 0
    assert best["model"]["lin.weight"].item() != resumed.tested[0]  # epoch 1's model differs from it
    # the final test reloads the best model: epoch 0's weights, as in the uninterrupted run
    assert resumed.tested[-1] == first.tested[-1] == best["model"]["lin.weight"].item()


def test_checkpoint_last_carries_the_best_score_so_far(runs):
    _, first_dir, _, _ = runs
    assert [load(os.path.join(first_dir, f"last_{e}.pth"))["best_agg_metric"] for e in range(3)] == [0.9] * 3
    assert load(os.path.join(first_dir, "last_2.pth"))["best_epoch"] == 0


@pytest.mark.parametrize("lacks", ["the best score (an older checkpoint)", "the best checkpoint file",
                                   "the best checkpoint file, resuming in the run's own folder"])
def test_without_the_best_score_or_its_file_a_resume_starts_the_best_afresh_and_says_so(runs, tmp_path, caplog,
                                                                                       lacks):
    _, first_dir, _, _ = runs
    checkpoint = load(os.path.join(first_dir, "last_0.pth"))
    if lacks.startswith("the best score"):
        del checkpoint["best_agg_metric"], checkpoint["best_epoch"]
    folder = tmp_path / "resumed" if lacks.endswith("own folder") else tmp_path  # the run's folder: out/job
    folder.mkdir(exist_ok=True)
    torch.save(checkpoint, folder / "checkpoint_last.pth")  # alone in its folder: no checkpoint_best.pth
    with caplog.at_level("WARNING"):
        _, resumed_dir = train(tmp_path, "resumed", resume_ckpt_path=str(folder / "checkpoint_last.pth"))
    assert os.path.samefile(resumed_dir, tmp_path / "resumed")
    assert "the first validated epoch after the resume becomes checkpoint_best.pth" in caplog.text
    assert load(os.path.join(resumed_dir, "checkpoint_best.pth"))["epoch"] == 1
