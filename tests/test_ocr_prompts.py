"""The text-rendering training prompts (rl/ocr_prompts.py, assets/prompts/ocr_train.txt): no test prompt and no test
target (as the OCR reward compares them) in training, short English targets in double quotes, and a shipped file that
the script re-makes byte for byte."""

import re
from collections import Counter
from pathlib import Path

from rewards.ocr_rule import normalise, quoted_text
from rl import ocr_prompts as op
from scripts import make_ocr_train_prompts

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "prompts"
TEST_PROMPTS = (ASSETS / "ocr_test.txt").read_text().splitlines()
TRAIN_PROMPTS = (ASSETS / "ocr_train.txt").read_text().splitlines()


def test_no_training_prompt_or_target_is_a_test_one():
    assert len(TEST_PROMPTS) == 1018 and len(TRAIN_PROMPTS) == op.DEFAULT_SIZE
    assert not set(TRAIN_PROMPTS) & set(TEST_PROMPTS)
    test_targets = {normalise(quoted_text(p)) for p in TEST_PROMPTS}
    assert not {normalise(quoted_text(p)) for p in TRAIN_PROMPTS} & test_targets
    # the filter compares as the reward does: a test target in other case and spacing is still left out
    assert op.target_key('A sign reading "handle withcare", at dusk.') in test_targets


def test_training_prompts_are_scenes_with_one_short_quoted_text():
    assert len(set(TRAIN_PROMPTS)) == len(TRAIN_PROMPTS)
    targets = [quoted_text(p) for p in TRAIN_PROMPTS]
    assert all(p.count('"') == 2 for p in TRAIN_PROMPTS)
    assert all(1 <= len(t.split()) <= 4 and re.fullmatch(r"[A-Za-z0-9' ]+", t) for t in targets)
    assert max(Counter(normalise(t) for t in targets).values()) <= op.MAX_PROMPTS_PER_TARGET
    assert len(set(targets)) > 3000  # thousands of different texts


def test_every_phrase_pattern_fills_to_one_to_four_words():
    def words(pattern: str, pick) -> int:  # each slot is one word of the pattern, and its filling may add more
        extra = sum(pick(len(w.split()) - 1 for w in op.WORDS[slot]) for slot in op.SLOT.findall(pattern))
        return len(pattern.split()) + extra

    for kind, patterns in op.PHRASES.items():
        for pattern in patterns:
            assert set(op.SLOT.findall(pattern)) <= set(op.WORDS), pattern
            assert words(pattern, min) >= 1 and words(pattern, max) <= 4, (kind, pattern)
    assert {kind for scene in op.SCENES for kind in scene.kinds} == set(op.PHRASES)
    for scene in op.SCENES:
        assert scene.template.count('"{text}"') == 1 and scene.template.count('"') == 2
        assert scene.template.endswith(("{light}.", "{indoor_light}."))


def test_draws_are_fixed_by_the_seed():
    assert op.training_prompts(TEST_PROMPTS, 50, seed=1) == op.training_prompts(TEST_PROMPTS, 50, seed=1)
    assert op.training_prompts(TEST_PROMPTS, 50, seed=1) != op.training_prompts(TEST_PROMPTS, 50, seed=2)


def test_the_script_remakes_the_shipped_file(tmp_path, capsys):
    make_ocr_train_prompts.main(["--out", str(tmp_path / "train.txt")])
    assert (tmp_path / "train.txt").read_bytes() == (ASSETS / "ocr_train.txt").read_bytes()
    assert "5000 prompts" in capsys.readouterr().out
