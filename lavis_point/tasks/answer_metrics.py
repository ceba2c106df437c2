"""Short-answer metrics for point QA: answers are normalised as in the VQA evaluation (lower case,
punctuation and articles dropped, number words as digits; a point before a digit is kept as a
decimal point (".5" is not "5"), a comma between digits dropped: "1,000" is "1000"), then compared.

``exact_match``: the prediction equals one of the reference answers.
``vqa_accuracy``: min(1, matches / min(3, #references)): the VQA rule (an answer is fully right when
at least 3 annotators gave it) for 10-answer data; with fewer references the threshold shrinks to
their number, so one reference gives exact match instead of a cap at 1/3. (The official VQA script
also averages over the 10 leave-one-out subsets; with 10 references the two differ only slightly.)
"""
import re
from collections import defaultdict

_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"\.(?!\d)")  # a full stop ("4." too), not a decimal point ("3.5", ".5")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")  # "1,000" is 1000, not two words


def normalize_answer(text):
    text = _THOUSANDS.sub("", str(text).lower().replace("\n", " "))
    text = _PERIOD.sub("", _PUNCTUATION.sub(" ", text))
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def exact_match(prediction, references):
    return float(normalize_answer(prediction) in {normalize_answer(r) for r in references})


def vqa_accuracy(prediction, references):
    if not references:
        raise ValueError("a question needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = sum(normalize_answer(r) == pred for r in references)
    return min(1.0, matches / min(3, len(references)))


def answer_metrics(predictions, references, question_types=None):
    """``predictions``: id -> answer; ``references``: id -> list of answers; ``question_types``
    (optional): id -> type, adding ``exact_match_<type>`` / ``vqa_accuracy_<type>`` per type."""
    missing = [k for k in predictions if k not in references]
    if missing:
        raise ValueError(f"predictions for unknown question ids: {missing[:10]}")
    if not predictions:
        raise ValueError("no answers to score")
    scores = {k: (exact_match(p, references[k]), vqa_accuracy(p, references[k])) for k, p in predictions.items()}
    groups = defaultdict(list)
    for k, s in scores.items():
        groups[""].append(s)
        if question_types is not None:
            groups["_" + str(question_types[k])].append(s)
    out = {}
    for suffix, values in sorted(groups.items()):
        out["exact_match" + suffix] = sum(v[0] for v in values) / len(values)
        out["vqa_accuracy" + suffix] = sum(v[1] for v in values) / len(values)
        out["num_questions" + suffix] = len(values)
    return out
