"""Rewards served from their own process: `python -m rewards.serve` on 127.0.0.1 with the JPEG and digits rewards
gives the in-process scores exactly, GRPO trains through `reward=remote` to the same metrics, and a server that is
gone or refuses gives one line. The server's hardening, against raw sockets: a client that stops sending holds up no
other and is cut off (408), an oversized request is refused before its body is read (413), every malformed request
gets 400 with a one-line message, and only a failure inside the reward gets 500."""

import base64
import http.client
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from rewards.digits import DigitReward
from rewards.jpeg import JpegSizeReward
from rewards.remote import RemoteReward, RemoteRewardError, decode_images, encode_images

ROOT = Path(__file__).resolve().parents[1]


def start_server(*overrides):
    process = subprocess.Popen([sys.executable, "-m", "rewards.serve", "--port", "0", *overrides], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
    if match is None:
        process.kill()
        raise AssertionError(f"the server did not start: {line!r} {process.stderr.read()[-2000:]}")
    return process, match.group(1)


@pytest.fixture(scope="module")
def jpeg_server():
    process, url = start_server("reward=jpeg_compressibility")
    yield url
    process.kill()
    process.wait()


def test_the_wire_carries_float_images_exactly():
    images = torch.rand(2, 3, 5, 7)
    assert torch.equal(decode_images(encode_images(images)), images)


def test_served_rewards_score_as_in_process(jpeg_server):
    torch.manual_seed(0)
    images = torch.rand(3, 3, 32, 32)
    prompts = ["a photo of the number 3", "an image of the number 7", "a photo of the number 0"]
    remote = RemoteReward(jpeg_server)
    assert remote.served["differentiable"] is False and remote.served["reward"] == "rewards.jpeg.JpegSizeReward"
    for got, want in zip(remote(images, prompts), JpegSizeReward()(images, prompts), strict=True):
        if isinstance(got, dict):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k].float()) for k in got)
        else:
            assert torch.equal(got, want)
    process, url = start_server("reward=digits")
    try:
        scores, info = RemoteReward(url)(images, prompts)
        local_scores, local_info = DigitReward()(images, prompts)
        assert torch.equal(scores, local_scores.detach()) and torch.equal(info["correct"], local_info["correct"])
        # in requests of 2 (a batch of 2 and one of 1: matrix products of other shapes round differently)
        torch.testing.assert_close(RemoteReward(url, batch_size=2)(images, prompts)[0], local_scores.detach())
    finally:
        process.kill()
        process.wait()


def test_a_server_that_refuses_or_is_gone_says_so_in_one_line(jpeg_server):
    remote = RemoteReward(jpeg_server, retries=1, backoff=0.01)
    with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 400\): malformed request"):
        remote.request("POST", "/score", {"images": encode_images(torch.rand(1, 3, 4, 4))})  # no prompts
    with pytest.raises(RemoteRewardError, match="did not answer after 1 try"):  # down at start: before models load
        RemoteReward("http://127.0.0.1:9", retries=0)
    process, url = start_server("reward=jpeg_compressibility")
    remote = RemoteReward(url, retries=2, backoff=0.01)
    process.kill()
    process.wait()
    with pytest.raises(RemoteRewardError, match=r"did not answer after 3 tries .*python -m rewards.serve") as error:
        remote(torch.rand(1, 3, 8, 8), ["x"])
    assert "\n" not in str(error.value)


def test_serve_checks_its_command_line_before_loading():
    from pipelines.errors import UserError
    from rewards.serve import load_reward

    for overrides, message in (([], "name the reward to serve"), (["reward=nonsense"], "nonsense"),
                               (["reward=remote"], "reward=remote is the client")):
        with pytest.raises(UserError, match=message):
            load_reward(overrides)


@pytest.mark.slow  # the same checks as the test above, through the command line's exit code and stderr
def test_serve_refuses_bad_command_lines_in_one_line():
    for args, message in ((["--port", "0"], "name the reward to serve"),
                          (["--port", "0", "reward=nonsense"], "reward"),
                          (["--port", "0", "reward=remote"], "reward=remote is the client")):
        result = subprocess.run([sys.executable, "-m", "rewards.serve", *args], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, check=False)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, result.stderr


