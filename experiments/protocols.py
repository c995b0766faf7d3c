"""Evaluation protocols: `conf/protocol/<name>.yaml` cards that pin everything a published number depends on (the
prompt set, images per prompt, steps, guidance, resolution, negative prompt, seed, the rewards and how they are
reported), so that `python -m experiments.evaluate RUN_DIR protocol=<name>` gives numbers comparable with the papers'
and with each other, and numbers of different protocols are never compared (`experiments.compare` refuses).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from pipelines.errors import UserError
from pipelines.text import NEGATIVE_PROMPT

PROTOCOL_DIR = Path(__file__).resolve().parents[1] / "conf" / "protocol"
GENEVAL_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
REPORTS = ("mean", "geneval")
# evaluate's options a protocol pins (the option, the card's field)
PINNED = {"--images-per-prompt": "images_per_prompt", "--steps": "num_inference_steps",
          "--guidance-scale": "guidance_scale", "--resolution": "resolution", "--seed": "seed",
          "--max-prompts": "prompts", "--strength": "prompts"}


@dataclass(frozen=True)
class ProtocolPrompts:
    file: str | None  # None: the user passes the set with --prompts-file (not shipped here)
    start: int = 0
    stop: int | None = None
    unique: bool = True


@dataclass(frozen=True)
class Protocol:
    name: str
    prompts: ProtocolPrompts
    images_per_prompt: int
    num_inference_steps: int
    guidance_scale: float
    resolution: int
    negative_prompt: str
    seed: int
    rewards: list[list[str]] = field(default_factory=list)  # reward=<name> and its overrides, one list per reward
    report: str = "mean"

    def as_record(self) -> dict:
        return asdict(self)


def available() -> list[str]:
    return sorted(p.stem for p in PROTOCOL_DIR.glob("*.yaml"))


def load_protocol(name: str) -> Protocol:
    """The card `conf/protocol/<name>.yaml`, checked; one line for an unknown name or a card this code cannot honour."""
    path = PROTOCOL_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"unknown protocol {name!r}; choose from {', '.join(available())}")
    card = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    try:
        protocol = Protocol(**{**card, "prompts": ProtocolPrompts(**card["prompts"]),
                               "rewards": [list(group) for group in card.get("rewards", [])]})
    except (TypeError, KeyError) as error:
        raise UserError(f"conf/protocol/{name}.yaml is not a protocol card ({error})") from None
    if protocol.name != name:
        raise UserError(f"conf/protocol/{name}.yaml names itself {protocol.name!r}")
    if protocol.negative_prompt != NEGATIVE_PROMPT:
        raise UserError(f"protocol {name} pins the negative prompt {protocol.negative_prompt!r}; this code samples "
                        f"with {NEGATIVE_PROMPT!r} only")
    if protocol.report not in REPORTS or not protocol.rewards:
        raise UserError(f"protocol {name}: report must be one of {', '.join(REPORTS)} and rewards non-empty")
    if any(not group or not str(group[0]).startswith("reward=") for group in protocol.rewards):
        raise UserError(f"protocol {name}: each rewards entry starts with reward=<name>")
    return protocol


def split_protocol(overrides: list[str]) -> tuple[str | None, list[str]]:
    """`protocol=<name>` taken out of evaluate's overrides (at most one)."""
    chosen = [o for o in overrides if o.startswith("protocol=")]
    if len(chosen) > 1:
        raise UserError("give one protocol=<name>; evaluate under each protocol separately")
    return (chosen[0].removeprefix("protocol=") if chosen else None), [o for o in overrides if o not in chosen]


def pinned_options(protocol: Protocol, given: dict[str, object]) -> None:
    """One line for an evaluate option that would change what the protocol pins."""
    for option, value in given.items():
        if value is not None and option in PINNED:
            pinned = getattr(protocol, PINNED[option])
            raise UserError(f"{option} changes what protocol={protocol.name} pins ({PINNED[option]}: "
                            f"{pinned if not isinstance(pinned, ProtocolPrompts) else 'its prompt set'}); drop it, "
                            f"or evaluate without a protocol")


def report(protocol: Protocol, row: dict) -> dict[str, float]:
    """The protocol's summary numbers of a table row: for GenEval each task's accuracy (`geneval/<task>`) and the
    overall score, the mean of the six (`geneval/overall`), as GenEval reports them."""
    if protocol.report != "geneval":
        return {}
    tasks = {task: row.get(f"eval/correct_{task}_mean") for task in GENEVAL_TASKS}
    summary = {f"geneval/{task}": value for task, value in tasks.items() if value is not None}
    if len(summary) == len(GENEVAL_TASKS):
        summary["geneval/overall"] = statistics.mean(summary.values())
    return summary
