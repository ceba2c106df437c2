"""The scripts around a run: scripts/run_embedded_default.py (with its train.py / evaluate.py steps
replaced by a stand-in, so it takes a second) and scripts/setup.sh."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = ("stage1", "stage2", "eval", "eval_untrained", "retrieval_eval", "zeroshot_eval", "qa_eval")


def load_pipeline():
    spec = importlib.util.spec_from_file_location("run_embedded_default",
                                                  os.path.join(ROOT, "scripts", "run_embedded_default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FakeStep:
    """Stands in for subprocess.Popen of train.py / evaluate.py: per job, an exit code, test metrics
    merged into <job>/metrics.json as eval_io.write_metrics does (or none), a checkpoint (or none)."""

    plan = {}

    def __init__(self, cmd, **kwargs):
        options = dict(o.split("=", 1) for o in cmd[cmd.index("--options") + 1:])
        job = options["run.job_id"]
        folder = os.path.join(options["run.output_dir"], job)
        os.makedirs(folder, exist_ok=True)
        self.returncode, metrics, checkpoint = self.plan.get(job, (0, {"score": job}, True))
        if metrics is not None:
            path, everything = os.path.join(folder, "metrics.json"), {}
            if os.path.isfile(path):
                with open(path) as f:
                    everything = json.load(f)
            everything["test"] = metrics
            with open(path, "w") as f:
                json.dump(everything, f)
        if checkpoint:
            with open(os.path.join(folder, "checkpoint_last.pth"), "w") as f:
                f.write(f"{job} {id(self)}")
        self.stdout = iter([f"{job} log line\n"])

    def wait(self):
        return self.returncode


def old_run(out):
    """What an earlier run of the pipeline left in out: every job's metrics, checkpoints, a summary."""
    for job in JOBS:
        os.makedirs(out / job)
        (out / job / "metrics.json").write_text(json.dumps({"test": {"stale": job}}))
        (out / job / "checkpoint_last.pth").write_text("old")
    (out / "summary.json").write_text(json.dumps({"stale": "summary"}))


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    module = load_pipeline()
    monkeypatch.setattr(module.subprocess, "Popen", FakeStep)
    monkeypatch.setattr(sys, "argv", ["run_embedded_default.py", "--output-dir", str(tmp_path / "out")])
    old_run(tmp_path / "out")

    def run(plan, capsys):
        FakeStep.plan = plan
        try:
            module.main()
            code = 0
        except SystemExit as stop:
            code = stop.code
        return code, capsys.readouterr().out

    return run, tmp_path / "out"


def test_pipeline_reports_only_what_this_run_measured(pipeline, capsys):
    run, out = pipeline
    code, printed = run({}, capsys)
    assert code == 0 and "stale" not in printed
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["score"] == "eval" and summary["untrained"] == {"score": "eval_untrained"}
    assert summary["qa_eval"] == {"score": "qa_eval"}
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize("job", ["eval", "eval_untrained", "zeroshot_eval", "qa_eval"])
def test_a_step_that_measures_nothing_stops_the_pipeline_and_no_old_metric_is_shown(pipeline, capsys, job):
    """metrics.json is merged into, so an evaluation that wrote nothing left the previous run's numbers,
    which were then printed as this run's."""
    run, out = pipeline
    code, printed = run({job: (0, None, False)}, capsys)
    assert code not in (0, None) and "stale" not in printed + str(code)
    assert f"{job}/metrics.json" in str(code)
    assert not (out / "summary.json").exists()


@pytest.mark.parametrize("job", ["stage1", "eval", "qa_eval"])
def test_a_failed_step_leaves_no_summary_behind(pipeline, capsys, job):
    run, out = pipeline
    code, printed = run({job: (1, None, False)}, capsys)
    assert code not in (0, None) and "failed (exit 1)" in str(code) and "stale" not in printed
    assert not (out / "summary.json").exists()
    # nothing in the output folder is left from the earlier run to be mistaken for this one's
    left = [job for job in JOBS if (out / job / "metrics.json").exists()]
    assert not [job for job in left if "stale" in (out / job / "metrics.json").read_text()]


