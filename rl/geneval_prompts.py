"""GenEval-style training prompts that share nothing with GenEval's test prompts.

GenEval's test prompts (`assets/prompts/geneval_test_metadata.jsonl`, 553 distinct) come from its generator
(djghosh13/geneval `prompts/create_prompts.py`); the functions here build prompts and metadata by the same rules, one
per task, so that the GenEval reward reads a training row exactly as it reads a test row:

- the 80 COCO classes under GenEval's names, and its ten colours (no colour is ever given to "person");
- the article "an" before a word whose first letter is a vowel ("an orange", "an umbrella"), "a" otherwise;
- the plural is the name plus "es" when it ends in "s", plus "s" otherwise ("buses", "wine glasses", and also GenEval's
  own "sheeps", "scissorses", "computer mouses");
- `two_object` "a photo of a A and a B"; `counting` "a photo of {two|three|four} As", including n and excluding n+1
  objects; `colors` "a photo of a {colour} A"; `position` "a photo of a A {relation} a B", whose metadata lists B first
  and then A with `position: [relation, 0]` (A stands in that relation to the objects of clause 0); `color_attr`
  "a photo of a c1 A and a c2 B" with two distinct classes and two distinct colours.

The training set (`scripts/make_geneval_train_prompts.py` writes it to `assets/prompts/geneval_train_metadata.jsonl`)
mixes five tasks in the proportions the references use when they merge tasks (flow_grpo
`dataset/merge_genevaltask.py`: position 7, counting 5, color_attr 3, colors 1, two_object 1, out of 17). Each task's
rows are drawn from all the prompts its rules allow, without repeating one, after removing every test prompt and its
swapped-order twin (the same scene described the other way round: "A and B" / "B and A", "c1 A and c2 B" / "c2 B and c1
A", "A left of B" / "B right of A", "A above B" / "B below A"). `counting` allows only 240 prompts, 160 after the test's
80 are removed, fewer than its share: its prompts are repeated as evenly as possible (each 15 or 16 times at the
default size). `single_object` has no training rows: its template allows 80 prompts and all 80 are test prompts.

The draws and the final shuffle use seed 2026. The default size, 8,500 rows, is 500 per unit of weight. It keeps the
file near 1.4 MB, and every task but counting fits its pool without repeats (colors needs 500 of its 696 allowed
prompts). The training loop draws prompts at random, so a larger file would add variety in position and color_attr
only.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from typing import Any

from rewards.geneval_rules import COLORS

# GenEval's 80 object names (its object_names.txt: COCO's classes, with "computer keyboard", "computer mouse" and
# "tv remote" for COCO's keyboard, mouse and remote), in COCO's order
CLASS_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)
COLORABLE_NAMES = tuple(name for name in CLASS_NAMES if name != "person")  # GenEval never asks for a coloured person
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}  # GenEval's counting prompts ask for 2 to 4 objects
COUNTS = tuple(NUMBER_WORDS)
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# The references' task weights when they merge tasks into one training file (flow_grpo dataset/merge_genevaltask.py)
TASK_WEIGHTS = {"position": 7, "color_attr": 3, "colors": 1, "counting": 5, "two_object": 1}
DEFAULT_SIZE = 8500  # 500 rows per unit of weight
DEFAULT_SEED = 2026

Row = dict[str, Any]


def with_article(phrase: str) -> str:
    """GenEval's article: "an" when the first letter is a vowel, "a" otherwise."""
    return f"an {phrase}" if phrase[0] in "aeiou" else f"a {phrase}"


def plural(name: str) -> str:
    """GenEval's plural: the name plus "es" when it ends in "s", plus "s" otherwise ("buses", "sheeps")."""
    return f"{name}es" if name.endswith("s") else f"{name}s"


def single_object(name: str) -> Row:
    """"a photo of a A" (every such prompt is a GenEval test prompt; kept for checking the test file)."""
    return {"tag": "single_object", "include": [{"class": name, "count": 1}],
            "prompt": f"a photo of {with_article(name)}"}


def two_object(first: str, second: str) -> Row:
    """"a photo of a A and a B": one of each."""
    return {"tag": "two_object", "include": [{"class": first, "count": 1}, {"class": second, "count": 1}],
            "prompt": f"a photo of {with_article(first)} and {with_article(second)}"}


def counting(name: str, count: int) -> Row:
    """"a photo of three As": exactly `count` (at least `count`, and fewer than `count + 1`)."""
    return {"tag": "counting", "include": [{"class": name, "count": count}],
            "exclude": [{"class": name, "count": count + 1}],
            "prompt": f"a photo of {NUMBER_WORDS[count]} {plural(name)}"}


def colors(name: str, color: str) -> Row:
    """"a photo of a red A"."""
    return {"tag": "colors", "include": [{"class": name, "count": 1, "color": color}],
            "prompt": f"a photo of {with_article(color)} {name}"}


def position(name: str, relation: str, reference: str) -> Row:
    """"a photo of a A left of a B": the reference object B is clause 0, A stands in `relation` to it."""
    return {"tag": "position",
            "include": [{"class": reference, "count": 1},
                        {"class": name, "count": 1, "position": [relation, 0]}],
            "prompt": f"a photo of {with_article(name)} {relation} {with_article(reference)}"}


def color_attr(first: str, first_color: str, second: str, second_color: str) -> Row:
    """"a photo of a red A and a blue B": each object in its own colour."""
    return {"tag": "color_attr",
            "include": [{"class": first, "count": 1, "color": first_color},
                        {"class": second, "count": 1, "color": second_color}],
            "prompt": f"a photo of {with_article(first_color)} {first} and {with_article(second_color)} {second}"}


