"""What train.py / evaluate.py do when a run is set up in a way that used to fail late or silently:
no best checkpoint to test, a resume file that is not a runner checkpoint, a misspelt runner, ranks
that name the run folder apart, nothing to evaluate. The runner runs in-process on a one-weight
model (tests/test_resume_validation.py), so each case takes seconds."""
import datetime
import os
import random
import runpy
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from lavis_point import cli_run
from lavis_point.models.checkpoint import CheckpointError
from lavis_point.runners.runner_point import RunnerPoint
from tests.test_end_to_end import ROOT, SMALL_DATA
from tests.test_resume_validation import Config, Numbers, OneWeight, Recording
from tests.two_ranks import run_two_ranks


class Scored(Recording):
    """Validation always gives ``metric`` (0.0: a metric that never rose, or run.report_metric false)."""

    def __init__(self, metric):
        super().__init__()
        self.metric = metric

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        return {"agg_metrics": self.metric}


def runner(out, job, task=None, model=None, **run):
    """A runner as train.py builds it (seeded as cli_run does), one epoch unless told."""
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    datasets = {"numbers": {"train": Numbers(0, 16), "val": Numbers(100, 8), "test": Numbers(200, 4)}}
    return RunnerPoint(cfg=Config(output_dir=str(out), **{"max_epoch": 1, **run}), task=task or Recording(),
                       model=model or OneWeight(), datasets=datasets, job_id=job)


def train(out, job, task, **run):
    r = runner(out, job, task, **run)
    r.train()
    return r


def weight(path):
    return torch.load(path, weights_only=True)["model"]["lin.weight"].item()


# --- the final test of a run that chose no best checkpoint -------------------------------------


def test_a_validation_metric_of_zero_tests_the_last_model_and_says_so(tmp_path, caplog):
    task = Scored(0.0)
    with caplog.at_level("WARNING"):
        r = train(tmp_path, "zero", task)
    assert not os.path.exists(os.path.join(r.output_dir, "checkpoint_best.pth"))
    assert task.tested[-1] == weight(os.path.join(r.output_dir, "checkpoint_last.pth"))
    assert "no checkpoint_best.pth" in caplog.text and "testing the model of the last epoch" in caplog.text


def test_a_validation_split_not_named_val_warns_at_start_and_tests_the_last_model(tmp_path, caplog):
    task = Scored(0.9)
    with caplog.at_level("WARNING"):
        r = train(tmp_path, "test_as_val", task, valid_splits=["test"])
    assert "run.valid_splits ['test'] has no split named 'val'" in caplog.text
    assert caplog.text.index("has no split named 'val'") < caplog.text.index("testing the model of the last epoch")
    assert task.tested[-1] == weight(os.path.join(r.output_dir, "checkpoint_last.pth"))


def test_a_best_checkpoint_left_in_the_folder_by_an_earlier_run_is_not_tested(tmp_path):
    earlier = train(tmp_path, "job", Scored(0.9))
    stale = weight(os.path.join(earlier.output_dir, "checkpoint_best.pth"))
    task = Scored(0.0)
    r = train(tmp_path, "job", task, max_epoch=2)
    last = weight(os.path.join(r.output_dir, "checkpoint_last.pth"))
    assert last != stale  # else the assertion below could not tell them apart
    assert task.tested[-1] == last


# --- resuming from a file that cannot continue this run ------------------------------------------


def test_resuming_from_a_weights_only_file_names_it_and_points_to_model_pretrained(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"model": OneWeight().state_dict()}, path)
    r = runner(tmp_path, "resumed", resume_ckpt_path=str(path))
    with pytest.raises(CheckpointError) as error:
        r.train()
    message = str(error.value)
    assert str(path) in message and "not a runner checkpoint" in message
    assert "model.pretrained" in message and "run.resume_ckpt_path" in message


def test_resuming_with_other_trainable_parameters_names_the_file(tmp_path):
    first = train(tmp_path, "first", Recording())
    path = os.path.join(first.output_dir, "checkpoint_last.pth")
    model = OneWeight()
    model.lin.bias.requires_grad_(False)  # as flipping model.freeze_encoder changes what is trained
    r = runner(tmp_path, "resumed", model=model, resume_ckpt_path=path)
    with pytest.raises(CheckpointError) as error:
        r.train()
    message = str(error.value)
    assert path in message and "trainable parameters" in message and "model.pretrained" in message


class TwoWeights(OneWeight):
    def __init__(self):
        super().__init__()
        self.extra = torch.nn.Linear(2, 1)  # its weight: (1, 2), in the same optimizer group as lin's (1, 1)


