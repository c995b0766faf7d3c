"""reward=ocr: known strings rendered with PIL's font on real photographs (skimage), read by the bundled PP-OCR models
(rapidocr), scored as Flow-GRPO scores them; the tesseract and PaddleOCR adapters on stand-ins of their programs;
rewards.score on a folder and rl.run end to end."""

import json
import os
import stat
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import pytest
import torch
from skimage import data

from rewards.base import RewardInputError
from rewards.ocr import OcrReward, joined_text, make_engine, to_uint8_arrays

ROOT = Path(__file__).resolve().parents[1]
# (photograph, text rendered on it)
RENDERED = [("astronaut", "Spring Sale 2024"), ("coffee", "OPEN DAILY"), ("chelsea", "Hello World")]


def render(photo: str, text: str | None, size: int = 256) -> torch.Tensor:
    """A photograph at size x size with `text` in black on a white band across it (None: the photograph alone)."""
    image = PIL.Image.fromarray(getattr(data, photo)()).convert("RGB").resize((size, size))
    if text is not None:
        draw = PIL.ImageDraw.Draw(image)
        draw.rectangle((8, size // 2 - 28, size - 8, size // 2 + 22), fill=(255, 255, 255))
        draw.text((18, size // 2 - 22), text, fill=(0, 0, 0), font=PIL.ImageFont.load_default(size=26))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def reward():
    return OcrReward(engine="rapidocr")


@pytest.fixture(scope="module")
def rendered():
    return torch.stack([render(photo, text) for photo, text in RENDERED])


def prompt(text: str) -> str:
    return f'A storefront sign with the words "{text}" painted on it'


def test_the_bundled_engine_reads_rendered_text_on_photographs(reward, rendered):
    readings = reward.read(rendered)
    assert [r.replace(" ", "").lower() for r in readings] == [t.replace(" ", "").lower() for _, t in RENDERED]


def test_the_right_text_scores_one_a_wrong_or_missing_one_less(reward, rendered):
    scores, info = reward(rendered, [prompt(t) for _, t in RENDERED])
    assert scores.tolist() == [1.0, 1.0, 1.0] and info["ocr_exact"].tolist() == [1.0, 1.0, 1.0]
    # by hand: "springsale2025" against the read "springsale2024": one substitution over 14 characters;
    # "opennightly" (11) against "opendaily": substitute d->n, a->i, i->g, insert h, t: 5, so 1 - 5/11;
    # "summer" (6) is not in "helloworld" and at least 6 edits away: capped at 6, so 0
    wrong = [prompt("Spring Sale 2025"), prompt("Open Nightly"), prompt("Summer")]
    scores, info = reward(rendered, wrong)
    assert scores.tolist() == pytest.approx([1 - 1 / 14, 1 - 5 / 11, 0.0]) and info["ocr_exact"].sum() == 0
    # a part of what was read costs nothing (Flow-GRPO's containment rule)
    assert reward(rendered[:1], [prompt("sale")])[0].item() == 1.0
    # the photographs without text: little or nothing is read
    bare = torch.stack([render(photo, None) for photo, _ in RENDERED])
    scores, _ = reward(bare, [prompt(t) for _, t in RENDERED])
    assert (scores < 0.5).all(), (scores, reward.read(bare))


def test_prompts_without_quoted_text_are_refused_in_one_line(reward, rendered):
    with pytest.raises(RewardInputError, match="prompts=ocr"):
        reward.check_prompts(["a photo of a cat"])
    with pytest.raises(RewardInputError, match="double quotes"):
        reward(rendered[:1], ["a sign that says hello"])


def test_joined_text_keeps_confident_lines_in_order():
    lines = [("Spring", 0.9), ("noise", 0.0), ("Sale", 0.4)]
    assert joined_text(lines) == "SpringSale" and joined_text(lines, min_confidence=0.5) == "Spring"


def test_images_reach_the_engine_as_8_bit_rgb():
    image = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    (array,) = to_uint8_arrays(image)
    assert array.dtype == np.uint8 and array.shape == (2, 2, 3) and array[0, 0].tolist() == [0, 128, 255]


def test_tesseract_engine_runs_the_program_per_image(tmp_path, monkeypatch):
    """A stand-in `tesseract` on PATH records its arguments and prints two lines: the engine passes the image file
    and sparse-text mode, and the reward joins the lines."""
    log = tmp_path / "calls.txt"
    program = tmp_path / "tesseract"
    program.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nprintf 'Spring\\n\\n  Sale 2024 \\n'\n")
    program.chmod(program.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    reward = OcrReward(engine="tesseract")
    scores, _ = reward(torch.rand(2, 3, 16, 16), [prompt("Spring Sale 2024"), prompt("Winter")])
    assert scores.tolist() == [1.0, 0.0]
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all(c.endswith(".png stdout --psm 11") for c in calls)


def test_paddleocr_engine_reads_paddles_result_layout(monkeypatch):
    """A stand-in `paddleocr` module: constructed as Flow-GRPO does, its `ocr(image, cls=False)` result layout
    (a list per image of [box, (text, confidence)]) read in order; an image with nothing read gives None there."""
    made = {}

    class PaddleOCR:
        def __init__(self, **options):
            made.update(options)

        def ocr(self, image, cls):
            assert cls is False and image.dtype == np.uint8
            lines = [[[[0, 0], [9, 0], [9, 8], [0, 8]], ("Hello", 0.9)],
                     [[[0, 9], [9, 9], [9, 16], [0, 16]], ("World", 0.8)]]
            return [lines] if image.mean() > 100 else [None]

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=PaddleOCR))
    reward = OcrReward(engine="paddleocr")
    assert made == {"use_angle_cls": False, "lang": "en", "show_log": False, "use_gpu": False}
    scores, _ = reward(torch.stack([torch.ones(3, 8, 8), torch.zeros(3, 8, 8)]), [prompt("hello world")] * 2)
    assert scores.tolist() == [1.0, 0.0]


def test_engines_that_cannot_run_fail_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no tesseract here
    with pytest.raises(RewardInputError, match="apt install tesseract-ocr"):
        make_engine("tesseract")
    with pytest.raises(RewardInputError, match="unknown reward.engine='easyocr'"):
        make_engine("easyocr")
    monkeypatch.setitem(sys.modules, "paddleocr", None)  # not installed
    with pytest.raises(RewardInputError, match="pip install paddlepaddle 'paddleocr<3'"):
        make_engine("paddleocr")
    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=lambda **options: None))
    with pytest.raises(RewardInputError, match="lacks the PaddleOCR model folder"):
        make_engine("paddleocr", model_dir=str(tmp_path))

    def paddleocr_3(**options):  # 3.x refuses 2.x's options
        raise ValueError("Unknown argument: show_log")

    monkeypatch.setitem(sys.modules, "paddleocr", types.SimpleNamespace(PaddleOCR=paddleocr_3))
    with pytest.raises(RewardInputError, match=r"Unknown argument: show_log\); install PaddleOCR 2.x"):
        make_engine("paddleocr")


def test_score_cli_on_a_folder_of_images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for (photo, text), name in zip(RENDERED[:2], ("a.png", "b.png"), strict=True):
        image = (render(photo, text).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        PIL.Image.fromarray(image).save(folder / name)
    (tmp_path / "prompts.txt").write_text(f"{prompt(RENDERED[0][1])}\n{prompt('Closed')}\n")
    result = subprocess.run([sys.executable, "-m", "rewards.score", "reward=ocr", f"images={folder}",
                             f"prompts_file={tmp_path / 'prompts.txt'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    # "closed" (6) against "opendaily": c->o ... by the capped distance: not contained, so 1 - min(lev, 6) / 6
    from rewards.ocr_rule import levenshtein
    assert [r["score"] for r in lines] == pytest.approx([1.0, 1 - min(levenshtein("opendaily", "closed"), 6) / 6])
    assert [r["ocr_exact"] for r in lines] == [1.0, 0.0]


def test_grpo_trains_on_the_ocr_reward_end_to_end(tmp_path):
    """`python -m rl.run algo=grpo reward=ocr model=tiny prompts=ocr`: two epochs, the held-out evaluation, metrics."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "rl.run", "algo=grpo", "reward=ocr", "model=tiny", "prompts=ocr", "algo.epochs=2",
         "algo.sampling.prompts_per_epoch=2", "algo.sampling.images_per_prompt=2", "algo.sampling.batch_size=4",
         "algo.sampling.num_inference_steps=2", "algo.ppo.batch_size=4", "algo.ppo.optimizer_steps=1",
         "algo.eval.every=2", "algo.eval.max_prompts=2", "algo.eval.num_inference_steps=2", f"hydra.run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in logged if "train/reward_mean" in r]
    assert len(train) == 2 and all(0.0 <= r["train/reward_mean"] <= 1.0 for r in train)
    assert any("eval/ocr_exact_mean" in r for r in logged)
