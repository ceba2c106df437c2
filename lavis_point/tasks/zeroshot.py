"""Zero-shot point classification (``point_zeroshot_classification``) with the stage-1 model:
class names x prompt templates -> one text embedding per class (the normalised mean of the
templates' embeddings, as in CLIP / ULIP); each cloud takes the class of highest point-text
similarity. Metrics: top-1, top-5 and mean per-class accuracy over every sample once (per-rank
results are merged by LAVIS's ``save_result``, dropping the sampler's padding repeats)."""
import json
import logging

import torch
import torch.nn.functional as F
from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry

from lavis_point.tasks.base import PointBaseTask
from lavis_point.tasks.eval_io import write_metrics
from lavis_point.tasks.ranking_metrics import mean_per_class_accuracy, topk_accuracy

DEFAULT_TEMPLATES = ("a {}", "a 3d model of a {}", "a point cloud of a {}", "a 3d object shaped like a {}")


def class_text_features(model, classnames, templates):
    """(C, D): for each class, the normalised mean of its templates' normalised text features."""
    names = [c.replace("_", " ") for c in classnames]
    texts = [t.format(c) for c in names for t in templates]
    feats = model.encode_text(texts).view(len(names), len(templates), -1)
    return F.normalize(feats.mean(dim=1), dim=-1)


@registry.register_task("point_zeroshot_classification")
class PointZeroShotClassificationTask(PointBaseTask):
    def __init__(self, templates=DEFAULT_TEMPLATES, top_k=5):
        super().__init__()
        bad = [t for t in templates if t.count("{}") != 1]
        if bad:
            raise ValueError(f"run.prompt_templates: each template needs exactly one '{{}}' for the class name: {bad}")
        self.templates, self.top_k = list(templates), top_k
        self.classnames, self.class_feats, self.num_skipped = None, None, 0

    @classmethod
    def setup_task(cls, cfg):
        run = cfg.run_cfg
        return cls(templates=list(run.get("prompt_templates", DEFAULT_TEMPLATES)), top_k=run.get("top_k", 5))

    def before_evaluation(self, model, dataset, **kwargs):
        self.classnames = list(dataset.classnames)
        self.num_skipped = getattr(dataset, "num_skipped", 0)  # objects the builder had no cloud for
        with torch.no_grad():
            self.class_feats = class_text_features(model, self.classnames, self.templates)

    def valid_step(self, model, samples):
        _, _, point_feats = model.encode_points(samples["point"])
        logits = model.point_text_similarity(point_feats, self.class_feats.to(point_feats.device))  # (B, C)
        top = logits.topk(min(self.top_k, logits.shape[1]), dim=1).indices
        bad = ~torch.isfinite(logits).all(dim=1)  # topk would still pick a class, maybe the right one
        if bad.any():
            logging.warning("zero-shot: %d of %d clouds have a similarity that is not finite (a diverged model?); "
                            "they count as wrong", int(bad.sum()), len(bad))
            top[bad] = -1
        top = top.tolist()
        return [{"instance_id": i, "label": int(y), "top_k": t}
                for i, y, t in zip(samples["instance_id"], samples["label"].tolist(), top)]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        result_file = self.save_result(val_result, result_dir=registry.get_path("result_dir"),
                                       filename=f"{split_name}_epoch{epoch}", remove_duplicate="instance_id")
        if not is_main_process():
            return None
        with open(result_file) as f:
            results = json.load(f)
        if not results:  # metrics of nothing would be NaN, which metrics.json cannot hold
            raise RuntimeError(f"{split_name}: no cloud of the split could be read ({self.skipped_in_evaluation} "
                               f"unreadable, {self.num_skipped} without a cloud file; see the warnings)")
        labels = [r["label"] for r in results]
        metrics = {
            "top1_accuracy": topk_accuracy([r["top_k"] for r in results], labels, 1),
            f"top{self.top_k}_accuracy": topk_accuracy([r["top_k"] for r in results], labels, self.top_k),
            "mean_per_class_accuracy": mean_per_class_accuracy([r["top_k"][0] for r in results], labels),
            "chance_top1_accuracy": 1.0 / len(self.classnames),
            "num_classes": len(self.classnames),
            "num_samples": len(results),
            "num_skipped": self.num_skipped + self.skipped_in_evaluation,  # no cloud file, or unreadable
        }
        metrics["agg_metrics"] = metrics["top1_accuracy"]
        logging.info("%s zero-shot classification: %s", split_name, json.dumps(metrics))
        write_metrics(split_name, metrics)
        return metrics