def test_resuming_with_as_many_but_other_trainable_parameters_names_the_file(tmp_path):
    """One weight frozen and another thawed: the counts match, so torch loads the optimizer state into
    the wrong parameter without complaint, and the first step would fail on the shapes."""
    model = TwoWeights()
    model.extra.weight.requires_grad_(False)
    first = train(tmp_path, "first", Recording(), model=model)
    path = os.path.join(first.output_dir, "checkpoint_last.pth")
    model = TwoWeights()
    model.lin.weight.requires_grad_(False)
    r = runner(tmp_path, "resumed", model=model, resume_ckpt_path=path)
    with pytest.raises(CheckpointError, match=r"trainable parameters changed .*\(1, 1\) for \(1, 2\)"):
        r.train()


# --- cli_run ---------------------------------------------------------------------------------------


def test_a_misspelt_runner_is_refused_with_the_registered_names():
    assert cli_run.runner_class_of("runner_point") is RunnerPoint
    with pytest.raises(ValueError) as error:
        cli_run.runner_class_of("runner_piont")
    assert "runner_piont" in str(error.value) and "runner_point" in str(error.value)


def _job_id_on_rank(rank):
    # rank 1 reads the clock a second later, in the next minute
    clock = datetime.datetime(2024, 1, 1, 12, 59, 59) + datetime.timedelta(seconds=rank)
    return cli_run.job_id_of(OmegaConf.create({"job_id": None}), now=lambda: clock)


def test_ranks_take_rank_0s_default_job_id(tmp_path):
    assert run_two_ranks(_job_id_on_rank, tmp_path) == ["202401011259", "202401011259"]


def test_a_set_job_id_is_kept():
    assert cli_run.job_id_of(OmegaConf.create({"job_id": "stage2"})) == "stage2"


# --- splits to evaluate ----------------------------------------------------------------------------


def script(monkeypatch, name, cfg, out, *options):
    """train.py / evaluate.py in this process (everything is imported already)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [name, "--cfg-path", cfg, "--options", f"run.output_dir={out}",
                                      "run.job_id=job", *SMALL_DATA, *options])
    runpy.run_path(os.path.join(ROOT, name), run_name="__main__")


def test_evaluate_refuses_an_empty_test_splits(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match=r"run.test_splits is empty: evaluate.py has nothing to evaluate"):
        script(monkeypatch, "evaluate.py", "projects/embedded/caption_eval.yaml", tmp_path, "run.test_splits=[]")


def test_evaluate_refuses_a_test_split_no_dataset_builds(monkeypatch, tmp_path):
    with pytest.raises(ValueError) as error:
        script(monkeypatch, "evaluate.py", "projects/embedded/caption_eval.yaml", tmp_path, "run.test_splits=[tset]")
    message = str(error.value)
    assert "run.test_splits" in message and "['tset']" in message and "'test'" in message


def test_train_refuses_a_validation_split_no_dataset_builds_before_training(monkeypatch, tmp_path):
    """LAVIS asserted on it only after the first epoch's training."""
    with pytest.raises(ValueError) as error:
        script(monkeypatch, "train.py", "projects/embedded/stage1.yaml", tmp_path, "run.valid_splits=[vall]")
    assert "run.valid_splits" in str(error.value) and "['vall']" in str(error.value)


# --- a frozen encoder that no file gave weights -------------------------------------------------


def test_training_refuses_a_frozen_encoder_that_no_file_gave_weights(tmp_path):
    """The GPT4Point-size YAMLs read the encoder file from $LAVIS_POINT_ENCODER: run without it, stage 1
    trained for hours on a random encoder that nothing could change, and only evaluation refused it."""
    from tests.small_models import small_stage1

    model = small_stage1(freeze_encoder=True)
    with pytest.raises(CheckpointError, match=r"point_encoder is frozen .*\$LAVIS_POINT_ENCODER"):
        runner(tmp_path, "frozen", model=model).train()
    assert not os.path.exists(tmp_path / "frozen" / "checkpoint_last.pth")
    torch.save(model.point_encoder.state_dict(), tmp_path / "encoder.pth")
    model.point_encoder.load_checkpoint(str(tmp_path / "encoder.pth"))
    assert model.frozen_without_weights() == []
    assert small_stage1().frozen_without_weights() == []  # a trainable encoder may start random


# --- warmup longer than an epoch ----------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear_warmup_cosine_lr", "linear_warmup_step_lr"])
def test_warmup_longer_than_the_first_epoch_is_refused_with_the_epochs_steps(tmp_path, schedule):
    """LAVIS's schedulers warm up during epoch 0 only: 5000 warmup steps on 8 GPUs (about 2500 Cap3D
    steps an epoch) stopped at half the rate and jumped to it at epoch 1."""
    with pytest.raises(ValueError, match=r"run.warmup_steps \(5\) .* 4 steps of an epoch"):
        runner(tmp_path, "long", warmup_steps=5, lr_sched=schedule).train()
    assert not os.path.exists(tmp_path / "long" / "checkpoint_last.pth")
    r = train(tmp_path, "fits", Recording(), warmup_steps=4, lr_sched=schedule)  # the whole first epoch
    assert os.path.exists(os.path.join(r.output_dir, "checkpoint_last.pth"))
