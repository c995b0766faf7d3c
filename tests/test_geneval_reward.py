"""reward=geneval: Flow-GRPO's partial score by hand, the colour crops, the model-loading path on a tiny random
Mask2Former (built in code from the real classes, saved and loaded with save_pretrained / from_pretrained), the
per-task values, and the one-line errors for weights that cannot be had."""

import json
import math
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from pipelines.errors import UserError
from pipelines.hub import ModelLoadError
from rewards.base import RewardInputError
from rewards.clip_model import ClipModel
from rewards.geneval import GREY, TASKS, GenEvalReward, box_of_mask, colour_crop, geneval_partial_score
from rewards.geneval_rules import COLORS, geneval_correct
from rl.tracking import info_means

ROOT = Path(__file__).resolve().parents[1]
METADATA = [json.loads(line) for line in (ROOT / "assets/prompts/geneval_test_metadata.jsonl").read_text().splitlines()]
CLASSES = sorted({c["class"] for m in METADATA for c in [*m.get("include", []), *m.get("exclude", [])]})
# COCO's 80 instance classes as COCO checkpoints label them (mmdet's and the hub's Mask2Former order)
COCO = ["person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
        "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
        "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis",
        "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
        "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
        "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
        "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
        "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
        "hair drier", "toothbrush"]


def save_tiny_mask2former(folder: Path) -> Path:
    """A random Mask2Former (Swin backbone, COCO's 80 labels) with its image processor, as a hub folder."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    backbone = SwinConfig(image_size=64, embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, hidden_dim=32, feature_size=32, mask_feature_size=32,
                               num_queries=6, encoder_layers=1, decoder_layers=2, dim_feedforward=32,
                               num_attention_heads=2, encoder_feedforward_dim=32, num_labels=len(COCO),
                               id2label=dict(enumerate(COCO)), label2id={c: i for i, c in enumerate(COCO)})
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():  # random weights are unsure of everything: make some queries confident dogs (scores > 0.3)
        model.class_predictor.weight.mul_(20)
        for name, bias in (("cat", 6.0), ("dog", 6.0), ("person", 5.0)):
            model.class_predictor.bias[COCO.index(name)] = bias
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 64}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_detector(tmp_path_factory):
    return save_tiny_mask2former(tmp_path_factory.mktemp("mask2former"))


@pytest.fixture(scope="module")
def reward(tiny_detector):
    return GenEvalReward(detector=str(tiny_detector), clip=ClipModel("open_clip", "tiny-ViT-768", pretrained=None))


def box(x1, y1, x2, y2, score=0.95):
    return ((x1, y1, x2, y2), score)


def colours(mapping):
    """colors_of for the rules: each class's objects get the listed colours, in order."""
    return lambda name, objects: mapping[name][:len(objects)]


# ------------------------------------------------------------------------------------------- the partial score


def test_partial_score_counts_by_hand():
    meta = {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}]}
    two = {"cat": [box(0, 0, 5, 5), box(10, 0, 15, 5)]}
    three = {"cat": [box(0, 0, 5, 5), box(10, 0, 15, 5), box(20, 0, 25, 5)]}
    assert geneval_partial_score(two, meta, colours({})) == (True, 1.0)
    assert geneval_partial_score(three, meta, colours({})) == (False, 0.5)  # 1 - |2 - 3| / 2; exclude plays no part
    assert geneval_partial_score({}, meta, colours({})) == (False, 0.0)  # 1 - 2 / 2
    assert geneval_partial_score({}, {"tag": "x", "include": []}, colours({})) == (True, 0.0)  # no credit at all


def test_partial_score_colours_and_positions_by_hand():
    meta = {"tag": "color_attr", "include": [{"class": "cat", "count": 1, "color": "red"},
                                             {"class": "dog", "count": 2, "color": "blue"}]}
    found = {"cat": [box(0, 0, 5, 5)], "dog": [box(10, 0, 15, 5), box(20, 0, 25, 5)]}
    # credits: cat count 1, cat red 1, dog count 1, dog blue 1 - |2 - 1| / 2 = 0.5: mean 3.5 / 4
    assert geneval_partial_score(found, meta, colours({"cat": ["red"], "dog": ["blue", "green"]})) == (False, 0.875)
    # no dog, a colour asked: credits cat 1, red 1, dog count 1 - 2 / 2 = 0 and a 0 (the colour is not looked at)
    assert geneval_partial_score({"cat": found["cat"]}, meta, colours({"cat": ["red"]})) == (False, 0.5)
    position = {"tag": "position", "include": [{"class": "cat", "count": 1},
                                               {"class": "dog", "count": 1, "position": ["left of", 0]}]}
    left = {"cat": [box(50, 0, 60, 10)], "dog": [box(0, 0, 10, 10)]}
    right = {"cat": [box(0, 0, 10, 10)], "dog": [box(50, 0, 60, 10)]}
    assert geneval_partial_score(left, position, colours({})) == (True, 1.0)  # credits 1, 1, 1
    # a failed position adds 0 and then 1, as the reference's loop does: credits 1, 1, 0, 1
    assert geneval_partial_score(right, position, colours({})) == (False, 0.75)
    # GenEval's own rule agrees on which is correct
    assert geneval_correct(left, position, colours({}))[0] and not geneval_correct(right, position, colours({}))[0]


