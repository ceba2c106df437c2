from lavis_point.datasets import builders  # noqa: F401  (registers the builders)
