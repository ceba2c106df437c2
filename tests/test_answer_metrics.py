"""Answer normalisation around numbers, as in the VQA evaluation: a full stop after a number is
punctuation, a point between digits is a decimal point, a comma between digits groups thousands."""
from lavis_point.tasks.answer_metrics import exact_match, normalize_answer


def test_a_full_stop_after_a_number_is_dropped_and_a_decimal_point_kept():
    assert normalize_answer("4.") == "4" and exact_match("4.", ["4"]) == 1.0
    assert normalize_answer("It has 3 legs.") == "it has 3 legs"
    assert normalize_answer("3.5") == "3.5"
    assert normalize_answer(".5") == ".5" and exact_match(".5", ["5"]) == 0.0


def test_a_comma_between_digits_is_dropped_and_other_commas_split_words():
    assert normalize_answer("1,000") == "1000" and exact_match("1,000", ["1000"]) == 1.0
    assert normalize_answer("red,blue") == "red blue"
