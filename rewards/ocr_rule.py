"""How Flow-GRPO scores text rendering (its `flow_grpo/ocr.py`), as pure functions: the text an OCR prompt asks for,
what an OCR engine read, and the score between them. The OCR engines themselves (issue 19) are separate.

- The asked text is what the prompt holds between its first pair of double quotes: `... displaying "Spring
  Collection 2024". ...` asks for `Spring Collection 2024`.
- Both sides are compared without spaces and in lower case; the engine's lines are joined in reading order (Flow-GRPO
  keeps the lines of confidence above 0).
- If the asked text occurs anywhere in what was read, the distance is 0 (extra text costs nothing); otherwise it is
  the Levenshtein distance between the two, capped at the asked text's length (many unrelated characters cost no more
  than reading nothing).
- The score is `1 - distance / len(asked)`, in [0, 1]: 1 for the text read exactly, 0 for nothing read.
"""

from __future__ import annotations

from rewards.base import RewardInputError


def quoted_text(prompt: str) -> str:
    """The text between the prompt's first pair of double quotes; `RewardInputError` if it has none."""
    parts = prompt.split('"')
    if len(parts) < 3 or not parts[1].strip():
        raise RewardInputError(f'reward=ocr needs prompts with the text to render in double quotes ("..."), got '
                               f"{prompt[:80]!r}; use prompts=ocr")
    return parts[1]


def normalise(text: str) -> str:
    """Spaces removed, lower case: what Flow-GRPO compares."""
    return text.replace(" ", "").lower()


def levenshtein(a: str, b: str) -> int:
    """The edit distance between `a` and `b` (insertions, deletions and substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_distance(asked: str, read: str) -> int:
    """Flow-GRPO's distance: 0 when the asked text occurs in what was read, else the Levenshtein distance, at most
    the asked text's length (both normalised first)."""
    asked, read = normalise(asked), normalise(read)
    if asked in read:
        return 0
    return min(levenshtein(read, asked), len(asked))


def ocr_score(asked: str, read: str) -> float:
    """`1 - ocr_distance / len(asked)`, in [0, 1]."""
    length = len(normalise(asked))
    if length == 0:
        raise RewardInputError("the text to render is empty (only spaces between the quotes)")
    return 1 - ocr_distance(asked, read) / length
