"""Point QA: answer normalisation and metrics, the QA JSON and embedded builders, training items
mixed with captions in one stage-2 batch, and the task through evaluate.py in one process and under
torchrun (every question once)."""
import json
import logging

import numpy as np
import pytest
import torch
from lavis.common.registry import registry
from lavis.datasets.datasets.base_dataset import ConcatDataset
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import lavis_point  # noqa: F401
from lavis_point.datasets import shapes
from lavis_point.datasets.qa import SHAPES_QUESTIONS
from lavis_point.tasks.answer_metrics import answer_metrics, exact_match, normalize_answer, vqa_accuracy
from lavis_point.tasks.qa import PointQATask
from tests.small_models import small_stage2
from tests.understanding_runs import SIZES, evaluate

SMALL = {"train": 8, "val": 8, "test": 8}
ATTRIBUTE_WORDS = set(shapes.SHAPES) | set(shapes.COLORS) | set(shapes.SIZES)


def builder_config(name, **build_info):
    cfg = OmegaConf.load(registry.get_builder_class(name).default_config_path()).datasets[name]
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    return cfg


def build(name, **build_info):
    return registry.get_builder_class(name)(builder_config(name, **build_info)).build_datasets()


def test_answers_are_normalised_as_in_vqa():
    assert normalize_answer("The Red cube.") == "red cube"
    assert normalize_answer("two!") == "2" and normalize_answer("3.5") == "3.5"


def test_exact_match_and_vqa_accuracy():
    assert exact_match("a Cube", ["cube"]) == 1.0 and exact_match("cone", ["cube"]) == 0.0
    assert vqa_accuracy("cube", ["cube"]) == 1.0  # one reference: exact match
    ten = ["cube"] * 2 + ["box"] * 8
    assert vqa_accuracy("cube", ten) == pytest.approx(0.6) and vqa_accuracy("box", ten) == 1.0  # VQA's averaging


def test_answer_metrics_report_each_question_type():
    metrics = answer_metrics({"1": "red", "2": "cone", "3": "cube"}, {"1": ["red"], "2": ["cube"], "3": ["cube"]},
                             {"1": "color", "2": "shape", "3": "shape"})
    assert metrics["exact_match"] == pytest.approx(2 / 3)
    assert metrics["exact_match_color"] == 1.0 and metrics["exact_match_shape"] == 0.5
    assert metrics["num_questions_shape"] == 2


def write_qa(tmp_path, rows):
    (tmp_path / "clouds").mkdir(exist_ok=True)
    np.save(tmp_path / "clouds" / "obj1.npy", np.random.rand(50, 6).astype(np.float32))
    path = tmp_path / "qa.json"
    path.write_text(json.dumps(rows))
    return str(path)


def test_qa_json_builder_gives_eval_and_training_items(tmp_path):
    path = write_qa(tmp_path, [
        {"point": "clouds/obj1.npy", "question": "What colour is it?", "answer": "red", "question_type": "color"},
        {"point": "clouds/obj1.npy", "question": "What is it?", "answer": ["a chair", "chair"], "question_id": "q9"},
    ])
    datasets = build("point_qa", annotations={"train": path, "test": path}, splits=["train", "test"])
    test, train = datasets["test"], datasets["train"]
    item = test[1]
    assert item["text_input"] == "what is it?" and item["question_id"] == "q9" and item["instance_id"] == "obj1"
    assert test.answers == {"0": ["red"], "q9": ["a chair", "chair"]}
    assert test.question_types is None  # only some entries have a type
    item = train[0]
    assert item["text_input"] == "red" and item["prompt"] == "Question: what colour is it? Answer: "


@pytest.mark.parametrize("row, problem", [
    ({"question": "q", "answer": "a"}, "entry 0: missing field 'point'"),
    ({"point": "x.npy", "question": "q", "answer": []}, "entry 0: field 'answer' must be"),
    ({"point": "x.npy", "question": 3, "answer": "a"}, "entry 0: 'point' .* must be strings"),
])
def test_qa_json_errors_name_the_file_entry_and_field(tmp_path, row, problem):
    path = write_qa(tmp_path, [row])
    with pytest.raises(ValueError, match="qa.json: " + problem):
        build("point_qa", annotations={"test": path})


