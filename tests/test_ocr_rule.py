"""Flow-GRPO's OCR score (rewards/ocr_rule.py) by hand: the quoted text, the normalisation, the edit distance, the cap
and the containment rule."""

import pytest

from rewards.base import RewardInputError
from rewards.ocr_rule import levenshtein, normalise, ocr_distance, ocr_score, quoted_text


def test_the_asked_text_is_between_the_first_quotes():
    prompt = 'A runway with a backdrop displaying "Spring Collection 2024". Models walk "on" the catwalk.'
    assert quoted_text(prompt) == "Spring Collection 2024"
    for bad in ("no quotes at all", 'one " quote', 'empty "  " quotes'):
        with pytest.raises(RewardInputError, match="double quotes"):
            quoted_text(bad)


@pytest.mark.parametrize("a, b, distance", [
    ("", "", 0), ("abc", "", 3), ("", "abc", 3), ("kitten", "sitting", 3),  # k->s, e->i, +g
    ("flaw", "lawn", 2),  # -f, +n
    ("hello", "hello", 0), ("hello", "helo", 1), ("abc", "cba", 2),
])
def test_levenshtein_by_hand(a, b, distance):
    assert levenshtein(a, b) == distance == levenshtein(b, a)


def test_score_by_hand():
    asked = "Forever Yours"  # normalised: "foreveryours", 12 characters
    assert normalise(asked) == "foreveryours"
    assert ocr_score(asked, "FOREVER YOURS") == 1.0  # case and spaces do not count
    assert ocr_score(asked, "xx forever yours xx") == 1.0  # contained: extra text costs nothing
    assert ocr_distance(asked, "forevr yours") == 1 and ocr_score(asked, "forevr yours") == pytest.approx(11 / 12)
    assert ocr_distance(asked, "forever yuors") == 2 and ocr_score(asked, "forever yuors") == pytest.approx(10 / 12)
    assert ocr_score(asked, "") == 0.0  # nothing read: distance 12, the whole length
    assert ocr_distance(asked, "a completely unrelated and much longer sentence") == 12  # capped at the length
    assert ocr_score(asked, "a completely unrelated and much longer sentence") == 0.0
    with pytest.raises(RewardInputError, match="empty"):
        ocr_score("   ", "anything")
