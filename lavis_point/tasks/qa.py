"""Point question answering (``point_qa``) with the stage-2 model: each question is put in the
prompt template ``run.prompt`` (``{}`` = the question) and the model continues it with an answer.
Short answers: exact match and VQA-style accuracy (``answer_metrics``), per question type where the
dataset has types; ``run.free_form: true`` adds the caption metrics (BLEU, METEOR, ROUGE-L, CIDEr,
Sentence-BERT) with the reference answers as references. Results are LAVIS-format
``[{"question_id", "answer"}]``, merged over ranks with every question once."""
import json
import logging

from lavis.common.dist_utils import is_main_process
from lavis.common.registry import registry

from lavis_point.tasks.answer_metrics import answer_metrics
from lavis_point.tasks.base import PointBaseTask
from lavis_point.tasks.eval_io import write_metrics

DEFAULT_PROMPT = "Question: {} Answer: "


@registry.register_task("point_qa")
class PointQATask(PointBaseTask):
    def __init__(self, prompt=DEFAULT_PROMPT, num_beams=5, max_len=10, min_len=1, free_form=False):
        super().__init__()
        if prompt.count("{}") != 1:
            raise ValueError(f"run.prompt must contain exactly one '{{}}' for the question, got {prompt!r}")
        self.prompt, self.num_beams, self.max_len, self.min_len = prompt, num_beams, max_len, min_len
        self.free_form = free_form
        self.dataset = None

    @classmethod
    def setup_task(cls, cfg):
        run = cfg.run_cfg
        return cls(prompt=run.get("prompt", DEFAULT_PROMPT), num_beams=run.get("num_beams", 5),
                   max_len=run.get("max_len", 10), min_len=run.get("min_len", 1),
                   free_form=run.get("free_form", False))

    def before_evaluation(self, model, dataset, **kwargs):
        self.dataset = dataset  # reference answers and question types come from it

    def valid_step(self, model, samples):
        answers = model.predict_answers(samples, num_beams=self.num_beams, max_len=self.max_len,
                                        min_len=self.min_len, prompt=self.prompt)
        return [{"question_id": q, "answer": a} for q, a in zip(samples["question_id"], answers)]

    def after_evaluation(self, val_result, split_name, epoch, **kwargs):
        result_file = self.save_result(val_result, result_dir=registry.get_path("result_dir"),
                                       filename=f"{split_name}_epoch{epoch}", remove_duplicate="question_id")
        if not is_main_process():
            return None
        with open(result_file) as f:
            predictions = {r["question_id"]: r["answer"] for r in json.load(f)}
        answers = self.dataset.answers  # a property that builds the whole dict: read it once
        references = {q: answers[q] for q in predictions}
        types = self.dataset.question_types
        metrics = answer_metrics(predictions, references, {q: types[q] for q in predictions} if types else None)
        if self.free_form:
            from lavis_point.tasks.caption_metrics import caption_metrics

            metrics.update(caption_metrics(predictions, references))
        metrics["num_skipped"] = self.skipped_in_evaluation  # questions whose cloud was unreadable
        metrics["agg_metrics"] = metrics["vqa_accuracy"]
        logging.info("%s QA: %s", split_name, json.dumps(metrics))
        write_metrics(split_name, metrics)
        return metrics
