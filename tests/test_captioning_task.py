"""The captioning task's scoring: attribute accuracy only where the dataset can judge it."""
import json
import logging
from types import SimpleNamespace

import pytest

from lavis_point.tasks import caption_metrics
from lavis_point.tasks.captioning import PointCaptioningTask


@pytest.fixture
def scored(monkeypatch):
    """The arguments caption_metrics receives (the Java scorers are not needed to see them)."""
    calls = []

    def record(predictions, references, attributes=None, vocabularies=None, spice=False):
        calls.append({"attributes": attributes, "vocabularies": vocabularies})
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
    assert scored == [{"attributes": {"a": {"color": "red"}}, "vocabularies": vocabularies}]
