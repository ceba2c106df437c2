"""Answer normalisation and VQA accuracy as in the official VQA evaluation (LAVIS's VQAEval): a full
stop after a number is punctuation, a point between digits is a decimal point, a comma between digits
groups thousands; contractions, number words and articles; leave-one-out averaging over the human
answers."""
import pytest

from lavis_point.tasks.answer_metrics import exact_match, normalize_answer, vqa_accuracy


def test_a_full_stop_after_a_number_is_dropped_and_a_decimal_point_kept():
    assert normalize_answer("4.") == "4" and exact_match("4.", ["4"]) == 1.0
    assert normalize_answer("It has 3 legs.") == "it has 3 legs"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer(".5") == ".5" and exact_match(".5", ["5"]) == 0.0


def test_a_comma_between_digits_is_dropped_and_other_commas_split_words():
    assert normalize_answer("1,000") == "1000" and exact_match("1,000", ["1000"]) == 1.0
    assert normalize_answer("red,blue") == "red blue"


class _Annotations:
    """What LAVIS's VQAEval reads: ``qa[question_id]`` and ``getQuesIds()``."""

    def __init__(self, qa):
        self.qa = qa

    def getQuesIds(self):
        return list(self.qa)


def official_vqa_accuracy(cases):
    """LAVIS's VQAEval (the official VQA evaluation) on (prediction, ten human answers) pairs. Human
    answers are written as the VQA annotations give them, already normalised."""
    from lavis.common.vqa_tools.vqa_eval import VQAEval

    gts = {q: {"question_type": "t", "answer_type": "other",
               "answers": [{"answer": a, "answer_id": n + 1} for n, a in enumerate(answers)]}
           for q, (_, answers) in enumerate(cases)}
    res = {q: {"answer": prediction} for q, (prediction, _) in enumerate(cases)}
    official = VQAEval(_Annotations(gts), _Annotations(res), n=12)
    official.evaluate()
    return [official.evalQA[q] / 100 for q in range(len(cases))]


CASES = [
    ("dont know", ["don't know"] * 4 + ["no"] * 6),  # contraction: official 1.0
    ("Two.", ["2"] * 2 + ["3"] * 8),  # number word; 2 of 10 agree: 0.6 after leave-one-out averaging
    ("the cube", ["cube"] * 3 + ["box"] * 7),  # 3 of 10: 0.9, not 1
    ("box", ["cube"] * 3 + ["box"] * 7),
    ("Yes!", ["yes"] * 10),
    ("red", ["red", "blue", "green", "red", "dark red", "red", "maroon", "crimson", "blue", "blue"]),
    ("12:30", ["12:30"] * 5 + ["noon"] * 5),  # a colon is not punctuation to VQA
    ("cube", ["cube", "cube", "box", "box", "cube"]),  # fewer than ten answers, still four or more
    ("sphere", ["cube"] * 10),
]


def test_vqa_accuracy_equals_the_official_vqa_evaluation_with_several_human_answers():
    ours = [vqa_accuracy(p, answers) for p, answers in CASES]
    assert ours == pytest.approx(official_vqa_accuracy(CASES), abs=1e-9)
    assert ours[:3] == pytest.approx([1.0, 0.6, 0.9])


def test_answers_are_normalised_as_the_official_vqa_evaluation_does():
    assert normalize_answer("dont know") == normalize_answer("don't know") == "don't know"
    assert normalize_answer("Two Dogs") == "2 dogs" and normalize_answer("an apple") == "apple"
    assert exact_match("DONT know.", ["don't know"]) == 1.0


def test_one_or_few_human_answers_score_as_exact_match_not_the_official_zero():
    """Official VQA accuracy compares with the other annotators' answers only: one answer scores 0."""
    assert official_vqa_accuracy([("cube", ["cube"])]) == [0.0]
    assert vqa_accuracy("a cube", ["cube"]) == 1.0 and vqa_accuracy("cone", ["cube"]) == 0.0
    assert vqa_accuracy("cube", ["cube", "cube"]) == 1.0  # a unanimous answer is fully right
    assert vqa_accuracy("cube", ["cube", "box"]) == pytest.approx(0.5)
