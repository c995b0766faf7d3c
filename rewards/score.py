"""Score your own images with any reward before training with it; prints one JSON line per image.

    python -m rewards.score reward=aesthetic images=photos/ prompt="a photo of a cat"
    python -m rewards.score reward=jpeg_compressibility images=[a.png,b.png]
    python -m rewards.score reward=clip_score images=photos/ prompts_file=captions.txt
    python -m rewards.score reward=geneval images=samples/ prompts_file=metadata.jsonl   # prompts with their metadata

Every image is opened and checked before the reward model loads, so a corrupt file fails at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import numpy as np
import PIL.Image
import torch
from omegaconf import DictConfig, ListConfig

from pipelines.configs import build
from pipelines.errors import UserError, exit_on_user_error

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(images: str | list[str]) -> list[Path]:
    """A folder's image files (sorted), one file, or a list of files."""
    entries = [images] if isinstance(images, str) else list(images)
    files = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no such image file or folder: {entry}")
    if not files:
        raise UserError(f"no images found in {images}")
    return files


def read_image(path: Path) -> torch.Tensor:
    """An image file as a CHW float tensor in [0, 1] (RGB)."""
    try:
        with PIL.Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except Exception as error:
        raise UserError(f"cannot read image {path} ({type(error).__name__}: {error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def read_prompts(count: int, prompt: str | None, prompts_file: str | None) -> tuple[list[str], list[dict]]:
    """One prompt per image, and its metadata: a `.txt` file has a prompt a line; a `.jsonl` file a JSON object a line
    with a `prompt` key, its other keys the metadata (GenEval's objects: `reward=geneval` reads them)."""
    if prompt is not None and prompts_file is not None:
        raise UserError("give either prompt or prompts_file, not both")
    if prompts_file is None:
        return [prompt or ""] * count, [{} for _ in range(count)]
    path = Path(prompts_file).expanduser()
    if not path.is_file():
        raise UserError(f"no such prompts file: {prompts_file}")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(lines) != count:
        raise UserError(f"{prompts_file} has {len(lines)} prompts for {count} images; give one per image")
    if path.suffix != ".jsonl":
        return lines, [{} for _ in lines]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise UserError(f"{prompts_file} line {number} is not a JSON object with a 'prompt'")
        records.append(record)
    return [r["prompt"] for r in records], [{k: v for k, v in r.items() if k != "prompt"} for r in records]


def score_images(reward, images: list[torch.Tensor], prompts: list[str], batch_size: int, device,
                 metadata: list[dict] | None = None) -> list[dict]:
    """Score images in batches of equal size; returns per-image records with the score and per-image info values."""
    records = []
    start = 0
    while start < len(images):
        end = start + 1
        while end < len(images) and end - start < batch_size and images[end].shape == images[start].shape:
            end += 1
        with torch.no_grad():
            scores, info = reward(torch.stack(images[start:end]).to(device), prompts[start:end],
                                  metadata[start:end] if metadata is not None else None)
        for i in range(end - start):
            record = {"score": scores[i].item()}
            for key, value in info.items():
                if isinstance(value, torch.Tensor) and value.ndim == 1 and len(value) == end - start:
                    record[key] = value[i].item()
            records.append(record)
        start = end
    return records


@hydra.main(version_base="1.3", config_path="../conf", config_name="score")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        images_arg = list(cfg.images) if isinstance(cfg.images, ListConfig) else str(cfg.images)
        files = list_images(images_arg)
        images = [read_image(path) for path in files]  # all checked before the reward model loads
        prompts, metadata = read_prompts(len(files), cfg.prompt, cfg.prompts_file)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
        reward = build(cfg.reward).to(device)
        reward.check_prompts(prompts)
        reward.check_metadata(prompts, metadata)
        records = score_images(reward, images, prompts, cfg.batch_size, device, metadata)
        for path, prompt, record in zip(files, prompts, records, strict=True):
            print(json.dumps({"image": str(path), "prompt": prompt, **record}), flush=True)


def usage() -> str:
    """`--help`: this command's own options and the rewards it takes (Hydra's help would list every training
    group), each reward with the first line of its config file."""
    conf = Path(__file__).resolve().parents[1] / "conf"
    rewards = []
    for path in sorted((conf / "reward").glob("*.yaml")):
        first = path.read_text().splitlines()[0] if path.read_text() else ""
        rewards.append(f"  {path.stem:24} {first.removeprefix('#').strip()}")
    options = [line for line in (conf / "score.yaml").read_text().splitlines()
               if line and not line.startswith((" ", "#", "-", "defaults", "hydra"))]
    return "\n".join([__doc__.strip(), "", "Options (conf/score.yaml; reward.<option>=... sets a reward's own):",
                      *(f"  {line}" for line in options), "", "Rewards (reward=<name>; conf/reward/):", *rewards])


if __name__ == "__main__":
    if any(arg in ("--help", "-h") for arg in sys.argv[1:]):
        print(usage())
        sys.exit(0)
    main()