# ------------------------------------------------------------------------------------------------- colour crops


def test_box_of_a_mask_and_the_grey_colour_crop():
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    assert box_of_mask(mask) == (3.0, 2.0, 7.0, 5.0) and box_of_mask(np.zeros((4, 4), bool)) is None
    image = PIL.Image.new("RGB", (10, 8), (200, 10, 10))
    mask[2, 3] = False  # one pixel of the box outside the object: it turns grey
    crop = np.asarray(colour_crop(image, box_of_mask(mask), mask))
    assert crop.shape == (3, 4, 3) and tuple(crop[0, 0]) == GREY and tuple(crop[1, 1]) == (200, 10, 10)


# ------------------------------------------------------------------------------------- the model path, end to end


def test_tiny_detector_scores_geneval_prompts(reward):
    """Images of GenEval prompts, one of each task: the three scores and the per-task values, and the score equals
    the rules applied to what the detector returned."""
    torch.manual_seed(1)
    metas = [next(m for m in METADATA if m["tag"] == task) for task in TASKS]
    images = torch.rand(len(metas), 3, 48, 48)
    scores, info = reward(images, [m["prompt"] for m in metas], metas)
    assert scores.shape == (6,) and torch.equal(scores, info["partial"])
    assert set(info) == {"correct", "strict_correct", "partial", *(f"correct_{t}" for t in TASKS)}
    for i, task in enumerate(TASKS):  # each task's value on its own image only
        column = info[f"correct_{task}"]
        assert column[i] == info["correct"][i] and all(math.isnan(v) for j, v in enumerate(column.tolist()) if j != i)
    found = reward.detect(images)
    assert any(found), "the random detector found nothing above 0.3: the test would not exercise the rules"
    pictures = [PIL.Image.fromarray((i.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in images]
    for picture, detections, meta, partial in zip(pictures, found, metas, info["partial"].tolist(), strict=True):
        assert reward.judge(picture, detections, meta)["partial"] == pytest.approx(partial)
    # the colour path: "a red dog" is correct exactly when the most confident dog's crop is classified red
    index = next(i for i, f in enumerate(found) if "dog" in f)
    red_dog = {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}], "prompt": "a red dog"}
    most_confident = sorted(found[index]["dog"], key=lambda d: -d[1])[:1]
    named = reward.colours(pictures[index], "dog", most_confident)
    assert named[0] in COLORS
    assert reward.judge(pictures[index], found[index], red_dog)["correct"] == float(named[0] == "red")


def test_geneval_names_cover_the_metadata_through_cocos_labels(reward):
    """Every class the shipped metadata names is a label of a COCO detector, three of them under GenEval's names."""
    assert set(CLASSES) <= set(reward.labels.values())
    assert {"computer keyboard", "computer mouse", "tv remote"} <= set(CLASSES)
    assert "keyboard" not in reward.labels.values()


def test_detections_are_mask_boxes_with_scores_above_the_lower_threshold(reward):
    torch.manual_seed(2)
    found = reward.detect(torch.rand(2, 3, 40, 56))
    assert any(found), "nothing detected: the test would check nothing"
    for per_class in found:
        for name, objects in per_class.items():
            assert name in CLASSES
            for (x1, y1, x2, y2), score, mask in objects:
                assert score > 0.3 and mask.shape == (40, 56)
                assert (x1, y1, x2, y2) == box_of_mask(mask)


