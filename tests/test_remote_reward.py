"""Rewards served from their own process: `python -m rewards.serve` on 127.0.0.1 with the JPEG and digits rewards
gives the in-process scores exactly, GRPO trains through `reward=remote` to the same metrics, and a server that is
gone or refuses gives one line."""

import json
import re
import subprocess
import sys
from pathlib import Path

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
    for got, want in zip(remote(images, prompts), JpegSizeReward()(images, prompts)):
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
                                text=True, timeout=120)
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
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
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


def serve_in_thread(reward):
    import threading
    from http.server import HTTPServer

    from rewards.serve import make_handler

    server = HTTPServer(("127.0.0.1", 0), make_handler(reward, {"_target_": "test"}, torch.device("cpu"), 32))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def train_in_process(run_dir, overrides, every=4):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipelines.errors import build
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
