"""A reward served from its own process (`python -m rewards.serve`), used from training as `reward=remote
reward.url=http://127.0.0.1:N`: large reward models (GenEval's detector, VLM judges) get their own environment and
GPU, and the trainer sends images and prompts over HTTP.

The wire format, shared with `rewards/serve.py`: `POST /score` with JSON `{"images": <npy>, "prompts": [...],
"metadata": [...]}`, where `<npy>` is the base64 of the float32 NCHW array in `numpy.save`'s format (exact: the served
reward sees the very values the trainer made); the answer is `{"scores": [...], "info": {name: [...]}}`, info values
being the per-image numbers the reward reports (NaN as null). `GET /info` says which reward is served and whether it is
differentiable (it never is through HTTP: no gradients cross processes).
"""

from __future__ import annotations

import base64
import io
import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch

from pipelines.errors import UserError
from rewards.base import Reward


class RemoteRewardError(UserError):
    """The reward server cannot be reached, or answered with an error."""


def encode_images(images: torch.Tensor) -> str:
    buffer = io.BytesIO()
    np.save(buffer, images.detach().float().cpu().numpy(), allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_images(text: str) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False))


def to_wire(values: torch.Tensor) -> list:
    """Per-image numbers as JSON (NaN as null)."""
    return [None if math.isnan(v) else v for v in values.detach().float().cpu().tolist()]


def from_wire(values: list) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)


class RemoteReward(Reward):
    """Scores from a `rewards.serve` server: `timeout` seconds per request, `retries` more tries after a failure
    (`backoff` x 2^k seconds apart), then a one-line `RemoteRewardError`."""

    differentiable = False

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int | None = None, check: bool = True):
        super().__init__()
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self.batch_size = batch_size
        self.served = self.request("GET", "/info") if check else {}  # a server that is not up stops the run at once

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                request = urllib.request.Request(self.url + path, data=data, method=method,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as error:  # the server answered: its message, no retry for bad input
                message = error.read().decode(errors="replace").strip().splitlines()
                detail = json.loads(message[0]).get("error", message[0]) if message and message[0].startswith(
                    "{") else (message[0] if message else str(error))
                if error.code < 500:
                    raise RemoteRewardError(f"the reward server at {self.url} refused the request: {detail}") from None
                last = f"HTTP {error.code}: {detail}"
            except (urllib.error.URLError, OSError, TimeoutError) as error:
                last = str(getattr(error, "reason", error)) or type(error).__name__
        tries = f"{self.retries + 1} tr{'y' if self.retries == 0 else 'ies'}"
        raise RemoteRewardError(f"the reward server at {self.url} did not answer after {tries} ({last}); start it "
                                f"with `python -m rewards.serve reward=<name> --port N`")

    def score(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> tuple[torch.Tensor, dict[str, Any]]:
        size = self.batch_size or len(prompts)
        scores, info = [], {}
        for start in range(0, len(prompts), size):
            end = start + size
            answer = self.request("POST", "/score", {"images": encode_images(images[start:end]),
                                                     "prompts": prompts[start:end], "metadata": metadata[start:end]})
            scores.append(from_wire(answer["scores"]))
            for name, values in answer.get("info", {}).items():
                info.setdefault(name, []).append(from_wire(values))
        return torch.cat(scores), {name: torch.cat(parts) for name, parts in info.items()}
