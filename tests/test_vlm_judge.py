"""reward=vlm_judge against a small local stand-in of an OpenAI-compatible chat endpoint: the request it sends
(model, PNG data URL of the very image, the filled template), the score parsed from the answer, answers without a
number, concurrency, and one-line errors."""

import base64
import inspect
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import PIL.Image
import pytest
import torch

from rewards.base import RewardInputError
from rewards.remote import RemoteRewardError
from rewards.vlm_judge import VlmJudgeReward, parse_score

VLM_DEFAULT = inspect.signature(VlmJudgeReward).parameters["model"].default  # the default model name


class StubJudge:
    """Answers 'Final Score: <mean brightness x 5, rounded>' (or whatever `answer` says), recording each request."""

    def __init__(self, answer=None, status=200):
        self.requests, self.answer, self.status = [], answer, status
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the models it serves)
                data = json.dumps({"object": "list", "data": [{"id": "judge-7b"}, {"id": VLM_DEFAULT}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                judge.requests.append((self.path, dict(self.headers), body))
                image_url = body["messages"][0]["content"][0]["image_url"]["url"]
                pixels = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(image_url.split(",", 1)[1]))))
                text = judge.answer if judge.answer is not None else (
                    f"Looks fine.\nFinal Score: {round(pixels.mean() / 255 * 5)}")
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}
                                  if judge.status == 200 else {"error": {"message": "model not loaded"}}).encode()
                self.send_response(judge.status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"


@pytest.fixture
def judge():
    stub = StubJudge()
    yield stub
    stub.server.shutdown()


def test_parse_score():
    pattern = r"Final Score:\s*\**\s*([0-9]+(?:\.[0-9]+)?)"
    assert parse_score("Final Score: 4", pattern) == 4.0
    assert parse_score("first 2 ... **Final Score:** then\nFinal Score: **3.5**", pattern) == 3.5  # the last one
    assert parse_score("I cannot rate this.", pattern) is None


def test_the_judge_sees_each_image_and_its_prompt_and_its_score_comes_back(judge, monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret")
    reward = VlmJudgeReward(url=judge.url, model="judge-7b", template="Rate: {prompt}", api_key_env="MY_KEY",
                            workers=2)
    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.5, 1.0)])
    scores, info = reward(images, ["a cat", "a dog", "a fish"])
    assert scores.tolist() == pytest.approx([0.0, 0.6, 1.0])  # 0.5 is 128 / 255: round(2.51) = 3, x 0.2
    assert info["parsed"].tolist() == [1.0, 1.0, 1.0]
    paths = {path for path, _, _ in judge.requests}
    bodies = sorted((body["messages"][0]["content"][1]["text"], body) for _, _, body in judge.requests)
    assert paths == {"/v1/chat/completions"} and [text for text, _ in bodies] == ["Rate: a cat", "Rate: a dog",
                                                                                   "Rate: a fish"]
    assert all(body["model"] == "judge-7b" and body["temperature"] == 0.0 for _, body in bodies)
    assert all(headers["Authorization"] == "Bearer secret" for _, headers, _ in judge.requests)


def test_answers_without_a_number_score_the_fallback_and_are_counted():
    stub = StubJudge(answer="I'd rather not say.")
    try:
        scores, info = VlmJudgeReward(url=stub.url, unparsed_score=-1.0)(torch.rand(2, 3, 4, 4), ["a", "b"])
    finally:
        stub.server.shutdown()
    assert scores.tolist() == [-1.0, -1.0] and info["parsed"].tolist() == [0.0, 0.0]


def test_bad_settings_and_a_failing_server_in_one_line():
    with pytest.raises(RewardInputError, match="must contain {prompt}"):
        VlmJudgeReward(template="Rate this image.", check=False)
    with pytest.raises(RewardInputError, match="needs a group"):
        VlmJudgeReward(score_pattern=r"Final Score: \d", check=False)
    stub = StubJudge(status=404)
    try:
        with pytest.raises(RewardInputError, match="serves judge-7b, .*not reward.model=other"):
            VlmJudgeReward(url=stub.url, model="other")
        with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 404\): model not loaded"):
            VlmJudgeReward(url=stub.url)(torch.rand(1, 3, 4, 4), ["a"])
    finally:
        stub.server.shutdown()
    with pytest.raises(RemoteRewardError, match=r"the judge at http://127.0.0.1:9/v1 did not answer after 1 try"):
        VlmJudgeReward(url="http://127.0.0.1:9/v1", retries=0)  # down at start: before any model loads
    with pytest.raises(RemoteRewardError, match=r"the judge at http://127.0.0.1:9/v1 did not answer after 1 try"):
        VlmJudgeReward(url="http://127.0.0.1:9/v1", retries=0, check=False)(torch.rand(1, 3, 4, 4), ["a"])
