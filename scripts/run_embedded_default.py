"""The embedded default end to end, on a CPU: stage 1 -> stage 2 -> caption evaluation on the
held-out test split, plus the same evaluation of an untrained model for comparison, then retrieval
and zero-shot shape classification (stage 1) and QA (stage 2) on the same split. Each step is the
command a user would type (train.py / evaluate.py with the YAMLs in projects/embedded/).
The last line printed is a JSON object: held-out caption metrics, the untrained model's beside them,
the understanding tasks' metrics, and the minutes taken.

    .venv/bin/python scripts/run_embedded_default.py [--output-dir output/embedded]
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def forget(path):
    """Remove what an earlier run left at path, so it can never be reported as this run's."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def signature(path):
    """Which file is at path (a checkpoint is saved by os.replace: a new inode), or None."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def step(name, script, cfg, out, job, options):
    """Run one command, echo its progress lines as they come, stop on failure with its log's tail.
    (main() removed its metrics.json first: evaluation merges into that file, so a step that measured
    nothing would otherwise leave the previous run's numbers there.)"""
    print(f"== {name}: {script} --cfg-path {cfg}", flush=True)
    started = time.time()
    proc = subprocess.Popen([sys.executable, script, "--cfg-path", cfg, "--options", f"run.output_dir={out}",
                             f"run.job_id={job}", *options], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = []
    for line in proc.stdout:
        tail = (tail + [line])[-80:]
        if line.startswith(("Train: data epoch", "Evaluation Total")) or "Point token cache" in line:
            print("   ", line.rstrip()[:160], flush=True)
    if proc.wait() != 0:
        print("".join(tail))
        sys.exit(f"{name} failed (exit {proc.returncode})")
    print(f"   {name} done in {time.time() - started:.0f} s", flush=True)


def train(name, cfg, out, job, options):
    """A training step; returns the checkpoint it saved (one left by an earlier run does not count)."""
    checkpoint = os.path.join(out, job, "checkpoint_last.pth")
    before = signature(checkpoint)
    step(name, "train.py", cfg, out, job, options)
    if signature(checkpoint) in (None, before):
        sys.exit(f"{name}: {checkpoint}: this run saved no checkpoint")
    return checkpoint


def read_metrics(out, job):
    path = os.path.join(out, job, "metrics.json")
    if not os.path.isfile(path):
        sys.exit(f"{job}: {path}: missing; the step ended without writing metrics")
    with open(path) as f:
        metrics = json.load(f)
    if "test" not in metrics:
        sys.exit(f"{job}: {path}: no 'test' metrics (it has {sorted(metrics)})")
    return metrics["test"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/embedded")
    parser.add_argument("--captions-only", action="store_true",
                        help="skip the retrieval, zero-shot and QA evaluations")
    args = parser.parse_args()
    out = os.path.abspath(os.path.join(ROOT, args.output_dir))
    evaluations = () if args.captions_only else (("retrieval_eval", "stage1"), ("zeroshot_eval", "stage1"),
                                                 ("qa_eval", "stage2"))
    # A run that stops part-way must not leave the last run's numbers beside its own.
    forget(os.path.join(out, "summary.json"))
    for job in ("stage1", "stage2", "eval", "eval_untrained", *dict(evaluations)):
        forget(os.path.join(out, job, "metrics.json"))
    started = time.time()
    stage1 = train("stage 1", "projects/embedded/stage1.yaml", out, "stage1", [])
    stage2 = train("stage 2", "projects/embedded/stage2.yaml", out, "stage2", [f"model.pretrained={stage1}"])
    step("evaluation", "evaluate.py", "projects/embedded/caption_eval.yaml", out, "eval",
         [f"model.finetuned={stage2}"])
    step("evaluation of an untrained model", "evaluate.py", "projects/embedded/caption_eval.yaml", out,
         "eval_untrained", ["model.finetuned=null"])
    understanding, checkpoints = {}, {"stage1": stage1, "stage2": stage2}
    for job, trained_by in evaluations:
        step(job.replace("_", " "), "evaluate.py", f"projects/embedded/{job}.yaml", out, job,
             [f"model.finetuned={checkpoints[trained_by]}"])
        understanding[job] = read_metrics(out, job)
    summary = {"split": "test (held-out shape x colour pairs)", **read_metrics(out, "eval"),
               "untrained": read_metrics(out, "eval_untrained"), **understanding,
               "minutes": round((time.time() - started) / 60, 1)}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
