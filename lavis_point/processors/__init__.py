from lavis_point.processors.point_processors import PointEvalProcessor, PointTrainProcessor

__all__ = ["PointTrainProcessor", "PointEvalProcessor"]