GRPO = ["algo=grpo", "model=tiny", "algo.epochs=2", "algo.sampling.prompts_per_epoch=2",
        "algo.sampling.images_per_prompt=4", "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=2",
        "algo.ppo.batch_size=8", "algo.ppo.optimizer_steps=1", "algo.optim.lr=5e-2", "algo.eval.every=2",
        "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=2"]


def metrics(run_dir):
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timing = ("seconds", "time", "per_second", "sec")
    return [{k: v for k, v in r.items() if not any(t in k for t in timing)} for r in logged]


def test_grpo_through_a_served_reward_matches_the_in_process_one(jpeg_server, tmp_path):
    """Four GRPO epochs on the tiny model with the JPEG reward in this process and served by `rewards.serve` in its
    own: every logged metric equal."""
    train_in_process(tmp_path / "local", ["reward=jpeg_compressibility"], every=2)
    train_in_process(tmp_path / "remote", ["reward=remote", f"reward.url={jpeg_server}"], every=2)
    local, remote = metrics(tmp_path / "local"), metrics(tmp_path / "remote")
    assert len(local) == len(remote) and sum("train/reward_mean" in r for r in local) == 4
    assert local == remote


@pytest.mark.slow  # the command line's exit code and bytes; RemoteReward's start-up check runs in the default suite
def test_a_run_whose_server_is_down_stops_before_loading_anything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "rl.run", *GRPO, "reward=remote", "reward.url=http://127.0.0.1:9",
                             "reward.retries=0", f"hydra.run.dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: the reward server at http://127.0.0.1:9 did not")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "run").exists()


class FailingAfter(JpegSizeReward):
    """The JPEG reward, failing (HTTP 500 from the server) from its `calls`-th scoring call on."""

    def __init__(self, calls: int):
        super().__init__()
        self.calls, self.seen = calls, 0

    def score(self, images, prompts, metadata):
        self.seen += 1
        if self.seen >= self.calls:
            raise RuntimeError("the judge ran out of memory")
        return super().score(images, prompts, metadata)


def serve_in_thread(reward, **options):
    from rewards.serve import RewardServer

    server = RewardServer(("127.0.0.1", 0), reward, {"_target_": "test"}, torch.device("cpu"), 32, **options)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def train_in_process(run_dir, overrides, every=4):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipelines.configs import build
    from rl.run import build_context

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*GRPO, "algo.epochs=4", f"algo.eval.every={every}",
                                           "algo.checkpoint.every=100", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    build(cfg.algo)(build_context(cfg, run_dir))


@pytest.mark.parametrize("every", [4, 2], ids=["while sampling", "while evaluating"])
def test_a_server_that_fails_mid_run_leaves_a_checkpoint_of_the_step_reached(tmp_path, every):
    """Scoring calls: the held-out start, then one per epoch and one per due evaluation; the 4th fails: epoch 3's
    sampling (evaluations every 4) or the evaluation after epoch 2 (every 2). The run stops with the server's error
    after writing the checkpoint of epoch 2 (no periodic one is due); resumed against a healthy server it evaluates
    epoch 2 first if that is what failed, and ends with the metrics of a run that never failed."""
    healthy, healthy_url = serve_in_thread(JpegSizeReward())
    failing, failing_url = serve_in_thread(FailingAfter(calls=4))
    try:
        train_in_process(tmp_path / "whole", ["reward=remote", f"reward.url={healthy_url}"], every)
        with pytest.raises(RemoteRewardError, match=r"did not answer after 1 try \(HTTP 500: RuntimeError: the judge"):
            train_in_process(tmp_path / "stopped", ["reward=remote", f"reward.url={failing_url}", "reward.retries=0"],
                             every)
        checkpoints = sorted((tmp_path / "stopped" / "checkpoints").glob("step_*"))
        assert [p.name for p in checkpoints] == ["step_000002"]
        assert (checkpoints[0] / "evaluation_pending").exists() == (every == 2)
        train_in_process(tmp_path / "stopped", ["reward=remote", f"reward.url={healthy_url}"], every)  # resumes at 2
    finally:
        healthy.shutdown()
        failing.shutdown()
    assert metrics(tmp_path / "stopped") == metrics(tmp_path / "whole")


