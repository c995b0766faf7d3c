"""GenEval (Ghosh et al. 2023) as a reward and as an evaluation, without mmdet: transformers' Mask2Former instance
segmentation on COCO finds the objects, open_clip ViT-L/14 names their colours, and GenEval's rules
(`rewards/geneval_rules.py`) judge each image against its prompt's metadata (`prompts=geneval`: a `tag` and
`include` / `exclude` clauses per prompt).

- Detector (`reward.detector`): a Mask2Former COCO instance-segmentation checkpoint, a hub id or a local folder saved
  with `save_pretrained` (GenEval runs mmdet's Mask2Former Swin-S, COCO; its transformers port is
  `facebook/mask2former-swin-small-coco-instance`), `reward.batch_size` images per forward. Its labels are read
  under GenEval's names (COCO's keyboard, mouse and remote are GenEval's computer keyboard, computer mouse and tv
  remote; the colour templates use GenEval's names). Each kept instance is `(box, score)`, the box being the bounding
  box of its mask (as mmdet derives Mask2Former's boxes) and the score the class probability times the mask's
  confidence (transformers' `post_process_instance_segmentation`, as mmdet's).
- Colours: each object's pixels (its mask) composited on GenEval's grey #999999, cropped to its box and classified
  zero-shot over GenEval's ten colours with the templates "a photo of a {c} {object}", "a photo of a {c}-colored
  {object}" and "a photo of a {c} object" (each colour's normalised text embeddings averaged, then normalised).
- Scores (`reward.score`): `partial` (default, Flow-GRPO's training reward: the mean of per-clause credits, see
  `geneval_partial_score`), `correct` (GenEval's own 0/1 rule, its published metric) or `strict` (Flow-GRPO's exact
  counts, 0/1). `info` carries all three (`correct`, `strict_correct`, `partial`) and, per task, `correct_<tag>`
  (1 or 0 for the images of that task, NaN for the others), from which per-task accuracy is the mean over the non-NaN
  entries (`experiments.evaluate ... protocol=geneval` reports it as GenEval does, with the overall score the mean of
  the six task accuracies).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from pipelines.hub import ModelLoadError, check_hub_file, looks_like_hub_id
from rewards.base import Reward, RewardInputError
from rewards.clip_model import ClipModel
from rewards.geneval_rules import COLORS, Detection, geneval_correct, kept_detections, relative_position

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# GenEval's names of three COCO classes that COCO checkpoints label otherwise (its object_names.txt vs COCO's list)
COCO_NAMES = {"computer keyboard": "keyboard", "computer mouse": "mouse", "tv remote": "remote"}
COLOR_TEMPLATES = ("a photo of a {c} {name}", "a photo of a {c}-colored {name}", "a photo of a {c} object")
GREY = (153, 153, 153)  # GenEval's #999 background behind a colour crop
SCORES = ("partial", "correct", "strict")


def geneval_partial_score(detected: Mapping[str, Sequence[Detection]], metadata: Mapping,
                          colors_of: Callable[[str, Sequence[Detection]], list[str]]) -> tuple[bool, float]:
    """Flow-GRPO's GenEval reward (its reward server's `evaluate_reward`): `(strict_correct, score)`.

    Per `include` clause: a count credit `1 - |count - found| / count` over *all* kept objects of the class; when
    the count is not exact, a 0 more if the clause has a colour or a position. With the exact count: a colour
    credit `1 - |count - objects of that colour| / count`; a position check against the earlier group adds 0 and
    then 1 when it fails (the reference appends both) and 1 when it holds. The score is the mean of the credits (0
    for none); `strict_correct` needs exact counts, colours and positions. `exclude` clauses play no part (as in the
    reference)."""
    correct, credits, groups = True, [], []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = list(detected.get(name, []))
        matched = True
        credits.append(1 - abs(count - len(found)) / count)
        if len(found) != count:
            correct = matched = False
            if "color" in clause or "position" in clause:
                credits.append(0.0)
        else:
            if "color" in clause:
                right = colors_of(name, found).count(clause["color"])
                credits.append(1 - abs(count - right) / count)
                if right != count:
                    correct = matched = False
            if "position" in clause and matched:
                relation, group = clause["position"]
                if groups[group] is None:
                    correct = matched = False
                    credits.append(0.0)
                else:
                    if any(relation not in relative_position(obj[0], target[0])
                           for obj in found for target in groups[group]):
                        correct = matched = False
                        credits.append(0.0)
                    credits.append(1.0)
        groups.append(found if matched else None)
    return correct, (sum(credits) / len(credits) if credits else 0.0)


def box_of_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """`(x1, y1, x2, y2)` of a binary mask's pixels (x2, y2 one past the last), None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def colour_crop(image: PIL.Image.Image, box: Sequence[float], mask: np.ndarray | None) -> PIL.Image.Image:
    """The object's pixels on GenEval's grey, cropped to its box (the whole crop when there is no mask)."""
    if mask is not None:
        grey = PIL.Image.new("RGB", image.size, GREY)
        image = PIL.Image.composite(image, grey, PIL.Image.fromarray(mask.astype(np.uint8) * 255))
    return image.crop(tuple(box[:4]))


