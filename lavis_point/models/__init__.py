from lavis_point.models.point_bert import PointBertEncoder
from lavis_point.models.point_opt import PointOPT
from lavis_point.models.point_qformer import PointQFormer

__all__ = ["PointBertEncoder", "PointQFormer", "PointOPT"]
