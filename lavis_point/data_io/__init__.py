"""Reading point clouds from files, safely: ``read_cloud`` (any format we accept, one error class),
the restricted unpickler, mesh sampling, and the shard format training reads."""
from lavis_point.data_io.clouds import CLOUD_EXTS, CloudReadError, PointCloudError, as_cloud, read_cloud

__all__ = ["CLOUD_EXTS", "CloudReadError", "PointCloudError", "as_cloud", "read_cloud"]
