"""Point-cloud captioning: generate, save LAVIS-format results, score offline, write metrics.json."""
import json
import logging
import os

from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry

from lavis_point.tasks.base import PointBaseTask


@registry.register_task("point_captioning")
class PointCaptioningTask(PointBaseTask):
    """Metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap; SPICE with ``spice: true``),
    Sentence-BERT cosine, and attribute accuracy where the dataset has attributes (the embedded set),
    against the annotations' captions as written; ``num_skipped``: clouds that could not be read.
    ``agg_metrics`` (what LAVIS's runner keeps the best checkpoint by) is CIDEr."""

    def __init__(self, num_beams=5, max_len=30, min_len=1, repetition_penalty=1.0, spice=False, report_metric=True):
        super().__init__()
        self.num_beams, self.max_len, self.min_len = num_beams, max_len, min_len
        self.repetition_penalty, self.spice, self.report_metric = repetition_penalty, spice, report_metric
        self.dataset = None
        self.said_why_no_attributes = False

    @classmethod
    def setup_task(cls, cfg):
        run = cfg.run_cfg
        return cls(num_beams=run.get("num_beams", 5), max_len=run.get("max_len", 30), min_len=run.get("min_len", 1),
                   repetition_penalty=run.get("repetition_penalty", 1.0), spice=run.get("spice", False),
                   report_metric=run.get("report_metric", True))

    def before_evaluation(self, model, dataset, **kwargs):
        self.dataset = dataset  # references and attributes come from it after generation

    def valid_step(self, model, samples):
        captions = model.generate(samples, num_beams=self.num_beams, max_length=self.max_len,
                                  min_length=self.min_len, repetition_penalty=self.repetition_penalty)
        return [{"image_id": i, "caption": c} for i, c in zip(samples["instance_id"], captions)]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        result_file = self.save_result(val_result, result_dir=registry.get_path("result_dir"),
                                       filename=f"{split_name}_epoch{epoch}", remove_duplicate="image_id")
        if not (self.report_metric and is_main_process()):
            return {"agg_metrics": 0.0} if is_main_process() else None
        metrics = self.score(result_file, split_name)
        metrics["num_skipped"] = self.skipped_in_evaluation  # clouds that could not be read
        logging.info("%s metrics: %s", split_name, json.dumps(metrics))
        path = os.path.join(registry.get_path("output_dir"), "metrics.json")
        everything = json.load(open(path)) if os.path.isfile(path) else {}
        everything[split_name] = metrics
        with open(path, "w") as f:
            json.dump(everything, f, indent=2)
        return {"agg_metrics": metrics["cider"], **metrics}

    def score(self, result_file, split_name):
        from lavis_point.tasks.caption_metrics import caption_metrics

        with open(result_file) as f:
            predictions = {r["image_id"]: r["caption"] for r in json.load(f)}
        # The annotations' captions as written: the PTB tokenizer normalises them, as in LAVIS's COCO
        # evaluation (``references`` are the text processor's output: "3.5" becomes "3 5", long ones cut).
        references = getattr(self.dataset, "ground_truth", None) or self.dataset.references
        attributes = getattr(self.dataset, "attributes", None)
        vocabularies = getattr(self.dataset, "vocabularies", None)
        if attributes and not vocabularies:
            # Accuracy needs every word of an attribute (a caption naming another one is wrong); a
            # dataset that only has each cloud's own word gets the other metrics, not an error.
            if not self.said_why_no_attributes:
                logging.warning("%s: no attribute accuracy: the annotations carry attributes but the dataset "
                                "has no vocabularies (every value of each attribute)", split_name)
                self.said_why_no_attributes = True
            attributes = None
        return caption_metrics(predictions, {k: references[k] for k in predictions},
                               attributes={k: attributes[k] for k in predictions} if attributes else None,
                               vocabularies=vocabularies, spice=self.spice)