def to_pil(image: torch.Tensor) -> PIL.Image.Image:
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array)


def check_weights(source: str, option: str, needed: str = "config.json") -> None:
    """A local folder, or a hub id whose files can be had; otherwise one line saying where to put them."""
    if Path(source).expanduser().is_dir():
        if not (Path(source).expanduser() / needed).is_file():
            raise ModelLoadError(f"{option}={source} has no {needed}: save the model there with save_pretrained "
                                 f"(or `hf download <id> --local-dir {source}`)")
        return
    if not looks_like_hub_id(source):
        raise ModelLoadError(f"{option}={source}: no such folder (and not a hub id of the form 'org/name')")
    check_hub_file(source, needed, f"set {option}=DIR")


class GenEvalReward(Reward):
    """GenEval's judgement of each image against its prompt's metadata; not differentiable."""

    differentiable = False

    def __init__(self, detector: str = "facebook/mask2former-swin-small-coco-instance",
                 clip: ClipModel | None = None, score: str = "partial", detector_dtype: str = "float32",
                 batch_size: int = 8):
        super().__init__()
        if score not in SCORES:
            raise RewardInputError(f"reward.score must be one of {', '.join(SCORES)}, got {score!r}")
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        check_weights(detector, "reward.detector")
        check_weights(detector, "reward.detector", "preprocessor_config.json")
        self.score_name = score
        self.detector = Mask2FormerForUniversalSegmentation.from_pretrained(
            detector, torch_dtype=getattr(torch, detector_dtype))
        self.processor = Mask2FormerImageProcessor.from_pretrained(detector)
        # the detector's labels under GenEval's names (COCO's "keyboard" is GenEval's "computer keyboard")
        geneval_name = {coco: name for name, coco in COCO_NAMES.items()}
        self.labels = {int(k): geneval_name.get(v, v) for k, v in self.detector.config.id2label.items()}
        self.batch_size = batch_size
        self.clip = clip if clip is not None else ClipModel("open_clip", "ViT-L-14", pretrained="openai")
        self.colour_classifiers: dict[str, torch.Tensor] = {}
        self.freeze()

    def check_metadata(self, prompts: list[str], metadata: list[dict]) -> None:
        """Each prompt carries GenEval's metadata (a task tag and include clauses) naming classes the detector
        knows; one line otherwise (called on the prompt sets before the model loads, and at scoring)."""
        known = set(self.labels.values())
        for prompt, meta in zip(prompts, metadata, strict=True):
            if "tag" not in meta or "include" not in meta:
                raise RewardInputError(f"reward=geneval needs GenEval metadata (tag, include) with each prompt, and "
                                       f"{prompt[:60]!r} has none; use prompts=geneval")
            unknown = [c["class"] for c in [*meta["include"], *meta.get("exclude", [])] if c["class"] not in known]
            if unknown:
                raise RewardInputError(f"GenEval metadata names {unknown[0]!r}, which the detector does not know "
                                       f"(its classes: {', '.join(sorted(known)[:5])}, ...)")

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[dict[str, list[tuple[tuple, float, np.ndarray]]]]:
        """Per image, per class name: `(box, score, mask)` of each instance above GenEval's lower threshold, in the
        detector's order (the order GenEval breaks ties between equal scores by: `kept_detections`)."""
        arrays = [np.asarray(to_pil(image)) for image in images]
        inputs = self.processor(images=arrays, return_tensors="pt")
        outputs = self.detector(pixel_values=inputs["pixel_values"].to(self.device, self.detector.dtype),
                                pixel_mask=inputs["pixel_mask"].to(self.device))
        sizes = [array.shape[:2] for array in arrays]
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=0.3, target_sizes=sizes, return_binary_maps=True)
        found = []
        for result in results:
            per_class: dict[str, list] = {}
            masks = result["segmentation"]
            for index, info in enumerate(result["segments_info"]):
                mask = (masks[index] > 0).cpu().numpy() if masks is not None else None
                box = box_of_mask(mask) if mask is not None else None
                if box is not None:
                    per_class.setdefault(self.labels[info["label_id"]], []).append((box, float(info["score"]), mask))
            found.append(per_class)
        return found

    def colour_classifier(self, name: str) -> torch.Tensor:
        """[10, D]: each colour's text embedding over GenEval's three templates (normalised, averaged, normalised)."""
        if name not in self.colour_classifiers:
            rows = []
            for colour in COLORS:
                texts = [t.format(c=colour, name=name) for t in COLOR_TEMPLATES]
                embeds = torch.nn.functional.normalize(self.clip.embed_texts(texts).float(), dim=-1)
                rows.append(torch.nn.functional.normalize(embeds.mean(0), dim=-1))
            self.colour_classifiers[name] = torch.stack(rows)
        return self.colour_classifiers[name]

    @torch.no_grad()
    def colours(self, image: PIL.Image.Image, name: str, objects: Sequence) -> list[str]:
        crops = [colour_crop(image, box, mask) for box, _, mask in objects]
        pixels = [torch.from_numpy(np.asarray(c).copy()).permute(2, 0, 1).float()[None] / 255 for c in crops]
        embeds = torch.cat([self.clip.embed_images(p.to(self.device)).float() for p in pixels])
        similarity = torch.nn.functional.normalize(embeds, dim=-1) @ self.colour_classifier(name).to(embeds.device).T
        return [COLORS[i] for i in similarity.argmax(dim=-1).tolist()]

    def judge(self, image: PIL.Image.Image, found: Mapping[str, list], metadata: Mapping) -> dict[str, Any]:
        """GenEval's correct, Flow-GRPO's strict_correct and partial score for one image."""
        self.check_metadata([metadata.get("prompt", "")], [metadata])
        kept = kept_detections({k: [(box, s) for box, s, _ in v] for k, v in found.items()}, metadata["tag"])
        masks = {name: {id(box): mask for box, _, mask in found[name]} for name in kept}

        def colors_of(name: str, objects: Sequence[Detection]) -> list[str]:
            return self.colours(image, name, [(box, s, masks[name].get(id(box))) for box, s in objects])

        correct, _ = geneval_correct(kept, metadata, colors_of)
        strict, partial = geneval_partial_score(kept, metadata, colors_of)
        return {"correct": float(correct), "strict_correct": float(strict), "partial": partial}

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        self.check_metadata(prompts, metadata)
        found = [f for start in range(0, len(images), self.batch_size)  # the detector's memory grows with the batch
                 for f in self.detect(images[start:start + self.batch_size])]
        judged = [self.judge(to_pil(image), objects, meta)
                  for image, objects, meta in zip(images, found, metadata, strict=True)]
        info: dict[str, Any] = {key: torch.tensor([j[key] for j in judged]) for key in ("correct", "strict_correct",
                                                                                        "partial")}
        for task in TASKS:
            info[f"correct_{task}"] = torch.tensor([j["correct"] if m["tag"] == task else math.nan
                                                    for j, m in zip(judged, metadata, strict=True)])
        key = {"partial": "partial", "correct": "correct", "strict": "strict_correct"}[self.score_name]
        return info[key].clone(), info
