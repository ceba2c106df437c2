"""Short-answer metrics for point QA, as the official VQA evaluation computes them (LAVIS's
``VQAEval``, whose normalisation we call): answers are normalised (punctuation dropped, except a
point before a digit, a decimal point: ".5" is not "5", and a comma between digits: "1,000" is
"1000"; lower case; number words as digits; articles dropped; "dont" as "don't" and the other
contractions), then compared.

``exact_match``: the prediction equals one of the reference answers.
``vqa_accuracy``: the official VQA accuracy: for each human answer left out in turn,
min(1, matches among the others / 3), averaged. Equal to the official value with four or more
answers (VQA has ten). The official rule scores a question with one answer 0 whatever the prediction
(no other answer to match), and caps two or three agreeing answers at 1/3 or 2/3; so the threshold is
min(3, answers left in): one answer gives exact match, and a unanimous answer always scores 1.
References are normalised as predictions are (VQA's annotations come normalised already; ours do not).
"""
from collections import defaultdict

from lavis.common.vqa_tools.vqa_eval import VQAEval

# Only its normalisation is used. (processDigitArticle adds each word it meets to its number map,
# mapped to itself: the map grows with the answers' vocabulary, nothing else changes.)
_VQA = VQAEval()


def normalize_answer(text):
    text = " ".join(str(text).split())  # newlines and tabs, as VQAEval.evaluate does before normalising
    return _VQA.processDigitArticle(_VQA.processPunctuation(text))


def exact_match(prediction, references):
    return float(normalize_answer(prediction) in {normalize_answer(r) for r in references})


def vqa_accuracy(prediction, references):
    if not references:
        raise ValueError("a question needs at least one reference answer")
    pred = normalize_answer(prediction)
    matches = [normalize_answer(r) == pred for r in references]
    if len(matches) == 1:
        return float(matches[0])
    others = len(matches) - 1
    total = sum(matches)
    return sum(min(1.0, (total - m) / min(3, others)) for m in matches) / len(matches)


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
