"""A vision-language model as the judge (UnifiedReward, Qwen-VL and the like), reached through an OpenAI-compatible
chat-completions endpoint: vLLM (`vllm serve MODEL --port 8000`) or sglang serving it on this machine or another.

Each image goes as a PNG data URL with the prompt template filled in (`{prompt}`: the image's prompt); the judge's
answer is parsed with a regular expression whose first group is the number (`score_pattern`), and the reward is
`(number - offset) * scale`. The template and the pattern are configuration: use the ones the judge was trained with
(its model card says), e.g. UnifiedReward's point-score template ending in "Final Score: X" and `scale` 1/5 to map
1..5 into 0.2..1. An answer without a number scores `unparsed_score` (default 0) and is counted in `info`
(`parsed`: 1 or 0). Requests run `workers` at a time (the server batches concurrent requests), with
`reward.timeout`, `reward.retries` and a one-line error as `reward=remote`; at start, the server's
`/models` must answer and list `reward.model` (`reward.check=false` skips that). Not differentiable.
"""

from __future__ import annotations

import base64
import io
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import PIL.Image
import torch

from rewards.base import Reward, RewardInputError
from rewards.remote import http_json

START = "serve the judge there (e.g. `vllm serve MODEL --port 8000`) or set reward.url"
DEFAULT_TEMPLATE = (
    "You are given a text caption and an image generated from it. Judge how well the image matches the caption and "
    "how good the image is, then rate it on a scale of 1 to 5 (5 is best). Caption: {prompt}\n"
    "End your answer with the line 'Final Score: X', where X is your rating."
)


def png_data_url(image: torch.Tensor) -> str:
    """A CHW image in [0, 1] as an 8-bit PNG data URL."""
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    PIL.Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def parse_score(answer: str, pattern: str) -> float | None:
    """The first group of the last match of `pattern` in the judge's answer, as a number (None if none)."""
    matches = list(re.finditer(pattern, answer))
    if not matches:
        return None
    try:
        return float(matches[-1].group(1))
    except (IndexError, ValueError):
        return None


class VlmJudgeReward(Reward):
    """`(parsed number - offset) * scale` from an OpenAI-compatible vision chat endpoint, per image."""

    differentiable = False

    def __init__(self, url: str = "http://127.0.0.1:8000/v1", model: str = "CodeGoat24/UnifiedReward-qwen-7b",
                 template: str | None = None, score_pattern: str = r"Final Score:\s*\**\s*([0-9]+(?:\.[0-9]+)?)",
                 scale: float = 0.2, offset: float = 0.0, unparsed_score: float = 0.0, max_tokens: int = 512,
                 temperature: float = 0.0, api_key_env: str | None = "OPENAI_API_KEY", workers: int = 8,
                 timeout: float = 300.0, retries: int = 3, backoff: float = 1.0, check: bool = True):
        super().__init__()
        template = DEFAULT_TEMPLATE if template is None else template
        if "{prompt}" not in template:
            raise RewardInputError("reward.template must contain {prompt} (where the image's prompt goes)")
        if re.compile(score_pattern).groups < 1:
            raise RewardInputError(f"reward.score_pattern={score_pattern!r} needs a group around the number")
        self.url, self.model, self.template, self.score_pattern = url.rstrip("/"), model, template, score_pattern
        self.scale, self.offset, self.unparsed_score = scale, offset, unparsed_score
        self.max_tokens, self.temperature, self.workers = max_tokens, temperature, workers
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        key = os.environ.get(api_key_env) if api_key_env else None
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        if check:  # a judge that is not up stops the run before any model loads; and it must serve this model
            served = http_json("GET", self.url + "/models", None, min(timeout, 30.0), retries, backoff,
                               what=f"the judge at {self.url}", headers=self.headers, start=START)
            names = [m.get("id") for m in served.get("data", []) if isinstance(m, dict)]
            if names and model not in names:
                raise RewardInputError(f"the judge at {self.url} serves {', '.join(map(str, names))}, not "
                                       f"reward.model={model}")

    def ask(self, image: torch.Tensor, prompt: str) -> str:
        """The judge's answer for one image."""
        body = {"model": self.model, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(image)}},
                    {"type": "text", "text": self.template.replace("{prompt}", prompt)}]}]}
        answer = http_json("POST", self.url + "/chat/completions", body, self.timeout, self.retries, self.backoff,
                           what=f"the judge at {self.url}", headers=self.headers, start=START)
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise RewardInputError(f"the judge at {self.url} answered without choices[0].message.content: "
                                   f"{str(answer)[:200]}") from None

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            answers = list(pool.map(self.ask, images.cpu(), prompts))
        numbers = [parse_score(answer, self.score_pattern) for answer in answers]
        scores = torch.tensor([self.unparsed_score if n is None else (n - self.offset) * self.scale for n in numbers])
        return scores, {"parsed": torch.tensor([float(n is not None) for n in numbers])}
