from lavis_point.runners.runner_point import RunnerPoint

__all__ = ["RunnerPoint"]
