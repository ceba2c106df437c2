"""Point question-answering sets. Evaluation items: ``{"point", "text_input": question,
"question_id", "instance_id"}`` (LAVIS's VQA convention: ``predict_answers`` reads the question from
``text_input``). Training items: ``{"point", "text_input": answer, "prompt": the prompt template
filled with the question, "instance_id"}``: stage 2's loss then falls on the answer only.
``answers`` (question id -> reference answers) and ``question_types`` (or None) serve the metrics.

A cloud that cannot be used is a counted skip (bad_samples.py): replaced in training, dropped in
evaluation, so the metrics cover the questions whose cloud was read.

Two sources: a QA JSON (a list of ``{"point": cloud file, "question", "answer": str or [str, ...]}``,
optional ``question_id``, ``question_type``) and the embedded shapes (questions about colour, shape
and size in varied phrasings, answered by the attribute's word).
"""
import os

import numpy as np
from torch.utils.data import Dataset

from lavis_point.data_io.clouds import read_cloud
from lavis_point.datasets.bad_samples import collate_counting_skips, load_or_skip
from lavis_point.datasets.point_caption import read_json, read_jsonl

DEFAULT_PROMPT = "Question: {} Answer: "

# Phrasings of the embedded set's questions; answers are the attribute's word (shapes.py vocabularies).
SHAPES_QUESTIONS = {
    "color": ("what colour is it?", "what colour is this object?", "what is the colour of the object?",
              "which colour is this shape?", "what colour is the point cloud?"),
    "shape": ("what shape is it?", "what is this object?", "what is the shape of the object?",
              "which shape is this?", "what kind of object is the point cloud?"),
    "size": ("what size is it?", "how big is this object?", "what is the size of the object?",
             "is it small, medium or large?", "how large is the shape?"),
}


class PointQADataset(Dataset):
    """``entries``: dicts with ``question_id`` (str), ``cloud`` (what ``clouds[...]`` takes),
    ``question``, ``answers`` (non-empty list) and optionally ``question_type``."""

    def __init__(self, clouds, entries, vis_processor, text_processor, is_train, prompt=DEFAULT_PROMPT):
        if prompt.count("{}") != 1:
            raise ValueError(f"QA prompt must contain exactly one '{{}}' for the question, got {prompt!r}")
        self.clouds, self.entries = clouds, entries
        self.vis_processor, self.text_processor = vis_processor, text_processor
        self.is_train, self.prompt = is_train, prompt

    def __len__(self):
        return len(self.entries)

    def entry(self, i):
        return self.entries[i]

    def __getitem__(self, i):
        return load_or_skip(self.load, i, len(self), self.is_train, self.describe)

    def describe(self, i):
        e = self.entries[i]
        where = f", {e['cloud']}" if isinstance(e["cloud"], str) else ""  # a file, not a row of the embedded set
        return f"item {i} (id {str(e.get('instance_id', e['question_id']))!r}, question {e['question_id']!r}{where})"

    def load(self, i):
        e = self.entry(i)
        point = self.vis_processor(np.asarray(self.clouds[e["cloud"]], dtype=np.float32))
        question = self.text_processor(e["question"])
        instance_id = str(e.get("instance_id", e["question_id"]))
        if self.is_train:
            answer = e["answers"][np.random.randint(len(e["answers"]))]
            return {"point": point, "text_input": answer, "prompt": self.prompt.format(question),
                    "instance_id": instance_id}
        return {"point": point, "text_input": question, "question_id": e["question_id"], "instance_id": instance_id}

    def collater(self, samples):
        return collate_counting_skips(samples)

    @property
    def answers(self):
        return {e["question_id"]: list(e["answers"]) for e in self.entries}

    @property
    def question_types(self):
        if not self.entries or not all("question_type" in e for e in self.entries):
            return None
        return {e["question_id"]: e["question_type"] for e in self.entries}


class ShapesQADataset(PointQADataset):
    """The embedded shapes with questions. Evaluation asks every cloud each of ``question_types``,
    the phrasing drawn from a seed; training draws a question type and phrasing anew each time."""

    def __init__(self, points, annotations, vis_processor, text_processor, is_train, question_types,
                 prompt=DEFAULT_PROMPT, num_items=None, seed=0):
        unknown = sorted(set(question_types) - set(SHAPES_QUESTIONS))
        if unknown:
            raise ValueError(f"question_types {unknown}: the embedded set asks about {sorted(SHAPES_QUESTIONS)}")
        self.annotations, self.question_types_asked = annotations, list(question_types)
        rng = np.random.default_rng(seed)
        if is_train:
            count = num_items or len(annotations)
            # Entries fix only the cloud: entry() redraws the question type and phrasing on each access.
            entries = [self.question(annotations[i % len(annotations)], i, self.question_types_asked[0], 0)
                       for i in range(count)]
        else:
            entries = [self.question(a, f"{a['id']}_{t}", t, rng.integers(len(SHAPES_QUESTIONS[t])))
                       for a in annotations for t in self.question_types_asked]
        super().__init__(points, entries, vis_processor, text_processor, is_train, prompt)

    @staticmethod
    def question(ann, question_id, kind, phrasing):
        return {"question_id": str(question_id), "cloud": ann["index"], "instance_id": ann["id"],
                "question": SHAPES_QUESTIONS[kind][phrasing], "answers": [ann[kind]], "question_type": kind}

    def entry(self, i):
        if not self.is_train:
            return self.entries[i]
        kind = self.question_types_asked[np.random.randint(len(self.question_types_asked))]
        ann = self.annotations[i % len(self.annotations)]
        return self.question(ann, i, kind, np.random.randint(len(SHAPES_QUESTIONS[kind])))


def read_qa_annotations(path, points_root):
    """Entries of a QA JSON (a list) or JSON Lines file; every problem names the file and entry."""
    rows = read_jsonl(path) if path.endswith(".jsonl") else read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of {{'point', 'question', 'answer'}} entries")
    entries = []
    for n, row in enumerate(rows):
        where = f"{path}: entry {n}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        for key in ("point", "question", "answer"):
            if key not in row:
                raise ValueError(f"{where}: missing field '{key}'")
        if not isinstance(row["point"], str) or not isinstance(row["question"], str):
            raise ValueError(f"{where}: 'point' (a cloud file) and 'question' must be strings")
        answers = [row["answer"]] if isinstance(row["answer"], str) else row["answer"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise ValueError(f"{where}: field 'answer' must be a string or a non-empty list of strings")
        point = os.path.expanduser(row["point"])
        entry = {"question_id": str(row.get("question_id", n)), "question": row["question"], "answers": answers,
                 "cloud": point if os.path.isabs(point) else os.path.join(points_root, point)}
        entry["instance_id"] = os.path.splitext(os.path.basename(entry["cloud"]))[0]
        if "question_type" in row:
            entry["question_type"] = str(row["question_type"])
        entries.append(entry)
    ids = [e["question_id"] for e in entries]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question_id values repeat; each question needs its own id")
    return entries


class CloudFiles:
    """``clouds[path]`` -> the cloud in that file."""

    def __getitem__(self, path):
        return read_cloud(path)
