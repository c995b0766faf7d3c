"""A reward served from its own process (`python -m rewards.serve`), used from training as `reward=remote
reward.url=http://127.0.0.1:N`: large reward models (GenEval's detector, VLM judges) get their own environment and
GPU, and the trainer sends images and prompts over HTTP.

The wire format, shared with `rewards/serve.py`: `POST /score` with JSON `{"images": <npy>, "prompts": [...],
"metadata": [...]}`, where `<npy>` is the base64 of the float32 NCHW array in `numpy.save`'s format (exact: the served
reward sees the very values the trainer made); the answer is `{"scores": [...], "info": {name: [...]}}`, info values
being the per-image numbers the reward reports (NaN as null). `GET /info` says which reward is served, whether it is
differentiable (it never is through HTTP: no gradients cross processes) and the largest request it takes
(`max_request_bytes`, which the client checks before sending). An error answer is `{"error": "<one line>"}`: 4xx for
the request's fault (not retried, except 408 and 429), 500 for a failure inside the reward (retried).
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np
import torch

from rewards.base import Reward, RewardUnavailableError


def error_detail(body: str) -> str:
    """The message of an error answer (`{"error": ...}` or `{"error": {"message": ...}}` as OpenAI-compatible servers
    answer, else the text), on one line."""
    detail: object = body.strip()
    try:
        message = json.loads(body).get("error", body)
        detail = message.get("message", message) if isinstance(message, dict) else message
    except (ValueError, AttributeError):
        pass
    return " ".join(str(detail).split())[:500]


class RemoteRewardError(RewardUnavailableError):
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


def http_json(method: str, url: str, body: dict | None, timeout: float, retries: int, backoff: float, what: str,
              start: str, headers: dict[str, str] | None = None, max_bytes: int | None = None) -> dict:
    """A JSON request with `retries` more tries after a failure (`backoff` x 2^k seconds apart). An answer below
    500 that is an error (bad input) is not retried; `RemoteRewardError` (one line) names `what` failed and how to
    `start` it. A body over `max_bytes` (the server's bound) is refused here, unsent: a server that refuses a large
    body before reading it may reset the connection before its answer is read."""
    data = None if body is None else json.dumps(body).encode()
    if max_bytes is not None and data is not None and len(data) > max_bytes:
        raise RemoteRewardError(f"{what} takes requests of at most {max_bytes / 2**20:g} MiB, this one is "
                                f"{len(data) / 2**20:.1f} MiB: send fewer images per request (reward.batch_size)")
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            request = urllib.request.Request(url, data=data, method=method,
                                             headers={"Content-Type": "application/json", **(headers or {})})
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:  # it answered: its message
            detail = error_detail(error.read().decode(errors="replace")) or str(error)
            if error.code < 500 and error.code not in (408, 429):  # bad input: no retry
                raise RemoteRewardError(f"{what} refused the request (HTTP {error.code}): {detail}") from None
            last = f"HTTP {error.code}: {detail}"
        except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as error:
            last = str(getattr(error, "reason", error)) or type(error).__name__
        except ValueError as error:  # an answer that is not JSON (a proxy's page, a cut-off body)
            last = f"an answer that is not JSON ({str(error).splitlines()[0][:100]})"
    tries = f"{retries + 1} tr{'y' if retries == 0 else 'ies'}"
    raise RemoteRewardError(f"{what} did not answer after {tries} ({last}); {start}")


class RemoteReward(Reward):
    """Scores from a `rewards.serve` server: `timeout` seconds per request, `retries` more tries after a failure
    (`backoff` x 2^k seconds apart), then a one-line `RemoteRewardError`."""

    differentiable = False

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 3, backoff: float = 1.0,
                 batch_size: int | None = 32, check: bool = True):
        super().__init__()
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), timeout, retries, backoff
        self.batch_size = batch_size
        self.served = self.request("GET", "/info") if check else {}  # a server that is not up stops the run at once

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        return http_json(method, self.url + path, body, self.timeout, self.retries, self.backoff,
                         what=f"the reward server at {self.url}",
                         start="start it with `python -m rewards.serve reward=<name> --port N`",
                         max_bytes=self.served.get("max_request_bytes") if body is not None else None)

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
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
