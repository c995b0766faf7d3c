"""Prompt sets: plain-text files (one prompt per line) and JSONL files (a `prompt` key plus metadata per line; an
`image` key makes it an image-to-image prompt: the source image's path, relative to the file's folder).

The sets that ship with the project live in `assets/prompts/` and are named by file name (`simple_animals.txt`); any
other file is named by its path. Configs in `conf/prompts/` pick a train slice and a held-out evaluation slice.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.errors import UserError

if TYPE_CHECKING:
    import PIL.Image

SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "prompts"


class PromptSetError(UserError):
    """A prompt set cannot be read; the message says which file and why."""


@dataclass(frozen=True)
class Prompt:
    """One prompt and its metadata (e.g. GenEval's objects and counts), which rewards may use."""

    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> str | None:
        """The source image of an image-to-image prompt (a path), None for text-to-image."""
        return self.metadata.get("image")


def check_source_image(prompt_file: Path, line: int, image: Any) -> Path:
    """The path of a prompt's source image (relative paths are relative to the prompt file's folder), checked to be a
    readable image; `PromptSetError` (one line) otherwise."""
    if not isinstance(image, str) or not image:
        raise PromptSetError(f"{prompt_file}:{line}: 'image' must be a path, got {image!r}")
    path = Path(image).expanduser()
    path = path if path.is_absolute() else prompt_file.parent / path
    if not path.is_file():
        raise PromptSetError(f"{prompt_file}:{line}: image {image} not found (looked for {path})")
    import PIL.Image

    try:
        with PIL.Image.open(path) as opened:
            opened.verify()
    except Exception as error:  # PIL raises several types for truncated or foreign files
        raise PromptSetError(f"{prompt_file}:{line}: image {image} is not a readable image ({error})") from None
    return path.resolve()


@functools.lru_cache(maxsize=4096)
def source_image(path: str) -> PIL.Image.Image:
    """A prompt's source image as RGB (read once per process)."""
    import PIL.Image

    with PIL.Image.open(path) as opened:
        return opened.convert("RGB")


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


def check_template(template: str) -> None:
    """A prompt template holds exactly one `{}` (where the prompt goes) and no other braces; `{{` and `}}` stand for
    literal braces."""
    import string

    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise PromptSetError(f"prompts template {template!r} is not a format string ({error}); write {{{{ and }}}} "
                             f"for literal braces") from None
    if fields != [""]:
        raise PromptSetError(f"prompts template {template!r} must hold exactly one {{}} (where the prompt goes), "
                             f"found {len(fields)} fields"
                             f"{(': ' + ', '.join(repr(f) for f in fields)) if fields else ''}")


def load_prompts(
    file: str, start: int = 0, stop: int | None = None, template: str = "{}", unique: bool = True
) -> list[Prompt]:
    """Read prompts `[start:stop]` of `file`, each formatted into `template` (e.g. "a photo of a {}").

    Blank lines are skipped; with `unique`, so are repeats of an earlier prompt (before slicing, so that a train slice
    and a held-out slice of one file never share a prompt). A `.jsonl` file needs a `prompt` key on every line; its
    other keys become metadata.
    Raises `PromptSetError` for a missing or empty file, a malformed line, or an empty slice.
    """
    check_template(template)
    path = resolve_prompt_file(file)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise PromptSetError(f"prompt file {path} is not UTF-8 text (byte {error.start}: {error.reason}); a prompt "
                             f"set is a text file with one prompt per line, or JSONL") from None
    lines = [line.strip() for line in text.splitlines()]
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
            if "image" in record:  # image-to-image: the source image, relative to the file's folder
                record["image"] = str(check_source_image(path, number, record["image"]))
            prompts.append(Prompt(template.format(text), record))
    else:
        prompts = [Prompt(template.format(line)) for line in lines]
    if unique:  # a prompt is its text and, for image-to-image, its source image
        seen = set()
        prompts = [p for p in prompts if not ((p.text, p.image) in seen or seen.add((p.text, p.image)))]
    if not prompts:
        raise PromptSetError(f"prompt file {path} holds no prompts")
    selected = prompts[start:stop]
    if not selected:
        raise PromptSetError(f"prompt file {path} has {len(prompts)} prompts; the slice [{start}:{stop}] is empty")
    return selected
