"""Running evaluate.py on the embedded set, shortened, in one process and under torchrun (2 CPU
processes, gloo): what test_retrieval / test_zeroshot / test_qa share."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 15 test clouds: a DistributedSampler over 2 ranks pads one repeat, which must be counted once.
SIZES = {"train": 8, "val": 8, "test": 15}


def data_options(builder):
    info = f"datasets.{builder}.build_info"
    return [f"{info}.sizes.{k}={v}" for k, v in SIZES.items()] + [f"{info}.num_points=2048"]


def evaluate(cfg, out, job, builder, *extra, nproc=1):
    """The test split's metrics of ``evaluate.py`` on ``cfg`` with the embedded set shortened."""
    return run_evaluate(cfg, out, job, *data_options(builder), *extra, nproc=nproc)


def run_evaluate(cfg, out, job, *options, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    args = [sys.executable, *launcher, "evaluate.py", "--cfg-path", cfg, "--options", f"run.output_dir={out}",
            f"run.job_id={job}", "run.batch_size_eval=4", "run.num_workers=0", *options]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    with open(os.path.join(out, job, "metrics.json")) as f:
        return json.load(f)["test"]
