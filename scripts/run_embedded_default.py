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


def step(name, script, cfg, options):
    """Run one command, echo its progress lines as they come, stop on failure with its log's tail."""
    print(f"== {name}: {script} --cfg-path {cfg}", flush=True)
    started = time.time()
    proc = subprocess.Popen([sys.executable, script, "--cfg-path", cfg, "--options", *options], cwd=ROOT,
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


def read_metrics(out, job):
    with open(os.path.join(out, job, "metrics.json")) as f:
        return json.load(f)["test"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="output/embedded")
    parser.add_argument("--captions-only", action="store_true",
                        help="skip the retrieval, zero-shot and QA evaluations")
    args = parser.parse_args()
    out = os.path.abspath(os.path.join(ROOT, args.output_dir))
    started = time.time()
    common = [f"run.output_dir={out}"]
    step("stage 1", "train.py", "projects/embedded/stage1.yaml", common + ["run.job_id=stage1"])
    stage1 = os.path.join(out, "stage1", "checkpoint_last.pth")
    step("stage 2", "train.py", "projects/embedded/stage2.yaml",
         common + ["run.job_id=stage2", f"model.pretrained={stage1}"])
    stage2 = os.path.join(out, "stage2", "checkpoint_last.pth")
    step("evaluation", "evaluate.py", "projects/embedded/caption_eval.yaml",
         common + ["run.job_id=eval", f"model.finetuned={stage2}"])
    step("evaluation of an untrained model", "evaluate.py", "projects/embedded/caption_eval.yaml",
         common + ["run.job_id=eval_untrained", "model.finetuned=null"])
    understanding = {}
    evaluations = () if args.captions_only else (("retrieval_eval", stage1), ("zeroshot_eval", stage1),
                                                 ("qa_eval", stage2))
    for job, checkpoint in evaluations:
        step(job.replace("_", " "), "evaluate.py", f"projects/embedded/{job}.yaml",
             common + [f"run.job_id={job}", f"model.finetuned={checkpoint}"])
        understanding[job] = read_metrics(out, job)
    summary = {"split": "test (held-out shape x colour pairs)", **read_metrics(out, "eval"),
               "untrained": read_metrics(out, "eval_untrained"), **understanding,
               "minutes": round((time.time() - started) / 60, 1)}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
