"""A differentiable prompt-image matching reward for the CPU-scale digits world: the probability, under a small
classifier trained on real handwritten digits (scikit-learn's `load_digits`), of the digit the prompt asks for.

The prompt names its digit as a numeral or a word ("a handwritten digit 7", "the number seven"). Images are turned to
grey and area-averaged to the data's native 8 x 8 (differentiably) before the classifier. `info` carries `correct`,
whether the classifier's top class is the asked digit: its mean is the held-out *accuracy* of a generator.

The classifier ships as `assets/digits/classifier.pt`, written by `python -m scripts.train_digit_classifier`, which
trains it on one part of the data and reports its accuracy on the rest.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from rewards.base import Reward, RewardInputError

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "digits"
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_PATTERN = re.compile(r"\b(" + "|".join(WORDS) + r"|[0-9])\b", re.IGNORECASE)


def asked_digit(prompt: str) -> int:
    """The digit a prompt asks for (its first numeral or number word); raises `RewardInputError` if none."""
    match = _PATTERN.search(prompt)
    if match is None:
        raise RewardInputError(
            f"reward=digits needs prompts naming a digit (0-9 or zero-nine), got {prompt!r}; "
            "use prompts=digits_world, or another reward"
        )
    token = match.group(1).lower()
    return int(token) if token.isdigit() else WORDS.index(token)


class DigitClassifier(torch.nn.Module):
    """An MLP on 8 x 8 grey images in [0, 1] (scikit-learn's digits divided by 16): 64 -> hidden -> hidden -> 10."""

    def __init__(self, hidden: int = 128):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ReLU(),
            torch.nn.Linear(hidden, 10),
        )

    def forward(self, digits: torch.Tensor) -> torch.Tensor:
        return self.net(digits)


def to_digit_grid(images: torch.Tensor) -> torch.Tensor:
    """NCHW RGB images in [0, 1] -> N x 8 x 8 grey, by channel mean and area averaging (differentiable)."""
    grey = images.float().mean(dim=1, keepdim=True)
    return torch.nn.functional.adaptive_avg_pool2d(grey, 8)[:, 0]


class DigitReward(Reward):
    """`p(asked digit | image)` under the shipped classifier; `info["correct"]` is whether it is the top class."""

    differentiable = True

    def __init__(self, weights: str | None = None):
        super().__init__()
        path = Path(weights).expanduser() if weights else ASSETS / "classifier.pt"
        if not path.is_file():
            raise RewardInputError(
                f"digit classifier weights not found at {path}; write them with "
                f"python -m scripts.train_digit_classifier"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.classifier = DigitClassifier(hidden=state["net.1.weight"].shape[0])
        self.classifier.load_state_dict(state)
        self.freeze()

    def check_prompts(self, prompts) -> None:
        for prompt in prompts:
            asked_digit(prompt)

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        asked = torch.tensor([asked_digit(p) for p in prompts], device=images.device)
        logits = self.classifier(to_digit_grid(images))
        probabilities = logits.softmax(dim=-1)
        scores = probabilities.gather(1, asked[:, None])[:, 0]
        correct = (logits.argmax(dim=-1) == asked).float()
        return scores, {"correct": correct.detach()}