def test_score_choice_and_bad_metadata(reward, tiny_detector):
    meta = next(m for m in METADATA if m["tag"] == "counting")
    with pytest.raises(RewardInputError, match="use prompts=geneval"):
        reward(torch.rand(1, 3, 32, 32), ["a photo of a cat"], [{}])
    with pytest.raises(RewardInputError, match="use prompts=geneval"):  # before any model loads, on the prompt sets
        reward.check_metadata(["a photo of a cat"], [{}])
    reward.check_metadata([m["prompt"] for m in METADATA], METADATA)  # the shipped set passes
    with pytest.raises(RewardInputError, match="'unicorn', which the detector does not know"):
        reward.judge(PIL.Image.new("RGB", (8, 8)), {}, {**meta, "include": [{"class": "unicorn", "count": 1}]})
    with pytest.raises(RewardInputError, match="reward.score must be one of"):
        GenEvalReward(detector=str(tiny_detector), score="accuracy")
    strict = GenEvalReward(detector=str(tiny_detector), clip=reward.clip, score="correct")
    images = torch.rand(2, 3, 32, 32)
    scores, info = strict(images, [meta["prompt"]] * 2, [meta] * 2)
    assert torch.equal(scores, info["correct"])


def test_weights_that_cannot_be_had_fail_in_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="set reward.detector=DIR") as error:
        GenEvalReward(detector="facebook/mask2former-swin-small-coco-instance")
    assert "\n" not in str(error.value)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        GenEvalReward(detector=str(tmp_path))
    with pytest.raises(ModelLoadError, match="no such folder"):
        GenEvalReward(detector=str(tmp_path / "missing" / "x" / "y"))


def test_per_task_means_leave_out_the_images_a_value_does_not_apply_to():
    info = {"correct": torch.tensor([1.0, 0.0, 1.0]), "correct_counting": torch.tensor([1.0, math.nan, math.nan]),
            "correct_position": torch.tensor([math.nan] * 3), "text": ["not", "a", "tensor"]}
    assert info_means(info, "eval/", std=True) == {"eval/correct_mean": pytest.approx(2 / 3),
                                                   "eval/correct_std": pytest.approx(0.57735, abs=1e-5),
                                                   "eval/correct_counting_mean": 1.0, "eval/correct_counting_std": 0.0}


def test_score_reads_jsonl_prompts_with_their_metadata(reward, tmp_path):
    from rewards.score import read_prompts, score_images

    metas = [next(m for m in METADATA if m["tag"] == tag) for tag in ("counting", "position")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    prompts, metadata = read_prompts(2, None, str(tmp_path / "prompts.jsonl"))
    assert prompts == [m["prompt"] for m in metas] and metadata[0]["tag"] == "counting" and "prompt" not in metadata[0]
    torch.manual_seed(3)
    records = score_images(reward, list(torch.rand(2, 3, 32, 32)), prompts, 8, torch.device("cpu"), metadata)
    assert math.isnan(records[0]["correct_position"]) and records[0]["correct_counting"] == records[0]["correct"]
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt key"}\n')
    with pytest.raises(UserError, match="line 1 is not a JSON object with a 'prompt'"):
        read_prompts(1, None, str(tmp_path / "bad.jsonl"))


@pytest.mark.slow  # the same through the command line (exit codes, output lines)
def test_score_cli_reads_prompts_with_their_metadata(tiny_detector, tmp_path):
    """`python -m rewards.score reward=geneval prompts_file=X.jsonl`: each image judged against its line's metadata."""
    import subprocess
    import sys

    folder = tmp_path / "images"
    folder.mkdir()
    torch.manual_seed(3)
    for name in ("a.png", "b.png"):
        PIL.Image.fromarray((torch.rand(32, 32, 3).numpy() * 255).astype(np.uint8)).save(folder / name)
    metas = [next(m for m in METADATA if m["tag"] == tag) for tag in ("counting", "position")]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metas))
    result = subprocess.run([sys.executable, "-m", "rewards.score", "reward=geneval",
                             f"reward.detector={tiny_detector}", "reward.clip.model=tiny-ViT-768",
                             "reward.clip.pretrained=null", f"images={folder}",
                             f"prompts_file={tmp_path / 'prompts.jsonl'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in lines] == [m["prompt"] for m in metas]
    assert math.isnan(lines[0]["correct_position"]) and lines[0]["correct_counting"] == lines[0]["correct"]
    assert math.isnan(lines[1]["correct_counting"]) and lines[1]["correct_position"] == lines[1]["correct"]
    (tmp_path / "plain.txt").write_text("a photo of a cat\na photo of a dog\n")  # no metadata: one line, before scoring
    result = subprocess.run([sys.executable, "-m", "rewards.score", "reward=geneval",
                             f"reward.detector={tiny_detector}", "reward.clip.model=tiny-ViT-768",
                             "reward.clip.pretrained=null", f"images={folder}",
                             f"prompts_file={tmp_path / 'plain.txt'}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]  # (weights' progress aside)
    assert result.returncode == 2 and len(errors) == 1 and errors[0].endswith("use prompts=geneval")
