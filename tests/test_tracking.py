"""metrics.jsonl always; tensorboard and wandb (offline) through accelerate when configured."""

import json

import numpy as np
import pytest
import torch

from pipelines import load_pipeline
from rl import sample
from rl.context import RunContext
from rl.prompts import Prompt
from rl.tracking import JsonlTracker, LoggerConfig, image_grid, metric_name, plot_eval_curves, step_unit


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
    assert records == [{"step": 1, "loss": 0.5, "n": 3, "nan": None, "nonfinite": ["nan"]}, {"step": 2, "loss": 0.25}]


def test_tensorboard_backend_writes_event_files(tmp_path):
    sample.Sample(num_inference_steps=2, num_images_per_prompt=1)(context(tmp_path, ["tensorboard"]))
    assert list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert (tmp_path / "metrics.jsonl").exists()


def test_wandb_backend_works_offline(tmp_path):
    sample.Sample(num_inference_steps=2, num_images_per_prompt=1)(context(tmp_path, ["wandb"], mode="offline"))
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


def test_image_grid_captions_each_row_with_its_prompt():
    images = torch.zeros(6, 3, 16, 16)  # 3 prompts x 2 images, enlarged 4x to 64 px cells
    labels = ["a photo of the number seven", "a cat", "a very long prompt that must wrap over several lines " * 3]
    grid = np.asarray(image_grid(images, nrow=2, row_labels=labels))
    assert grid.shape == (3 * 66 + 2, 220 + 2 * 66 + 2, 3)
    strip = grid[:, :220]
    for row in range(3):
        inked = (strip[2 + row * 66 : (row + 1) * 66] < 128).any(axis=(1, 2)).sum()
        assert inked > 5, row  # text in every row's strip
    assert (grid[:, 220:] == 0).any() and (strip[:, :2] == 255).all()  # images on the right, a white margin left
    with pytest.raises(ValueError, match="2 row labels for 3 rows of 2 images"):
        image_grid(images, nrow=2, row_labels=labels[:2])


def test_curves_use_the_readmes_words(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    assert metric_name("correct") == "accuracy" and metric_name("reward") == "reward"
    epochs = [{"step": 0, "eval/reward_mean": 0.4, "eval/correct_mean": 0.5}, {"step": 1, "train/epoch": 0},
              {"step": 1, "eval/reward_mean": 0.6, "eval/correct_mean": 0.7}]
    assert step_unit(epochs) == "epoch" and step_unit([{"step": 3, "train/loss": 1.0}]) == "step"
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in epochs) + "\n")
    figures = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (figures.append(figure), close(figure)))
    assert plot_eval_curves(tmp_path) == tmp_path / "curves.png"
    axes = figures[0].axes
    assert [a.get_title() for a in axes] == ["held-out accuracy", "held-out reward"]
    assert {a.get_xlabel() for a in axes} == {"epoch"}
