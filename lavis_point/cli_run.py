"""What ``train.py`` and ``evaluate.py`` share: LAVIS's flags, distributed set-up that works without
torchrun and on CPU, and the run folder.

LAVIS's ``init_distributed_mode`` calls ``torch.cuda.set_device`` and hard-codes nccl; ours picks
gloo on CPU and nccl on GPU and leaves a plain single process alone. A relative ``run.output_dir``
is taken relative to the working directory (LAVIS would join it with its site-packages folder), and
``run.job_id`` names the run folder (default: a timestamp, as in LAVIS), so a stage-2 YAML can name
the stage-1 checkpoint it starts from. A misspelt ``run.runner``, a validation or test split that no
dataset builds, and (evaluate.py) an empty ``run.test_splits`` are refused before the model is built:
LAVIS failed on them late (after training) or not at all.
"""
import argparse
import datetime
import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist

import lavis_point  # noqa: F401  (registers our models, datasets, tasks, runner)
from lavis.common.config import Config
from lavis.common.dist_utils import get_rank, setup_for_distributed
from lavis.common.logger import setup_logger
from lavis.common.registry import registry

from lavis_point.runners.runner_point import from_main_process


def parse_args(description):
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg-path", required=True, help="path to configuration file.")
    parser.add_argument("--options", nargs="+", help="override settings in the config: key=value ...")
    return parser.parse_args()


def init_distributed(run_cfg):
    """Under torchrun: one process group, gloo on CPU, nccl on GPU (each rank on its LOCAL_RANK's GPU,
    whatever index run.device names). Otherwise a plain process."""
    on_gpu = torch.device(run_cfg.device).type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        # A named logger: logging.warning() would configure the root logger at WARNING before
        # setup_logger() runs, and every later INFO line (config, training, metrics) would vanish.
        logging.getLogger(__name__).warning("run.device is cuda but no GPU is visible: running on CPU")
        run_cfg.device, on_gpu = "cpu", False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        run_cfg.distributed = False
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        torch.cuda.set_device(local_rank)
        run_cfg.device = "cuda"  # the current device: this rank's, not the index a YAML may name
    run_cfg.distributed, run_cfg.gpu = True, local_rank
    run_cfg.rank, run_cfg.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(backend="nccl" if on_gpu else "gloo", init_method="env://",
                            timeout=datetime.timedelta(minutes=60))
    dist.barrier()
    setup_for_distributed(get_rank() == 0)


def setup_seeds(run_cfg):
    seed = int(run_cfg.get("seed", 42)) + get_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def job_id_of(run_cfg, now=datetime.datetime.now):
    """run.job_id, or rank 0's timestamp on every rank: ranks reading their own clocks on either side
    of a minute wrote to two run folders."""
    if run_cfg.get("job_id"):
        return str(run_cfg.job_id)
    return from_main_process(now().strftime("%Y%m%d%H%M"))


def runner_class_of(name):
    """The runner registered as ``name`` (run.runner). LAVIS's fallback to RunnerBase for an unknown
    name is refused: it hid a typo, and RunnerBase needs CUDA and lacks runner_point's checkpoints."""
    runner_cls = registry.get_runner_class(name)
    if runner_cls is None:
        known = sorted(registry.mapping["runner_name_mapping"])
        raise ValueError(f"run.runner: no runner registered as {name!r}; registered: {known}")
    return runner_cls


def check_splits_built(run_cfg, datasets, keys):
    """Every split named under ``keys`` (run.valid_splits, run.test_splits) is built: LAVIS asserts
    on one that is not only when it reaches it, after an epoch of training or at its very end."""
    built = sorted({split for splits in datasets.values() for split in splits})
    for key in keys:
        missing = [split for split in run_cfg.get(key) or [] if split not in built]
        if missing:
            raise ValueError(f"run.{key}: no dataset builds the split(s) {missing} (built: {built})")


def build_runner(description, evaluating=False):
    """``evaluating``: for evaluate.py, which tests run.test_splits and nothing else."""
    args = parse_args(description)
    cfg = Config(args)
    run_cfg = cfg.run_cfg
    if evaluating and not run_cfg.get("test_splits"):
        # LAVIS's evaluate does nothing then: the script ended without error, and an older
        # metrics.json in the run folder looked current
        raise ValueError(f"run.test_splits is empty: evaluate.py has nothing to evaluate in {args.cfg_path} "
                         "(name the splits to test, e.g. run.test_splits=[test])")
    runner_cls = runner_class_of(run_cfg.get("runner", "runner_point"))
    init_distributed(run_cfg)
    setup_seeds(run_cfg)
    setup_logger()
    run_cfg.output_dir = os.path.abspath(run_cfg.get("output_dir", "output"))
    job_id = job_id_of(run_cfg)
    cfg.pretty_print()
    task = registry.get_task_class(run_cfg.task).setup_task(cfg=cfg)
    datasets = task.build_datasets(cfg)
    check_splits_built(run_cfg, datasets, ["test_splits"] if evaluating else ["valid_splits", "test_splits"])
    model = task.build_model(cfg)
    return runner_cls(cfg=cfg, job_id=job_id, task=task, model=model, datasets=datasets)
