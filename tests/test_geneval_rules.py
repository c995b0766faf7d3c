"""GenEval's rules (rewards/geneval_rules.py) on synthetic detections, every outcome computed by hand."""

import json

from rewards.geneval_rules import geneval_correct, kept_detections, relative_position
from rl.prompts import SHIPPED_PROMPTS


def test_relative_position_by_hand():
    # centres (5, 5) and (25, 5): offset (-20, 0); shrunk by 0.1 x (10 + 10) = 2 -> (-18, 0); / 20 -> dx = -0.9
    assert relative_position((0, 0, 10, 10), (20, 0, 30, 10)) == {"left of"}
    assert relative_position((20, 0, 30, 10), (0, 0, 10, 10)) == {"right of"}
    # offset (-20, -20) -> (-18, -18); / 28.28 -> -0.636 each: left of and above (y grows downwards)
    assert relative_position((0, 0, 10, 10), (20, 20, 30, 30)) == {"left of", "above"}
    assert relative_position((0, 40, 10, 50), (0, 0, 10, 10)) == {"below"}
    # offset (-1, 0), shrunk by 2 -> 0: too close to say
    assert relative_position((0, 0, 10, 10), (1, 0, 11, 10)) == set()
    # offset (-20, -5) -> (-18, -3); / 20.62 -> dx = -0.873, dy = -0.145: left of only
    assert relative_position((0, 0, 10, 10), (20, 5, 30, 15)) == {"left of"}


def test_kept_detections_by_tag():
    found = {"cat": [((0, 0, 1, 1), 0.85), ((0, 0, 2, 2), 0.95), ((0, 0, 3, 3), 0.2)], "dog": [((0, 0, 1, 1), 0.25)]}
    kept = kept_detections(found, "two_object")  # above 0.3, most confident first; dog has none
    assert [score for _, score in kept["cat"]] == [0.95, 0.85] and "dog" not in kept
    assert [score for _, score in kept_detections(found, "counting")["cat"]] == [0.95]  # above 0.9 for counting
    many = {"cat": [((0, 0, 1, 1), 0.5 + i / 100) for i in range(20)]}
    assert len(kept_detections(many, "single_object")["cat"]) == 16


def test_equal_scores_are_kept_in_reverse_detection_order():
    """GenEval orders a class's detections by `np.argsort(scores)[::-1]` (evaluate_images.py:232): equal scores come
    out last detected first, which decides which objects the colour and position checks look at."""
    found = {"cat": [((i, 0, i + 1, 1), score) for i, score in enumerate([0.9, 0.5, 0.7, 0.5, 0.5, 0.2])]}
    kept = kept_detections(found, "colors")  # 0.9 (0), 0.7 (2), then the three 0.5s as 4, 3, 1; 0.2 (5) is dropped
    assert [box[0] for box, _ in kept["cat"]] == [0, 2, 4, 3, 1]
    ties = {"cat": [((i, 0, i + 1, 1), 0.5) for i in range(6)]}  # six ties, a cap of 3: the last three, reversed
    assert [box[0] for box, _ in kept_detections(ties, "single_object", max_objects=3)["cat"]] == [5, 4, 3]
    # One red cat is asked for; two cats tie at 0.5, the red one detected first: GenEval checks the blue one.
    metadata = {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}]}
    paint = {(0, 0, 1, 1): "red", (1, 0, 2, 1): "blue"}
    two = kept_detections({"cat": [((0, 0, 1, 1), 0.5), ((1, 0, 2, 1), 0.5)]}, "colors")
    assert geneval_correct(two, metadata, lambda name, objects: [paint[box] for box, _ in objects]) == (
        False, ["expected red cat>=1, found 0 red"])


def box(x1, y1, x2, y2, score=0.9):
    return ((x1, y1, x2, y2), score)


def no_colors(name, objects):
    raise AssertionError("no colour is asked")


def test_counting_with_its_exclude_clause():
    metadata = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    two, three, one = ([box(i, 0, i + 1, 1) for i in range(n)] for n in (2, 3, 1))
    assert geneval_correct({"cat": two}, metadata, no_colors) == (True, [])
    assert geneval_correct({"cat": three}, metadata, no_colors) == (False, ["expected cat<3, found 3"])
    assert geneval_correct({"cat": one}, metadata, no_colors) == (False, ["expected cat>=2, found 1"])


def test_colour_attribution_asks_each_object_its_colour():
    metadata = {"tag": "color_attr", "include": [{"class": "handbag", "count": 1, "color": "pink"},
                                                 {"class": "scissors", "count": 1, "color": "black"}]}
    detected = {"handbag": [box(0, 0, 5, 5)], "scissors": [box(10, 10, 20, 20)]}
    paint = {"handbag": ["pink"], "scissors": ["black"]}
    assert geneval_correct(detected, metadata, lambda name, objects: paint[name]) == (True, [])
    paint["scissors"] = ["white"]
    assert geneval_correct(detected, metadata, lambda name, objects: paint[name]) == (
        False, ["expected black scissors>=1, found 0 black"])


def test_position_against_the_group_an_earlier_clause_matched():
    metadata = {"tag": "position", "include": [{"class": "laptop", "count": 1},
                                               {"class": "cow", "count": 1, "position": ["right of", 0]}]}
    laptop = box(0, 0, 10, 10)
    assert geneval_correct({"laptop": [laptop], "cow": [box(20, 0, 30, 10)]}, metadata, no_colors) == (True, [])
    assert geneval_correct({"laptop": [laptop], "cow": [box(0, 40, 10, 50)]}, metadata, no_colors) == (
        False, ["expected cow right of target, found below target"])
    assert geneval_correct({"cow": [box(20, 0, 30, 10)]}, metadata, no_colors) == (
        False, ["expected laptop>=1, found 0", "no target for cow to be right of"])


def test_the_shipped_metadata_uses_only_these_rules():
    """Every line of the shipped GenEval prompt set has a tag, include clauses of class / count (and colour,
    position with an earlier group), and exclude clauses of class / count."""
    lines = [json.loads(line) for line in (SHIPPED_PROMPTS / "geneval_test_metadata.jsonl").read_text().splitlines()]
    assert len(lines) > 2000  # Flow-GRPO's GenEval set: 2212 lines
    for line in lines:
        for i, clause in enumerate(line["include"]):
            assert set(clause) <= {"class", "count", "color", "position"}
            if "position" in clause:
                assert clause["position"][0] in ("left of", "right of", "above", "below") and clause["position"][1] < i
        for clause in line.get("exclude", []):
            assert set(clause) == {"class", "count"}
    assert {line["tag"] for line in lines} == {"single_object", "two_object", "counting", "colors", "position",
                                                "color_attr"}
