"""lavis_point/cli_run.py: what train.py and evaluate.py share."""
import os
import subprocess
import sys

import pytest
import torch

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