def rebuild(row: Mapping[str, Any]) -> Row:
    """The row the task's builder makes from `row`'s classes, counts, colours and relation (equal to `row` when its
    text and metadata follow GenEval's rules)."""
    tag, include = row["tag"], row["include"]
    if tag == "single_object":
        return single_object(include[0]["class"])
    if tag == "two_object":
        return two_object(include[0]["class"], include[1]["class"])
    if tag == "counting":
        return counting(include[0]["class"], include[0]["count"])
    if tag == "colors":
        return colors(include[0]["class"], include[0]["color"])
    if tag == "position":
        return position(include[1]["class"], include[1]["position"][0], include[0]["class"])
    if tag == "color_attr":
        return color_attr(include[0]["class"], include[0]["color"], include[1]["class"], include[1]["color"])
    raise ValueError(f"not a GenEval task: {tag!r}")


def swapped_twin(row: Mapping[str, Any]) -> Row | None:
    """The same scene described the other way round ("B and A", "B right of A"), None for one-object tasks."""
    tag, include = row["tag"], row["include"]
    if tag == "two_object":
        return two_object(include[1]["class"], include[0]["class"])
    if tag == "position":
        return position(include[0]["class"], OPPOSITE_RELATION[include[1]["position"][0]], include[1]["class"])
    if tag == "color_attr":
        return color_attr(include[1]["class"], include[1]["color"], include[0]["class"], include[0]["color"])
    return None


def excluded_prompts(test_rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """The prompts a training set must not hold: every test prompt and its swapped-order twin."""
    excluded = set()
    for row in test_rows:
        excluded.add(row["prompt"])
        twin = swapped_twin(row)
        if twin is not None:
            excluded.add(twin["prompt"])
    return excluded


def ordered_pair(index: int, names: Sequence[str]) -> tuple[str, str]:
    """The `index`-th of the len(names) * (len(names) - 1) ordered pairs of two different names."""
    first, rest = divmod(index, len(names) - 1)
    return names[first], names[rest + (rest >= first)]  # skip the first name among the second's choices


# Each task's pool: how many distinct prompts its rules allow, and the one at a given index (no pool is held in memory:
# color_attr allows 554,580 prompts)
def two_object_at(index: int) -> Row:
    return two_object(*ordered_pair(index, CLASS_NAMES))


def counting_at(index: int) -> Row:
    name, count = divmod(index, len(COUNTS))
    return counting(CLASS_NAMES[name], COUNTS[count])


def colors_at(index: int) -> Row:
    name, color = divmod(index, len(COLORS))
    return colors(COLORABLE_NAMES[name], COLORS[color])


def position_at(index: int) -> Row:
    pair, relation = divmod(index, len(RELATIONS))
    name, reference = ordered_pair(pair, CLASS_NAMES)
    return position(name, RELATIONS[relation], reference)


def color_attr_at(index: int) -> Row:
    pair, color_pair = divmod(index, len(COLORS) * (len(COLORS) - 1))
    (first, second), (first_color, second_color) = ordered_pair(pair, COLORABLE_NAMES), ordered_pair(color_pair, COLORS)
    return color_attr(first, first_color, second, second_color)


def pairs(count: int) -> int:
    return count * (count - 1)


POOLS = {  # task: (number of distinct prompts, the prompt at an index)
    "two_object": (pairs(len(CLASS_NAMES)), two_object_at),
    "counting": (len(CLASS_NAMES) * len(COUNTS), counting_at),
    "colors": (len(COLORABLE_NAMES) * len(COLORS), colors_at),
    "position": (pairs(len(CLASS_NAMES)) * len(RELATIONS), position_at),
    "color_attr": (pairs(len(COLORABLE_NAMES)) * pairs(len(COLORS)), color_attr_at),
}


def task_sizes(size: int, weights: Mapping[str, int] = TASK_WEIGHTS) -> dict[str, int]:
    """`size` rows shared in proportion to `weights` (largest remainders get the rows left over)."""
    total = sum(weights.values())
    shares = {task: Fraction(size * weight, total) for task, weight in weights.items()}
    sizes = {task: int(share) for task, share in shares.items()}
    by_remainder = sorted(shares, key=lambda task: shares[task] - sizes[task], reverse=True)
    for task in by_remainder[: size - sum(sizes.values())]:
        sizes[task] += 1
    return sizes


def draw_task(task: str, count: int, excluded: set[str], rng: random.Random) -> list[Row]:
    """`count` rows of `task` not in `excluded`, none repeated while the pool allows; when it holds fewer allowed
    prompts than `count`, every allowed prompt is used as evenly as possible (whole passes, then part of one)."""
    pool_size, row_at = POOLS[task]
    # enough draws that `count` survive the filter (an excluded prompt's index is at most drawn once)
    indices = rng.sample(range(pool_size), min(pool_size, count + len(excluded)))
    allowed = [row for row in map(row_at, indices) if row["prompt"] not in excluded]
    if len(allowed) >= count:
        return allowed[:count]
    passes, rest = divmod(count, len(allowed))
    return allowed * passes + allowed[:rest]


def training_rows(test_rows: Sequence[Mapping[str, Any]], size: int = DEFAULT_SIZE,
                  seed: int = DEFAULT_SEED) -> list[Row]:
    """The training set: `size` rows in the references' task proportions, none of them a test prompt or its twin,
    shuffled."""
    rng = random.Random(seed)
    excluded = excluded_prompts(test_rows)
    rows = [row for task, count in task_sizes(size).items() for row in draw_task(task, count, excluded, rng)]
    rng.shuffle(rows)
    return rows


def read_jsonl(text: str) -> list[Row]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """One JSON object per line, keys in the test file's order (tag, include, exclude, prompt)."""
    return "".join(json.dumps(row) + "\n" for row in rows)
