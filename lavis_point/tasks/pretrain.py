from lavis.common.registry import registry

from lavis_point.tasks.base import PointBaseTask


@registry.register_task("point_text_pretrain")
class PointTextPretrainTask(PointBaseTask):
    """Stage 1 and stage 2 pretraining: the model's loss, no evaluation metrics."""

    def evaluation(self, model, data_loader, cuda_enabled=None):
        return None
