"""Freed host memory kept for reuse on CPU runs (runners/host_memory.py)."""
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

FAULTS = """
import json, resource, torch
from lavis_point.runners.host_memory import keep_freed_memory

def faults_of_fresh_tensors():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        torch.empty(16 * 2 ** 20).fill_(1.0)  # 64 MB, touched, freed: what a training step does
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults_of_fresh_tensors()
applied = keep_freed_memory()
faults_of_fresh_tensors()  # the first one after the change is still mapped afresh
print(json.dumps({"default": default, "applied": applied, "kept": faults_of_fresh_tensors()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_large_tensors_freed_and_allocated_again_stop_faulting_in_fresh_pages():
    # A child process: the setting is process-wide and would stay with the test session.
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    faults = json.loads(out.stdout.strip().splitlines()[-1])
    assert faults["applied"]
    assert faults["default"] > 8 * 16 * 2 ** 20 * 4 // 4096 // 2  # each allocation mapped afresh, page by page
    assert faults["kept"] < faults["default"] // 20


@pytest.mark.parametrize("device, option, applied", [("cpu", None, True), ("cpu", False, False),
                                                       ("cuda", None, False)])
def test_the_runner_keeps_freed_memory_on_cpu_unless_the_run_turns_it_off(monkeypatch, device, option, applied):
    from lavis.runners.runner_base import RunnerBase

    from lavis_point.runners import runner_point

    calls = []
    monkeypatch.setattr(runner_point, "keep_freed_memory", lambda: calls.append(True))
    monkeypatch.setattr(RunnerBase, "__init__", lambda self, cfg, *rest: self.__dict__.update(config=cfg, _device=None))
    run_cfg = {"device": device} | ({} if option is None else {"keep_freed_memory": option})
    runner_point.RunnerPoint(SimpleNamespace(run_cfg=OmegaConf.create(run_cfg)), None, None, None, "job")
    assert calls == ([True] if applied else [])