def test_a_training_step_that_saves_no_checkpoint_stops_before_the_old_one_is_evaluated(pipeline, capsys):
    run, out = pipeline
    code, printed = run({"stage2": (0, {"score": "stage2"}, False)}, capsys)
    assert code not in (0, None) and "checkpoint_last.pth" in str(code)
    assert not (out / "eval" / "metrics.json").exists() and not (out / "summary.json").exists()


def test_captions_only_leaves_the_understanding_jobs_alone(pipeline, capsys, monkeypatch):
    run, out = pipeline
    monkeypatch.setattr(sys, "argv", sys.argv + ["--captions-only"])
    code, printed = run({}, capsys)
    summary = json.loads(printed.strip().splitlines()[-1])
    assert code == 0 and summary["score"] == "eval" and "qa_eval" not in summary and "stale" not in printed
    assert json.loads((out / "qa_eval" / "metrics.json").read_text()) == {"test": {"stale": "qa_eval"}}


def fake_setup(tmp_path, import_error):
    """setup.sh in a copy of the repository whose .venv/bin/python fakes pip and the import check, with
    java on PATH (so nothing is installed with apt)."""
    (tmp_path / "repo" / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(ROOT, "scripts", "setup.sh"), tmp_path / "repo" / "scripts" / "setup.sh")
    (tmp_path / "repo" / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "bin").mkdir()
    fail = f'echo "{import_error}" >&2; exit 1' if import_error else "exit 0"
    for path, text in ((tmp_path / "repo" / ".venv" / "bin" / "python",
                        f'#!/bin/sh\nif [ "$1" = -c ]; then {fail}; fi\nexit 0\n'),
                       (tmp_path / "bin" / "java", "#!/bin/sh\nexit 0\n")):
        path.write_text(text)
        path.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    return subprocess.run(["bash", str(tmp_path / "repo" / "scripts" / "setup.sh")], env=env,
                          capture_output=True, text=True, timeout=60)


def test_setup_shows_why_the_final_import_fails(tmp_path):
    """The check ran with 2>/dev/null: a broken install exited 1 without a word."""
    proc = fake_setup(tmp_path, "ImportError: cannot import name 'registry' from 'lavis.common'")
    assert proc.returncode != 0 and "installed" not in proc.stdout
    assert "ImportError: cannot import name 'registry'" in proc.stderr and "import lavis_point" in proc.stderr


def test_setup_says_when_it_has_installed(tmp_path):
    proc = fake_setup(tmp_path, None)
    assert proc.returncode == 0 and "lavis-point installed in .venv" in proc.stdout and not proc.stderr


def package_metadata(tmp_path, pyproject_text):
    """The wheel metadata setuptools (the test environment's) makes of pyproject.toml, and its stderr."""
    (tmp_path / "pkg" / "lavis_point").mkdir(parents=True)
    (tmp_path / "pkg" / "pyproject.toml").write_text(pyproject_text)
    shutil.copy(os.path.join(ROOT, "README.md"), tmp_path / "pkg" / "README.md")
    (tmp_path / "pkg" / "lavis_point" / "__init__.py").write_text("")
    code = "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_wheel('.'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path / "pkg", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "pkg" / proc.stdout.strip().splitlines()[-1] / "METADATA") as f:
        return f.read(), proc.stderr


def test_package_metadata_has_an_spdx_license_and_no_deprecation(tmp_path):
    """license = { text = ... } drew "By 2027-Feb-18 ... your builds will no longer be supported".
    pip builds with the setuptools>=77 that pyproject.toml asks for; an older one here cannot read it."""
    pytest.importorskip("setuptools", minversion="77")
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        metadata, stderr = package_metadata(tmp_path, f.read())
    assert "License-Expression: BSD-3-Clause" in metadata.splitlines()
    assert "deprecated" not in stderr.lower(), stderr[-3000:]
