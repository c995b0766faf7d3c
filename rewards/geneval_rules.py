"""GenEval's rules (its `evaluation/evaluate_images.py`), as pure functions on detections: which detections count,
where one object is relative to another, and whether an image satisfies a prompt's metadata. The detector
(Mask2Former) and the colour classifier (CLIP ViT-L/14 zero-shot over GenEval's ten colours) that feed them are
separate (issue 19); here a detection is `(box, score)` with `box = (x1, y1, x2, y2)` in pixels, and colours come from
a function.

The rules, as GenEval applies them:
- Detections of a class are kept above a confidence of 0.3 (0.9 for the `counting` tag), most confident first (equal
  confidences in reverse detection order, as GenEval's reversed argsort leaves them), at most 16 per class (GenEval's
  `max_overlap` of 1.0 suppresses none).
- An `include` clause `{class, count[, color][, position: [relation, group]]}` holds when at least `count` objects of
  the class were kept; its colour check asks that at least `count` of the `count` most confident be classified as
  the colour; its position check asks that each of them stand in `relation` ("left of", "right of", "above",
  "below") to every object the earlier clause `group` matched. An `exclude` clause `{class, count}` fails when
  `count` or more were kept. The image is correct when every clause holds.
- "A relative to B": the offset between the boxes' centres, each coordinate shrunk towards 0 by 0.1 x (the sum of the
  two boxes' sizes along it); no relation when both shrink to 0; otherwise, per unit of the full offset's length, x
  below -0.5 is "left of", above 0.5 "right of", y below -0.5 "above", above 0.5 "below" (image y grows downwards).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD, COUNTING_THRESHOLD, MAX_OBJECTS, POSITION_THRESHOLD = 0.3, 0.9, 16, 0.1

Detection = tuple[Sequence[float], float]  # (x1, y1, x2, y2), confidence


def kept_detections(detections: Mapping[str, Sequence[Detection]], tag: str, threshold: float = THRESHOLD,
                    counting_threshold: float = COUNTING_THRESHOLD, max_objects: int = MAX_OBJECTS
                    ) -> dict[str, list[Detection]]:
    """Per class, the detections GenEval keeps: above the tag's confidence threshold, most confident first (equal
    confidences in reverse detection order), at most `max_objects`; classes with none are left out."""
    floor = counting_threshold if tag == "counting" else threshold
    kept = {}
    for name, found in detections.items():
        scores = np.array([score for _, score in found], dtype=float)
        # GenEval's evaluation/evaluate_images.py:232-234: `np.argsort(scores)[::-1]`, then the threshold, then the cap;
        # reversed, equal scores come last detected first. "stable" because GenEval's numpy 1.23 (environment.yml)
        # argsorts up to 16 scores by insertion, which keeps ties in index order, while numpy >= 1.25's default
        # (a SIMD quicksort on AVX-512 CPUs) leaves them in an order that depends on the machine.
        ordering = np.argsort(scores, kind="stable")[::-1]
        ordering = ordering[scores[ordering] > floor][:max_objects]
        if len(ordering):
            kept[name] = [found[i] for i in ordering]
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float],
                      threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where A is relative to B (a set of "left of", "right of", "above", "below"; empty when they overlap too much
    to say)."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=float).reshape(2, 2, 2)  # [object][corner][x, y]
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def geneval_correct(detected: Mapping[str, Sequence[Detection]], metadata: Mapping,
                    colors_of: Callable[[str, Sequence[Detection]], list[str]]) -> tuple[bool, list[str]]:
    """Whether an image with `detected` (as `kept_detections` returns) satisfies GenEval `metadata` (`include` and
    `exclude` clauses), and the reasons it does not. `colors_of(class, objects)` names each object's colour."""
    correct, reasons = True, []
    matched_groups: list[Sequence[Detection] | None] = []
    for clause in metadata.get("include", []):
        name, count = clause["class"], clause["count"]
        found = list(detected.get(name, []))[:count]
        matched = True
        if len(found) < count:
            matched = False
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in clause:
                colors = colors_of(name, found)
                if colors.count(clause["color"]) < count:
                    matched = False
                    reasons.append(f"expected {clause['color']} {name}>={count}, found "
                                   f"{colors.count(clause['color'])} {clause['color']}")
            if "position" in clause and matched:
                relation, group = clause["position"]
                targets = matched_groups[group]
                if targets is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        wrong = [relative_position(obj[0], t[0]) for t in targets
                                 if relation not in relative_position(obj[0], t[0])]
                        if wrong:
                            matched = False
                            reasons.append(f"expected {name} {relation} target, found {' and '.join(sorted(wrong[0]))}"
                                           f" target")
                            break
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for clause in metadata.get("exclude", []):
        name, count = clause["class"], clause["count"]
        if len(detected.get(name, [])) >= count:
            correct = False
            reasons.append(f"expected {name}<{count}, found {len(detected[name])}")
    return correct, reasons
