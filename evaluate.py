"""Evaluate with LAVIS's runner: python evaluate.py --cfg-path projects/<eval>.yaml [--options k=v ...]."""
from lavis_point.cli_run import build_runner

if __name__ == "__main__":
    build_runner("lavis-point evaluation", evaluating=True).evaluate(skip_reload=True)