@pytest.fixture(scope="module")
def strict_server():
    """The JPEG reward served in this process with a 2 s read timeout and requests of at most 1 MiB."""
    server, url = serve_in_thread(JpegSizeReward(), timeout=2.0, max_request_bytes=2**20)
    yield url
    server.shutdown()
    server.server_close()


def address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname, parts.port


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def send_raw(url: str, data: bytes) -> tuple[int, dict]:
    """The bytes sent as they are on a new connection; the status and JSON of the answer."""
    with socket.create_connection(address(url), timeout=10) as sock:
        sock.sendall(data)
        return read_answer(sock)


def request(url: str, method: str, path: str, body: bytes | dict | list | None = None) -> tuple[int, dict, dict]:
    """One request through http.client (which sets Content-Length); the status, JSON and headers of the answer."""
    connection = http.client.HTTPConnection(*address(url), timeout=10)
    try:
        data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
        connection.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.headers)
    finally:
        connection.close()


def npy(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode()


def npy_header(shape: tuple[int, ...]) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buffer.getvalue()


IMAGES = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
GOOD = {"images": npy(IMAGES), "prompts": ["a cat", "a dog"], "metadata": [{}, {"k": 1}]}
DEEP = b"[" * 100_000 + b"]" * 100_000


def test_a_client_that_stops_sending_holds_up_no_other(jpeg_server):
    """Half a body (10 of 1000 bytes), then silence: the command-line server answers another client at once (its
    read timeout is 30 s), while the first still holds its connection unanswered."""
    with socket.create_connection(address(jpeg_server), timeout=10) as stalled:
        stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n" + b'{"images":')
        started = time.monotonic()
        scores, _ = RemoteReward(jpeg_server, retries=0)(torch.rand(2, 3, 8, 8), ["a", "b"])
        assert scores.shape == (2,) and time.monotonic() - started < 10
        stalled.setblocking(False)
        with pytest.raises(BlockingIOError):  # still waiting for its body, no answer yet
            stalled.recv(1)


def test_a_client_that_stops_sending_is_cut_off_with_408(strict_server):
    stalled_in_body = socket.create_connection(address(strict_server), timeout=10)
    stalled_in_headers = socket.create_connection(address(strict_server), timeout=10)
    try:
        started = time.monotonic()
        stalled_in_body.sendall(b"POST /score HTTP/1.1\r\nContent-Length: 1000\r\n\r\n" + b'{"images":')
        stalled_in_headers.sendall(b"POST /score HTTP/1.1\r\nContent-Le")
        assert request(strict_server, "POST", "/score", GOOD)[0] == 200  # served meanwhile
        for stalled, part in ((stalled_in_body, "body"), (stalled_in_headers, "headers")):
            status, answer = read_answer(stalled)
            assert status == 408 and f"no data for 2 s while reading the {part}" in answer["error"]
        assert 1.5 < time.monotonic() - started < 10
    finally:
        stalled_in_body.close()
        stalled_in_headers.close()


def test_an_oversized_request_is_refused_before_its_body_is_read(jpeg_server, strict_server):
    # no body follows these headers: an answer proves the server did not wait for it
    status, answer = send_raw(jpeg_server, b"POST /score HTTP/1.1\r\nContent-Length: 2000000000\r\n\r\n")
    assert status == 413 and "--max-request-mb of 1024" in answer["error"]
    assert RemoteReward(jpeg_server).served["max_request_bytes"] == 1024 * 2**20
    status, answer = send_raw(strict_server, b"POST /score HTTP/1.1\r\nContent-Length: 1048577\r\n\r\n{")
    assert status == 413 and answer["error"].startswith("the request is 1.0 MiB, over this server's --max-request")
    # a client that sends the whole body anyway still reads the answer (the server drains before it closes)
    assert request(strict_server, "POST", "/score", b" " * 4 * 2**20)[0] == 413
    images, prompts = torch.rand(32, 3, 64, 64), ["x"] * 32  # 1.5 MiB of floats, 2 MiB in base64
    with pytest.raises(RemoteRewardError, match=r"refused the request \(HTTP 413\): the request is 2\.0 MiB"):
        RemoteReward(strict_server, batch_size=None, check=False, retries=3, backoff=10)(images, prompts)
    with pytest.raises(RemoteRewardError, match=r"takes requests of at most 1 MiB, this one is 2\.0 MiB: send fewer"):
        RemoteReward(strict_server, batch_size=None)(images, prompts)  # knows the bound: does not even send it
    assert RemoteReward(strict_server, batch_size=8)(images, prompts)[0].shape == (32,)


@pytest.mark.parametrize(("head", "status", "message"), [
    (b"POST /score HTTP/1.1\r\n\r\n", 411, "no Content-Length"),
    (b"POST /score HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 411, "no chunked bodies"),
    (b"POST /score HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, "invalid Content-Length 'abc'"),
    (b"POST /score HTTP/1.1\r\nContent-Length: -5\r\n\r\n", 400, "invalid Content-Length '-5'"),
    (b"POST /score HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{}", 400, "invalid Content-Length"),
    (b"POST /score HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}", 400, "the body ended after 2 of its 10 bytes"),
], ids=["no length", "chunked", "not a number", "negative", "two lengths", "short body"])
def test_a_request_without_a_valid_length_is_refused(strict_server, head, status, message):
    with socket.create_connection(address(strict_server), timeout=10) as sock:
        sock.sendall(head)
        if message.startswith("the body ended"):
            sock.shutdown(socket.SHUT_WR)  # the client gives up mid-body
        got, answer = read_answer(sock)
    assert got == status and message in answer["error"]


@pytest.mark.parametrize(("body", "message"), [
    (b"{images", "the body is not JSON"),
    (b"", "the body is not JSON"),
    (b'{"prompts": "\xff"}', "the body is not UTF-8 (invalid start byte at byte 13)"),
    (DEEP, "the JSON is nested too deeply"),
    (b'{"images": "", "prompts": ' + DEEP + b"}", "the JSON is nested too deeply"),
    ([GOOD], "the body must be a JSON object, got list"),
    ({"prompts": ["a", "b"]}, "no 'images' in the request"),
    ({"images": GOOD["images"]}, "no 'prompts' in the request"),
    ({**GOOD, "prompts": "ab"}, "'prompts' must be a list of strings"),
    ({**GOOD, "prompts": [1, 2]}, "'prompts' must be a list of strings"),
    ({**GOOD, "prompts": ["a", None]}, "'prompts' must be a list of strings"),
    ({**GOOD, "prompts": ["a", "b", "c"]}, "got 3 prompts and 2 metadata entries for 2 images"),
    ({**GOOD, "metadata": [{}]}, "got 2 prompts and 1 metadata entries for 2 images"),
    ({**GOOD, "metadata": {"k": 1}}, "'metadata' must be a list of objects, one per image, or null"),
    ({**GOOD, "metadata": [1, 2]}, "'metadata' must be a list of objects"),
    ({**GOOD, "images": [[0.5]]}, "'images' must be a base64 string of a .npy array, got list"),
    ({**GOOD, "images": "not base64!"}, "'images' is not base64"),
    ({**GOOD, "images": base64.b64encode(b"hello world").decode()}, "'images' is not a .npy array"),
    ({**GOOD, "images": npy(IMAGES.astype(np.float64))}, "images must be float32, got float64"),
    ({**GOOD, "images": npy(np.array(0.5, dtype=np.float32))}, "got a 0-d array"),
    ({**GOOD, "images": npy(IMAGES[0])}, "got shape (3, 8, 8)"),
    ({**GOOD, "images": npy(np.zeros((2, 4, 8, 8), np.float32))}, "NCHW array with 3 channels, got shape (2, 4, 8, 8)"),
    ({**GOOD, "images": npy(np.zeros((0, 3, 8, 8), np.float32)), "prompts": [], "metadata": []},
     "the batch of images is empty"),
    ({**GOOD, "images": npy(np.zeros((2, 3, 0, 8), np.float32))},
     "images must have a positive height and width, got shape (2, 3, 0, 8)"),
    ({**GOOD, "images": base64.b64encode(base64.b64decode(GOOD["images"])[:-4]).decode()},
     "needs 1536 bytes, got 1532"),
    ({**GOOD, "images": base64.b64encode(npy_header((10**6, 3, 1024, 1024)) + b"\0" * 16).decode()},
     "needs 12582912000000 bytes, got 16"),  # a header that claims 12 TB allocates nothing
    ({**GOOD, "images": npy(IMAGES * 3)}, "images must be in [0, 1]"),
    ({**GOOD, "images": npy(np.full_like(IMAGES, np.nan))}, "images contain NaN values"),
], ids=["not JSON", "empty", "not UTF-8", "nested deep", "nested deep in prompts", "not an object", "no images",
        "no prompts", "prompts a string", "numeric prompts", "null prompt", "more prompts", "less metadata",
        "metadata an object", "metadata of numbers", "images a list", "not base64", "not npy", "float64", "0-d",
        "3-d", "4 channels", "empty batch", "no pixels", "cut-off array", "header claiming 12 TB", "outside [0, 1]",
        "NaN"])
def test_every_malformed_request_gets_400_in_one_line(strict_server, body, message):
    status, answer, _ = request(strict_server, "POST", "/score", body)
    assert status == 400 and answer["error"].startswith("malformed request: ") and message in answer["error"], answer
    assert "\n" not in answer["error"]


def test_a_well_formed_request_is_scored_with_or_without_metadata(strict_server):
    local, _ = JpegSizeReward()(torch.from_numpy(IMAGES), GOOD["prompts"])
    for body in (GOOD, {**GOOD, "metadata": None}, {key: GOOD[key] for key in ("images", "prompts")}):
        status, answer, _ = request(strict_server, "POST", "/score?x=1", body)
        assert status == 200 and answer["scores"] == local.tolist() and list(answer["info"]) == ["jpeg_kb"]


def test_unknown_paths_get_404_and_wrong_methods_405(strict_server):
    for method, path in (("GET", "/"), ("GET", "/scores"), ("POST", "/info/x"), ("PUT", "/nothing")):
        status, answer, _ = request(strict_server, method, path, b"{}" if method != "GET" else None)
        assert status == 404 and answer["error"].startswith(f"no such path {path}; use GET /info or POST /score")
    for method, path, allowed in (("GET", "/score", "POST"), ("POST", "/info", "GET"), ("PUT", "/score", "POST"),
                                  ("DELETE", "/info", "GET")):
        status, answer, headers = request(strict_server, method, path, b"{}" if method != "GET" else None)
        assert status == 405 and headers["Allow"] == allowed
        assert answer["error"] == f"{path} answers {allowed} only, not {method}"
    status, answer = send_raw(strict_server, b"BREW /score HTTP/1.1\r\n\r\n")  # http.server's own refusal, as JSON
    assert status == 501 and "BREW" in answer["error"]


class Raising(JpegSizeReward):
    def score(self, images, prompts, metadata):
        raise RuntimeError("the judge ran out of memory\n(on the GPU)")


class Sleeping(JpegSizeReward):
    """The JPEG reward, 0.2 s a call, counting how many calls run at once."""

    def __init__(self):
        super().__init__()
        self.running, self.most = 0, 0

    def score(self, images, prompts, metadata):
        self.running += 1
        self.most = max(self.most, self.running)
        time.sleep(0.2)
        self.running -= 1
        return super().score(images, prompts, metadata)


def test_only_a_failure_inside_the_reward_gets_500():
    server, url = serve_in_thread(Raising())
    try:
        status, answer, _ = request(url, "POST", "/score", GOOD)
        assert status == 500 and answer["error"] == "RuntimeError: the judge ran out of memory (on the GPU)"
        assert request(url, "POST", "/score", {**GOOD, "prompts": [1, 2]})[0] == 400  # checked before the reward
    finally:
        server.shutdown()
        server.server_close()


def test_the_reward_scores_one_request_at_a_time():
    reward = Sleeping()
    server, url = serve_in_thread(reward)
    statuses = []
    try:
        clients = [threading.Thread(target=lambda: statuses.append(request(url, "POST", "/score", GOOD)[0]))
                   for _ in range(4)]
        for client in clients:
            client.start()
        for client in clients:
            client.join(timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert statuses == [200] * 4 and reward.most == 1
