"""The GenEval-style training prompts (rl/geneval_prompts.py, assets/prompts/geneval_train_metadata.jsonl): GenEval's
text and metadata rules, no test prompt nor its swapped twin in training, metadata the reward accepts and judges as
meant, the references' task mix, and a shipped file that the script re-makes byte for byte."""

import json
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from rewards.geneval import GenEvalReward
from rewards.geneval_rules import COLORS, geneval_correct
from rl import geneval_prompts as gp
from scripts import make_geneval_train_prompts

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "prompts"
TEST_LINES = (ASSETS / "geneval_test_metadata.jsonl").read_text().splitlines()
TRAIN_LINES = (ASSETS / "geneval_train_metadata.jsonl").read_text().splitlines()
TEST_ROWS = [json.loads(line) for line in TEST_LINES]
TRAIN_ROWS = [json.loads(line) for line in TRAIN_LINES]
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def test_article_and_plural_follow_genevals_rules():
    assert [gp.with_article(w) for w in ("orange", "apple", "umbrella", "elephant", "banana", "hot dog")] == [
        "an orange", "an apple", "an umbrella", "an elephant", "a banana", "a hot dog"]
    assert [gp.plural(w) for w in ("sheep", "scissors", "bus", "wine glass", "skis", "knife", "computer mouse")] == [
        "sheeps", "scissorses", "buses", "wine glasses", "skises", "knifes", "computer mouses"]