class SaysRed(torch.nn.Module):
    """Answers "red" to every question."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def predict_answers(self, samples, **kwargs):
        return ["red"] * len(samples["question_id"])


def test_qa_evaluation_scores_the_questions_whose_cloud_is_readable(tmp_path, monkeypatch, caplog):
    nan = np.random.rand(50, 6).astype(np.float32)
    nan[3, 1] = np.nan
    path = write_qa(tmp_path, [{"point": "clouds/obj1.npy", "question": "q", "answer": "red"},
                               {"point": "clouds/nan.npy", "question": "q", "answer": "red"},
                               {"point": "clouds/obj1.npy", "question": "q", "answer": "blue"}])
    np.save(tmp_path / "clouds" / "nan.npy", nan)
    test = build("point_qa", annotations={"test": path})["test"]
    for name in ("result_dir", "output_dir"):
        monkeypatch.setitem(registry.mapping["paths"], name, str(tmp_path))
    task, model = PointQATask(), SaysRed()
    task.before_evaluation(model, test)
    with caplog.at_level(logging.WARNING):
        results = task.evaluation(model, DataLoader(test, batch_size=2, collate_fn=test.collater))
    metrics = task.after_evaluation(results, "test", 0)
    assert metrics["num_questions"] == 2 and metrics["exact_match"] == 0.5  # over the two readable ones
    assert metrics["num_skipped"] == 1
    assert "evaluation: skipped 1 bad samples" in caplog.text and "nan.npy" in caplog.text


def test_embedded_qa_asks_every_cloud_each_question_type_with_varied_phrasings(tmp_path):
    test = build("shapes_point_qa", root=str(tmp_path), sizes=SMALL, num_points=1024, splits=["test"])["test"]
    assert len(test) == 3 * SMALL["test"]
    types = test.question_types
    assert sorted(set(types.values())) == ["color", "shape", "size"]
    questions = {test.entries[i]["question"] for i in range(len(test))}
    assert len(questions) > 3  # more than one phrasing per type
    for i in range(len(test)):
        e = test.entries[i]
        assert e["question"] in SHAPES_QUESTIONS[e["question_type"]]
    folder_ann = {a["id"]: a for a in test.annotations}
    assert all(e["answers"] == [folder_ann[e["instance_id"]][e["question_type"]]] for e in test.entries)


def test_embedded_qa_training_items_carry_the_prompt_and_fit_the_tiny_lm(tmp_path):
    train = build("shapes_point_qa", root=str(tmp_path), sizes=SMALL, num_points=1024, splits=["train"],
                  num_train_items=20)["train"]
    assert len(train) == 20
    model = small_stage2()
    for i in range(len(train)):
        item = train[i]
        assert item["prompt"].startswith("Question: ") and item["prompt"].endswith(" Answer: ")
        tokens = model.opt_tokenizer(item["prompt"] + item["text_input"] + "\n").input_ids
        assert len(tokens) <= model.max_txt_len  # truncation would cut the answer


def test_captions_and_questions_mix_in_one_stage2_batch(tmp_path):
    """LAVIS's ConcatDataset keeps only keys every item has: captions carry their prompt (the
    caption set's ``prompt`` option, else None: the model's prompt) so the QA items keep theirs."""
    common = dict(root=str(tmp_path), sizes=SMALL, num_points=1024)
    caption_cfg = builder_config("shapes_point_caption", **common)
    caption_cfg.prompt = "a 3D point cloud of "
    captions = registry.get_builder_class("shapes_point_caption")(caption_cfg).build_datasets()["train"]
    questions = build("shapes_point_qa", splits=["train"], **common)["train"]
    mixed = ConcatDataset([captions, questions])
    batch = mixed.collater([mixed[0], mixed[len(captions)], mixed[1], mixed[len(captions) + 1]])
    assert batch["prompt"][0] == "a 3D point cloud of " and batch["prompt"][1].startswith("Question: ")
    assert batch["text_input"][1] in ATTRIBUTE_WORDS and batch["text_input"][0] not in ATTRIBUTE_WORDS
    loss = small_stage2()(batch)["loss"]
    assert torch.isfinite(loss)
    caption_cfg.prompt = None  # no prompt on the caption set: its items take the model's
    without = registry.get_builder_class("shapes_point_caption")(caption_cfg).build_datasets()["train"]
    kept = ConcatDataset([without, questions]).collater([without[0], questions[0]])
    assert kept["prompt"][0] is None and kept["prompt"][1].startswith("Question: ")  # questions kept
    model = small_stage2().eval()
    torch.manual_seed(0)
    implicit = model(kept)["loss"]
    torch.manual_seed(0)
    explicit = model({**kept, "prompt": [model.prompt, kept["prompt"][1]]})["loss"]
    assert torch.equal(implicit, explicit)
    torch.manual_seed(0)
    generated = model.generate({**kept, "prompt": [None, None]}, max_length=4)
    torch.manual_seed(0)
    assert generated == model.generate({"point": kept["point"]}, max_length=4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("qa"))
    cfg, builder = "projects/embedded/qa_eval.yaml", "shapes_point_qa"
    extra = ("model.finetuned=null", "run.num_beams=2", "run.max_len=3")
    return [evaluate(cfg, out, job, builder, *extra, nproc=n) for job, n in (("one", 1), ("two", 2))]


def test_qa_through_evaluate_in_one_process_and_under_torchrun(runs):
    one, two = runs
    for metrics in runs:
        assert metrics["num_questions"] == 3 * SIZES["test"]
        assert metrics["num_questions_color"] == metrics["num_questions_shape"] == SIZES["test"]
        assert 0.0 <= metrics["vqa_accuracy"] <= 1.0
    assert two["exact_match"] == pytest.approx(one["exact_match"], abs=0.05)

