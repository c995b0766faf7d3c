"""Diffusion-DPO (offline, online) and ReFL / DRaFT-K end to end on the tiny model; preference data; ReFL's gradient
paths; resume."""

import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines import load_pipeline
from pipelines.errors import ConfigError
from rewards import Reward
from rewards.jpeg import JpegSizeReward
from rl import dpo, refl
from rl.checkpoints import CheckpointConfig
from rl.context import RunContext
from rl.data import DataError
from rl.evaluation import EvalConfig
from rl.lora import LoraSpec
from rl.optim import OptimConfig
from rl.preferences import PreferenceData
from rl.prompts import load_prompts
from rl.refl import ReFLConfig, ReFLTrainConfig, reward_loss
from rl.session import prepare_models
from rl.tracking import LoggerConfig
from scripts.make_preference_pairs import make_pairs

ROOT = Path(__file__).resolve().parents[1]
TINY_AESTHETIC = ["reward=aesthetic", "reward.clip.model=tiny-ViT-768", "reward.clip.pretrained=null"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return make_pairs(tmp_path_factory.mktemp("pairs"), pairs=48, resolution=32)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def run_cli(run_dir, *overrides):
    result = subprocess.run(
        [sys.executable, "-m", "rl.run", "model=tiny", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    return result


# ------------------------------------------------------------------------------------------------ preference data


def test_preference_pairs_drop_ties_and_put_the_winner_first(pairs):
    import pyarrow.parquet as pq

    table = pq.read_table(pairs / "train-00000.parquet").to_pydict()
    non_ties = [i for i, label in enumerate(table["label_0"]) if label != 0.5]
    train, held_out = PreferenceData(path=str(pairs), resolution=32, eval_pairs=8).load()
    assert len(train) + len(held_out) == len(non_ties) < 48  # the generator writes some ties
    for position, index in enumerate(non_ties[:5]):
        winner_bytes = table["jpg_0"][index] if table["label_0"][index] == 1 else table["jpg_1"][index]
        assert train.pairs[position][1]["bytes"] == winner_bytes
        item = train[(position, 0, 0)]
        assert item["winner"].shape == item["loser"].shape == (3, 32, 32)
        assert item["caption"] == table["caption"][index]


def test_preference_folder_of_file_names_and_bad_input(tmp_path):
    import PIL.Image

    folder = tmp_path / "pairs"
    folder.mkdir()
    rows = []
    for i in range(6):
        for side in (0, 1):
            PIL.Image.new("RGB", (40, 40), (i * 40, side * 200, 0)).save(folder / f"{i}_{side}.png")
        rows.append({"caption": f"pair {i}", "jpg_0": f"{i}_0.png", "jpg_1": f"{i}_1.png", "label_0": i % 2})
    (folder / "5_1.png").write_bytes(b"not an image")  # a corrupt image: its pair is skipped with a warning
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    train, held_out = PreferenceData(path=str(folder), resolution=32, eval_pairs=1).load()
    assert len(train) == 4 and len(held_out) == 1
    first = train[(0, 0, 0)]  # label_0 = 0: jpg_1 (green) wins
    assert first["winner"][1].mean() > first["loser"][1].mean()
    second = train[(1, 0, 0)]  # label_0 = 1: jpg_0 wins
    assert second["winner"][1].mean() < second["loser"][1].mean()

    with pytest.raises(DataError, match="no such folder"):
        PreferenceData(path=str(tmp_path / "missing")).load()
    with pytest.raises(DataError, match="not more than data.eval_pairs=64"):
        PreferenceData(path=str(folder), resolution=32).load()
    with pytest.raises(DataError, match="no column"):
        PreferenceData(path=str(folder), label_column="label").load()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="holds no pairs"):
        PreferenceData(path=str(empty)).load()


# ---------------------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("lora", ["lora", pytest.param("full", marks=pytest.mark.slow)])  # full: the slow suite
def test_offline_dpo_end_to_end(tmp_path, pairs, lora):
    result = run_cli(
        tmp_path, "algo=dpo", "data=preferences", f"data.path={pairs}", "data.resolution=32", "data.eval_pairs=8",
        "algo.train.max_steps=2", "algo.train.batch_size=4", "algo.train.gradient_accumulation_steps=1",
        "algo.train.eval_every=2", "algo.optim.lr=1e-3", *(["algo.lora=null"] if lora == "full" else []),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(tmp_path)
    keys = set().union(*logged)
    assert {"train/loss", "train/implicit_acc", "train/reward_margin", "train/model_diff", "train/ref_diff",
            "eval/implicit_acc", "eval/loss"} <= keys
    evals = [r for r in logged if "eval/implicit_acc" in r]
    assert [r["step"] for r in evals] == [0, 2]
    assert evals[0]["eval/implicit_acc"] == 0.5 and evals[0]["eval/reward_margin"] == 0  # the model is the reference
    first_train = next(r for r in logged if "train/loss" in r)
    assert first_train["train/loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2 before any update
    final = tmp_path / "final"
    expected = "pytorch_lora_weights.safetensors" if lora == "lora" else "model_index.json"
    assert (final / expected).exists()


def test_online_dpo_end_to_end(tmp_path):
    result = run_cli(
        tmp_path, "algo=dpo_online", "reward=jpeg_compressibility", "algo.epochs=2",
        "algo.sampling.prompts_per_epoch=2",
        "algo.sampling.images_per_prompt=4", "algo.sampling.batch_size=8", "algo.sampling.num_inference_steps=4",
        "algo.train.batch_size=2", "algo.train.optimizer_steps=1", "algo.eval.every=1", "algo.eval.max_prompts=2",
        "algo.eval.num_inference_steps=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(tmp_path)
    keys = set().union(*logged)
    assert {"train/reward_mean", "train/loss", "train/implicit_acc", "train/reward_gap", "eval/reward_mean"} <= keys
    assert [r["step"] for r in logged if "eval/reward_mean" in r] == [0, 1, 2]
    assert all(r["train/reward_gap"] > 0 for r in logged if "train/reward_gap" in r)  # best minus worst
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()


def test_a_batch_of_tied_pairs_reports_the_same_diagnostics_as_any_other(tiny_pipe):
    """Online DPO masks tied groups out; a micro-batch of tied pairs only must still report every diagnostic (as NaN,
    left out of the means), or processes would reduce different names and wait for each other forever."""
    from contextlib import nullcontext

    from diffusers import FlowMatchEulerDiscreteScheduler

    from rl.supervised import LossConfig

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    winner, loser = torch.randn(2, 2, 16, 16, 16, generator=generator)
    batch = dpo.noised_pair(winner, loser, scheduler, LossConfig(weighting_scheme="none"), generator)
    embeds, pooled = torch.randn(2, 8, 64), torch.randn(2, 64)
    some = dpo.dpo_step(tiny_pipe.transformer, nullcontext, batch, embeds, pooled, loss=LossConfig(), beta=100.0,
                        keep=torch.tensor([True, False]))
    tied = dpo.dpo_step(tiny_pipe.transformer, nullcontext, batch, embeds, pooled, loss=LossConfig(), beta=100.0,
                        keep=torch.tensor([False, False]))
    assert set(tied[1]) == set(some[1]) and len(some[1]) >= 3
    assert all(torch.isnan(value) for value in tied[1].values()) and tied[0].item() == 0.0


def test_online_dpo_needs_whole_groups_per_process(tmp_path):
    from rl.dpo import OnlineTrainConfig
    from rl.rollouts import SamplingConfig

    ctx = context(tmp_path, JpegSizeReward())
    with pytest.raises(ConfigError, match="at least 2"):
        dpo.OnlineDPO(sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=1, batch_size=2))(ctx)
    with pytest.raises(ConfigError, match="not a multiple of train.batch_size=4"):
        dpo.OnlineDPO(
            sampling=SamplingConfig(prompts_per_epoch=2, images_per_prompt=4, batch_size=8),
            train=OnlineTrainConfig(batch_size=4),
        )(ctx)


@pytest.mark.parametrize("method", ["refl", "draft"])
def test_refl_end_to_end(tmp_path, method):
    result = run_cli(
        tmp_path, "algo=refl", *TINY_AESTHETIC, f"algo.refl.method={method}", "algo.refl.num_inference_steps=6",
        "algo.refl.stop_range=[3,5]", "algo.refl.k=2", "algo.refl.loss=negative", "algo.train.max_steps=2",
        "algo.eval.every=2", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=4",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = records(tmp_path)
    assert {"train/reward_mean", "train/loss", "train/grad_norm", "eval/reward_mean"} <= set().union(*logged)
    assert [r["train/gradient_steps"] for r in logged if "train/gradient_steps" in r] == \
        ([1.0, 1.0] if method == "refl" else [2.0, 2.0])
    assert (tmp_path / "final" / "pytorch_lora_weights.safetensors").exists()
    assert (tmp_path / "samples" / "step_000002.png").exists()


def test_refl_stops_at_start_up_for_a_non_differentiable_reward(tmp_path):
    result = run_cli(tmp_path, "algo=refl", "reward=jpeg_compressibility")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: algo=refl back-propagates through the reward")
    assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------- ReFL's gradient paths


class Brightness(Reward):
    """A differentiable test reward with a frozen parameter of its own: `w * mean(image)`."""

    differentiable = True

    def __init__(self, constant: bool = False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))
        self.constant = constant
        self.freeze()

    def score(self, images, prompts, metadata):
        value = images.mean(dim=(1, 2, 3)) * self.w
        return (value * 0 + 1 if self.constant else value), {}


@pytest.mark.parametrize("method", ["refl", "draft"])
def test_refl_gradients_reach_only_the_adapter_and_only_through_the_reward(method):
    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prepare_models(pipe, LoraSpec(rank=4, init="gaussian"), False, torch.float32, seed=0)
    with torch.no_grad():  # make the adapter non-zero so that every LoRA matrix has a gradient
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    prompts = load_prompts("simple_animals.txt", stop=2)
    config = ReFLConfig(method=method, num_inference_steps=5, stop_range=(2, 3), k=2, loss="relu", target=10.0,
                        scale=1.0)
    trainable = [p for p in pipe.transformer.parameters() if p.requires_grad]
    frozen_modules = [pipe.vae, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]

    reward = Brightness()
    loss, stats, images = reward_loss(pipe, pipe.transformer, reward, prompts, config, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in trainable) and any(p.grad.abs().sum() > 0 for p in trainable)
    for module in [*frozen_modules, reward]:
        assert all(p.grad is None for p in module.parameters())
    base = [p for n, p in pipe.transformer.named_parameters() if "lora_" not in n]
    assert base and all(p.grad is None and not p.requires_grad for p in base)

    for p in trainable:
        p.grad = None
    constant = Brightness(constant=True)  # the images still feed the reward, but its score does not depend on them
    loss, _, _ = reward_loss(pipe, pipe.transformer, constant, prompts, config, torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in trainable)


def test_refl_and_draft_see_the_stock_ode_trajectory(tiny_pipe):
    """With no gradient steps taken into account, DRaFT's final sample is the stock pipeline's ODE sample."""
    prompts = load_prompts("simple_animals.txt", stop=2)
    config = ReFLConfig(method="draft", num_inference_steps=4, stop_range=(1, 2), k=1, guidance_scale=4.5)
    generator = torch.Generator().manual_seed(5)
    _, _, images = reward_loss(tiny_pipe, tiny_pipe.transformer, Brightness(), prompts, config, generator)
    latents = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    stock = tiny_pipe([p.text for p in prompts], num_inference_steps=4, guidance_scale=4.5, latents=latents,
                      output_type="pt").images
    torch.testing.assert_close(images, stock, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------------- resume


def context(run_dir, reward=None, data=None):
    return RunContext(
        run_dir=run_dir, seed=0, load_pipeline=partial(load_pipeline, None),
        train_prompts=load_prompts("simple_animals.txt", stop=6),
        eval_prompts=load_prompts("simple_animals.txt", start=36, stop=38),
        logger=LoggerConfig(), config={}, reward=reward, data=data,
    )


def test_refl_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path):
    kwargs = dict(
        refl=ReFLConfig(method="draft", num_inference_steps=4, k=2, stop_range=(1, 3), loss="negative"),
        lora=LoraSpec(rank=4), optim=OptimConfig(lr=1e-2),
        eval=EvalConfig(every=2, max_prompts=2, num_inference_steps=4),
    )
    train = ReFLTrainConfig(max_steps=4)
    refl.ReFL(train=train, checkpoint=CheckpointConfig(every=2), **kwargs)(context(tmp_path / "whole", Brightness()))
    refl.ReFL(
        train=train,
        checkpoint=CheckpointConfig(every=2, exit_after=2),
        **kwargs,
    )(context(tmp_path / "split", Brightness()))
    refl.ReFL(train=train, checkpoint=CheckpointConfig(every=2), **kwargs)(context(tmp_path / "split", Brightness()))
    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    assert [r["step"] for r in whole] == [r["step"] for r in split]
    for a, b in zip(whole, split, strict=True):
        for key in ("train/reward_mean", "train/loss", "eval/reward_mean"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)
    a = load_file(tmp_path / "whole" / "final" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "split" / "final" / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_offline_dpo_resume_after_a_stop_matches_an_uninterrupted_run(tmp_path, pairs):
    from rl.dpo import DPOTrainConfig

    data = PreferenceData(path=str(pairs), resolution=32, eval_pairs=4)
    kwargs = dict(beta=500.0, lora=LoraSpec(rank=4), optim=OptimConfig(lr=1e-3))
    train = DPOTrainConfig(max_steps=4, batch_size=2, eval_every=2)
    every_2, stop_after_3 = CheckpointConfig(every=2), CheckpointConfig(every=2, exit_after=3)
    dpo.OfflineDPO(train=train, checkpoint=every_2, **kwargs)(context(tmp_path / "whole", data=data))
    dpo.OfflineDPO(train=train, checkpoint=stop_after_3, **kwargs)(context(tmp_path / "split", data=data))
    assert not (tmp_path / "split" / "final").exists()
    dpo.OfflineDPO(train=train, checkpoint=every_2, **kwargs)(context(tmp_path / "split", data=data))
    whole, split = records(tmp_path / "whole"), records(tmp_path / "split")
    assert [r["step"] for r in whole] == [r["step"] for r in split]
    for a, b in zip(whole, split, strict=True):
        for key in ("train/loss", "eval/implicit_acc", "eval/loss"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def test_refl_regulariser_adds_the_supervised_loss_on_image_caption_data(tmp_path):
    from rl.data import ImageCaptionData, digits_imagefolder

    folder = digits_imagefolder(tmp_path / "digits", resolution=32, limit=8)
    data = ImageCaptionData(path=str(folder), resolution=32)
    refl.ReFL(
        refl=ReFLConfig(method="refl", num_inference_steps=4, stop_range=(2, 3), loss="negative"),
        train=ReFLTrainConfig(max_steps=2, pretrain_weight=0.5, pretrain_batch_size=2),
        checkpoint=CheckpointConfig(every=2),
        lora=LoraSpec(rank=4),
        eval=EvalConfig(every=0),
    )(context(tmp_path / "run", Brightness(), data=data))
    logged = [r for r in records(tmp_path / "run") if "train/loss" in r]
    assert len(logged) == 2
    for r in logged:
        assert r["train/pretrain_loss"] > 0
        assert r["train/loss"] == pytest.approx(r["train/reward_loss"] + 0.5 * r["train/pretrain_loss"], rel=1e-5)
    with pytest.raises(DataError, match="needs image-caption data"):
        refl.ReFL(train=ReFLTrainConfig(pretrain_weight=0.5))(context(tmp_path / "bad", Brightness()))
