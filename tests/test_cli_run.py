"""lavis_point/cli_run.py: what train.py and evaluate.py share."""
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the fallback of a machine without a GPU")
def test_falling_back_from_cuda_to_cpu_keeps_the_info_log():
    """The fallback's warning was logged before LAVIS's setup_logger, which then could not set the
    root logger to INFO: configs, training lines and metrics vanished on CPU-only machines."""
    code = ("import logging; from omegaconf import OmegaConf; from lavis.common.logger import setup_logger; "
            "from lavis_point.cli_run import init_distributed; "
            "cfg = OmegaConf.create({'device': 'cuda'}); init_distributed(cfg); setup_logger(); "
            "print(cfg.device, logging.getLogger().getEffectiveLevel())")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["cpu", str(20)]  # logging.INFO
    assert "no GPU is visible: running on CPU" in proc.stderr


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_under_torchrun_any_cuda_device_takes_nccl_and_the_local_rank_gpu(monkeypatch, device):
    """run.device cuda:0 compared unequal to "cuda": gloo, no set_device, every rank's model on GPU 0
    while DDP put its inputs on the local rank's."""
    from lavis_point import cli_run

    calls = {}
    monkeypatch.setattr(cli_run.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli_run.torch.cuda, "set_device", lambda rank: calls.update(set_device=rank))
    monkeypatch.setattr(cli_run.dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend))
    monkeypatch.setattr(cli_run.dist, "barrier", lambda: None)
    monkeypatch.setattr(cli_run, "setup_for_distributed", lambda is_master: None)
    monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("LOCAL_RANK", "1")
    cfg = OmegaConf.create({"device": device})
    cli_run.init_distributed(cfg)
    assert calls == {"set_device": 1, "backend": "nccl"} and cfg.device == "cuda" and cfg.gpu == 1


def test_without_a_gpu_any_cuda_device_falls_back_to_the_cpu(monkeypatch):
    from lavis_point import cli_run

    monkeypatch.setattr(cli_run.torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("RANK", raising=False)
    cfg = OmegaConf.create({"device": "cuda:1"})
    cli_run.init_distributed(cfg)
    assert cfg.device == "cpu"
