from lavis_point.datasets import builders  # noqa: F401  (registers the builders)
from lavis_point.datasets import cap3d  # noqa: F401,E402  (registers cap3d_point_caption)
from lavis_point.datasets import understanding_builders  # noqa: F401,E402  (classification and QA sets)
