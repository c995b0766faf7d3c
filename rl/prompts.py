"""Prompt sets: plain-text files (one prompt per line) and JSONL files (a `prompt` key plus metadata per line).

The sets that ship with the project live in `assets/prompts/` and are named by file name (`simple_animals.txt`); any
other file is named by its path. Configs in `conf/prompts/` pick a train slice and a held-out evaluation slice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.errors import UserError

SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts"


class PromptSetError(UserError):
    """A prompt set cannot be read; the message says which file and why."""


@dataclass(frozen=True)
class Prompt:
    """One prompt and its metadata (e.g. GenEval's objects and counts), which rewards may use."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def resolve_prompt_file(file: str) -> Path:
    """A path as given if it exists, else a shipped set of that name in `assets/prompts/`."""
    path = Path(file).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED_PROMPTS / file
    if shipped.is_file():
        return shipped
    available = ", ".join(sorted(p.name for p in SHIPPED_PROMPTS.iterdir()))
    raise PromptSetError(f"prompt file {file!r} not found (shipped sets: {available})")


def load_prompts(
    file: str, start: int = 0, stop: int | None = None, template: str = "{}", unique: bool = True
) -> list[Prompt]:
    """Read prompts `[start:stop]` of `file`, each formatted into `template` (e.g. "a photo of a {}").

    Blank lines are skipped; with `unique`, so are repeats of an earlier prompt (before slicing, so that a train slice
    and a held-out slice of one file never share a prompt). A `.jsonl` file needs a `prompt` key on every line; its other keys become metadata.
    Raises `PromptSetError` for a missing or empty file, a malformed line, or an empty slice.
    """
    path = resolve_prompt_file(file)
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    lines = [line for line in lines if line]
    prompts = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise PromptSetError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise PromptSetError(f"{path}:{number}: each line needs a string 'prompt' key")
            text = record.pop("prompt")
            prompts.append(Prompt(template.format(text), record))
    else:
        prompts = [Prompt(template.format(line)) for line in lines]
    if unique:
        seen = set()
        prompts = [p for p in prompts if not (p.text in seen or seen.add(p.text))]
    if not prompts:
        raise PromptSetError(f"prompt file {path} holds no prompts")
    selected = prompts[start:stop]
    if not selected:
        raise PromptSetError(f"prompt file {path} has {len(prompts)} prompts; the slice [{start}:{stop}] is empty")
    return selected