def test_each_task_builds_genevals_text_and_metadata():
    assert gp.counting("orange", 3) == {"tag": "counting", "include": [{"class": "orange", "count": 3}],
                                        "exclude": [{"class": "orange", "count": 4}],
                                        "prompt": "a photo of three oranges"}
    assert gp.colors("apple", "orange")["prompt"] == "a photo of an orange apple"  # the article follows the colour
    # position: the reference object (B) is clause 0, and A stands in the relation to it
    assert gp.position("cow", "right of", "laptop") == {
        "tag": "position", "include": [{"class": "laptop", "count": 1},
                                       {"class": "cow", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a cow right of a laptop"}
    assert gp.two_object("frisbee", "apple")["prompt"] == "a photo of a frisbee and an apple"
    assert gp.color_attr("handbag", "pink", "scissors", "orange")["prompt"] == (
        "a photo of a pink handbag and an orange scissors")


def test_the_builders_remake_every_test_row_exactly():
    assert len(TEST_LINES) == 2212 and len({row["prompt"] for row in TEST_ROWS}) == 553
    for line, row in zip(TEST_LINES, TEST_ROWS, strict=True):
        assert json.dumps(gp.rebuild(row)) == line  # same text, metadata and key order
    assert {row["include"][0]["class"] for row in TEST_ROWS if row["tag"] == "single_object"} == set(gp.CLASS_NAMES)
    assert {c["color"] for row in TEST_ROWS for c in row["include"] if "color" in c} == set(COLORS)


def test_pools_hold_every_prompt_the_rules_allow_once():
    sizes = {task: size for task, (size, _) in gp.POOLS.items()}
    assert sizes == {"two_object": 6320, "counting": 240, "colors": 790, "position": 25280, "color_attr": 554580}
    test_prompts = {row["prompt"] for row in TEST_ROWS}
    for task in ("two_object", "counting", "colors", "position"):
        size, row_at = gp.POOLS[task]
        prompts = {row_at(index)["prompt"] for index in range(size)}
        assert len(prompts) == size
        left = len(prompts - test_prompts)
        assert left == {"two_object": 6221, "counting": 160, "colors": 696, "position": 25180}[task]
    assert gp.ordered_pair(0, "abc") == ("a", "b") and [gp.ordered_pair(i, "abc") for i in range(6)][-1] == ("c", "b")


def swapped_text(prompt: str) -> str | None:
    """The same scene said the other way round, from the text alone ("A and B" -> "B and A", "A left of B" ->
    "B right of A")."""
    body = prompt.removeprefix("a photo of ")
    if " and " in body:
        first, second = body.split(" and ")
        return f"a photo of {second} and {first}"
    match = re.fullmatch(r"(.+) (left of|right of|above|below) (.+)", body)
    if match:
        return f"a photo of {match[3]} {OPPOSITE[match[2]]} {match[1]}"
    return None


def test_no_training_prompt_is_a_test_prompt_or_its_swapped_twin():
    test_prompts = {row["prompt"] for row in TEST_ROWS}
    twins = {swapped_text(p) for p in test_prompts} - {None}
    assert len(twins) == 299  # 99 two_object, 100 position, 100 color_attr
    assert "a photo of a laptop left of a cow" in twins  # from "a photo of a cow right of a laptop"
    training = {row["prompt"] for row in TRAIN_ROWS}
    assert not training & test_prompts
    assert not training & twins
    assert gp.excluded_prompts(TEST_ROWS) == test_prompts | twins


def ideal_detections(row: dict) -> dict[str, list]:
    """Boxes that satisfy a row exactly: `count` objects per clause, each positioned objects 150 px from its
    reference in the asked direction."""
    offsets = {"left of": (-150, 0), "right of": (150, 0), "above": (0, -150), "below": (0, 150)}
    detected = {}
    for number, clause in enumerate(row["include"]):
        dx, dy = offsets[clause["position"][0]] if "position" in clause else (0, 0)
        x, y = (400 + dx, 400 + dy) if "position" in clause or number == 0 else (700, 100)
        detected[clause["class"]] = [((x + 70 * k, y, x + 70 * k + 60, y + 60), 0.95) for k in range(clause["count"])]
    return detected


def asked_colours(row: dict):
    """A colour classifier that names every object of a class with the colour the row asks of it."""
    colour_of = {clause["class"]: clause.get("color") for clause in row["include"]}
    return lambda name, found: [colour_of[name]] * len(found)


def test_training_rows_follow_genevals_rules_and_the_reward_reads_them():
    assert all(json.dumps(gp.rebuild(row)) == line for line, row in zip(TRAIN_LINES, TRAIN_ROWS, strict=True))
    assert {c["class"] for row in TRAIN_ROWS for c in row["include"] + row.get("exclude", [])} <= set(gp.CLASS_NAMES)
    detector = SimpleNamespace(labels=dict(enumerate(gp.CLASS_NAMES)))  # the detector's labels, GenEval's names
    GenEvalReward.check_metadata(detector, [row["prompt"] for row in TRAIN_ROWS], TRAIN_ROWS)
    for row in TRAIN_ROWS:
        detected = ideal_detections(row)
        assert geneval_correct(detected, row, asked_colours(row))[0], row["prompt"]
        if row["tag"] == "counting":  # one more object than asked breaks the exclude clause
            name = row["include"][0]["class"]
            detected[name].append(((0, 0, 60, 60), 0.95))
            assert not geneval_correct(detected, row, lambda name, found: [None] * len(found))[0]


def test_the_training_set_mixes_tasks_as_the_references_do():
    assert gp.task_sizes(8500) == {"position": 3500, "color_attr": 1500, "colors": 500, "counting": 2500,
                                   "two_object": 500}
    assert sum(gp.task_sizes(10).values()) == 10
    assert Counter(row["tag"] for row in TRAIN_ROWS) == gp.task_sizes(len(TRAIN_ROWS))
    assert "single_object" not in {row["tag"] for row in TRAIN_ROWS}  # all 80 such prompts are test prompts
    for task in ("two_object", "colors", "position", "color_attr"):  # pools large enough: no repeats
        prompts = [row["prompt"] for row in TRAIN_ROWS if row["tag"] == task]
        assert len(prompts) == len(set(prompts))
    # counting's 160 allowed prompts are all used, as evenly as 2500 rows allow
    uses = Counter(row["prompt"] for row in TRAIN_ROWS if row["tag"] == "counting")
    assert len(uses) == 160 and set(uses.values()) == {15, 16}


def test_draws_are_fixed_by_the_seed():
    assert gp.training_rows(TEST_ROWS, 200, seed=1) == gp.training_rows(TEST_ROWS, 200, seed=1)
    assert gp.training_rows(TEST_ROWS, 200, seed=1) != gp.training_rows(TEST_ROWS, 200, seed=2)


def test_the_script_remakes_the_shipped_file(tmp_path, capsys):
    make_geneval_train_prompts.main(["--out", str(tmp_path / "train.jsonl")])
    assert (tmp_path / "train.jsonl").read_bytes() == (ASSETS / "geneval_train_metadata.jsonl").read_bytes()
    assert "8500 rows" in capsys.readouterr().out


def test_rebuild_knows_every_task_and_only_those():
    assert gp.rebuild(gp.single_object("apple"))["prompt"] == "a photo of an apple"
    with pytest.raises(ValueError, match="not a GenEval task"):
        gp.rebuild({"tag": "bogus", "include": []})
