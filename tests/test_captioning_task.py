"""The captioning task's scoring: attribute accuracy only where the dataset can judge it, references
as the annotations wrote them, and the count of clouds that could not be read."""
import json
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from lavis.processors.blip_processors import BlipCaptionProcessor

from lavis_point.datasets.point_caption import PointCaptionDataset
from lavis_point.tasks import caption_metrics
from lavis_point.tasks.captioning import PointCaptioningTask


@pytest.fixture
def scored(monkeypatch):
    """The arguments caption_metrics receives (the Java scorers are not needed to see them)."""
    calls = []

    def record(predictions, references, attributes=None, vocabularies=None, spice=False):
        calls.append({"attributes": attributes, "vocabularies": vocabularies, "references": references})
        return {"cider": 0.0}

    monkeypatch.setattr(caption_metrics, "caption_metrics", record)
    return calls


def score(tmp_path, dataset, times=1):
    path = tmp_path / "result.json"
    path.write_text(json.dumps([{"image_id": "a", "caption": "a red cube"}]))
    task = PointCaptioningTask()
    task.before_evaluation(None, dataset)
    for _ in range(times):
        task.score(str(path), "val")


def test_attributes_without_vocabularies_skip_attribute_accuracy_and_say_why_once(tmp_path, scored, caplog):
    dataset = SimpleNamespace(references={"a": ["a red cube"]}, attributes={"a": {"color": "red"}}, vocabularies=None)
    with caplog.at_level(logging.WARNING):
        score(tmp_path, dataset, times=2)
    assert [c["attributes"] for c in scored] == [None, None]
    assert caplog.text.count("no vocabularies") == 1


def test_attributes_with_vocabularies_are_scored(tmp_path, scored):
    vocabularies = {"color": ["red", "blue"]}
    score(tmp_path, SimpleNamespace(references={"a": ["a red cube"]}, attributes={"a": {"color": "red"}},
                                    vocabularies=vocabularies))
    assert scored == [{"attributes": {"a": {"color": "red"}}, "vocabularies": vocabularies,
                       "references": {"a": ["a red cube"]}}]


def test_references_are_the_annotation_captions_not_the_text_processor_output(tmp_path, scored):
    """The PTB tokenizer normalises references, as in LAVIS's COCO evaluation; BLIP's caption processor
    would drop the decimal point and cut a long reference to max_words."""
    long = "a lamp " + " ".join(f"word{i}" for i in range(60))
    annotations = [{"id": "a", "index": 0, "captions": ["A 3.5 m tall lamp (brass).", long, "   ", 7]}]
    dataset = PointCaptionDataset(np.zeros((1, 8, 6), dtype=np.float32), annotations, None,
                                  BlipCaptionProcessor(max_words=50), is_train=False)
    score(tmp_path, dataset)
    assert scored[0]["references"] == {"a": ["A 3.5 m tall lamp (brass).", long]}  # unusable ones dropped


class CaptionsEverything(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def generate(self, samples, **kwargs):
        return ["a red cube"] * len(samples["instance_id"])


def test_metrics_count_the_clouds_that_could_not_be_read(tmp_path, monkeypatch, scored):
    for name in ("result_dir", "output_dir"):
        monkeypatch.setitem(registry.mapping["paths"], name, str(tmp_path))
    task, model = PointCaptioningTask(), CaptionsEverything()
    task.before_evaluation(model, SimpleNamespace(references={"a": ["a red cube"], "b": ["a blue cone"]}))
    loader = [{"point": torch.zeros(1, 4, 6), "instance_id": ["a"], "skipped": ["item 1 (id 'b', b.npy): NaN"]}]
    metrics = task.after_evaluation(task.evaluation(model, loader), "test", 0)
    assert metrics["num_skipped"] == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["test"]["num_skipped"] == 1
