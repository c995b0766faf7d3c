"""metrics.jsonl always; tensorboard and wandb (offline) through accelerate when configured."""

import json

import pytest
import torch

from pipelines import load_pipeline
from rl import sample
from rl.context import RunContext
from rl.prompts import Prompt
from rl.tracking import JsonlTracker, LoggerConfig, image_grid


def context(run_dir, backends, **logger_kwargs):
    return RunContext(
        run_dir=run_dir,
        seed=0,
        load_pipeline=lambda device: load_pipeline(device=device),
        train_prompts=[Prompt("a cat")],
        eval_prompts=[Prompt("a dog"), Prompt("a cow")],
        logger=LoggerConfig(backends=backends, **logger_kwargs),
        config={"algo": {"name": "sample", "steps": 2}, "seed": 0},
    )


def test_jsonl_tracker_writes_one_object_per_call(tmp_path):
    tracker = JsonlTracker(tmp_path / "metrics.jsonl")
    tracker.log({"loss": torch.tensor(0.5), "n": 3, "nan": float("nan")}, step=1)
    tracker.log({"loss": 0.25}, step=2)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert records == [{"step": 1, "loss": 0.5, "n": 3, "nan": None}, {"step": 2, "loss": 0.25}]


def test_tensorboard_backend_writes_event_files(tmp_path):
    sample.run(context(tmp_path, ["tensorboard"]), num_inference_steps=2, num_images_per_prompt=1)
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.jsonl").exists()


def test_wandb_backend_works_offline(tmp_path):
    sample.run(context(tmp_path, ["wandb"], mode="offline"), num_inference_steps=2, num_images_per_prompt=1)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown logger backends"):
        LoggerConfig(backends=["mlflow"])


def test_image_grid_layout():
    images = torch.zeros(6, 3, 8, 8)
    images[1] = 1.0
    grid = image_grid(images, nrow=3)
    assert grid.size == (3 * 10 + 2, 2 * 10 + 2)
    assert grid.getpixel((2 + 10 + 4, 2 + 4)) == (255, 255, 255)  # the second image, white
    assert grid.getpixel((2 + 4, 2 + 4)) == (0, 0, 0)
