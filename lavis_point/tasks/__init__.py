from lavis_point.tasks.captioning import PointCaptioningTask
from lavis_point.tasks.pretrain import PointTextPretrainTask

__all__ = ["PointTextPretrainTask", "PointCaptioningTask"]
from lavis_point.tasks.qa import PointQATask  # noqa: E402
from lavis_point.tasks.retrieval import PointRetrievalTask  # noqa: E402
from lavis_point.tasks.zeroshot import PointZeroShotClassificationTask  # noqa: E402

__all__ += ["PointRetrievalTask", "PointZeroShotClassificationTask", "PointQATask"]
