from lavis_point.tasks.captioning import PointCaptioningTask
from lavis_point.tasks.pretrain import PointTextPretrainTask

__all__ = ["PointTextPretrainTask", "PointCaptioningTask"]
