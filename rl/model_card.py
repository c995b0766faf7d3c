"""`final/README.md`: a Hugging Face model card for what a run trained, written when the run finishes.

The YAML header says what the hub indexes (base model, library, tags, licence, the algorithm and reward, DreamBooth's
instance prompt); the body how it was trained (the command, the settings that matter), what the held-out evaluation
read at the start, the end and its maximum, the last sample grid (copied to `final/samples.png`), and how to load it
(diffusers, and the ComfyUI file for a LoRA). `huggingface_hub.ModelCard` parses it; `python -m experiments.push`
uploads `final/` with it.

    python -m rl.model_card RUN_DIR        # (re)write RUN_DIR/final/README.md from the run's files
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from pipelines.hub import looks_like_hub_id
from rl.tracking import read_metrics

PROJECT_LICENSE = "apache-2.0"  # this codebase's (pyproject.toml): the tiny model and the digits world are under it
# The published bases' licences, as their hub cards state them (the hub cannot be asked offline).
KNOWN_LICENSES = {
    "stabilityai/stable-diffusion-3.5-medium": ("other", "stabilityai-ai-community"),
    "stabilityai/stable-diffusion-3.5-large": ("other", "stabilityai-ai-community"),
    "stabilityai/stable-diffusion-3-medium-diffusers": ("other", "stabilityai-ai-community"),
}


def choices(run_dir: Path) -> dict[str, str]:
    """Hydra's config-group choices of the run (algo, reward, model, ...), from `.hydra/hydra.yaml` when there."""
    from omegaconf import OmegaConf

    hydra_file = run_dir / ".hydra" / "hydra.yaml"
    if not hydra_file.exists():
        return {}
    picked = OmegaConf.select(OmegaConf.load(hydra_file), "hydra.runtime.choices", default={}) or {}
    return {str(k): str(v) for k, v in picked.items() if v is not None and not str(k).startswith("hydra")}


def overrides(run_dir: Path) -> list[str]:
    from omegaconf import OmegaConf

    file = run_dir / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(file)] if file.exists() else []


def base_model(config: dict[str, Any]) -> tuple[str | None, str]:
    """`(hub id or None, words)` of the model the run started from."""
    model = config.get("model", {})
    target, path = str(model.get("_target_", "")), model.get("path")
    if target.endswith("load_digits_pipeline"):
        return None, "the digits world's base model (experiments/digits_world.py in sd3-rl)"
    if not path:
        return None, f"the tiny random SD3.5-architecture model of sd3-rl (seed {model.get('tiny_seed', 0)})"
    path = str(path)
    words = path if not model.get("transformer_file") else f"{path} with the transformer of {model['transformer_file']}"
    return (path if looks_like_hub_id(path) else None), words


def load_base(config: dict[str, Any], pipeline: str) -> list[str]:
    """The model card's lines that load the base model a LoRA was trained on: a hub id or local folder by its path, a
    single file with `from_single_file`, and the two models sd3-rl makes (the digits world's, unpacked by
    `pipelines.digits`; the tiny one, built in code) with sd3-rl's own loaders."""
    model = config.get("model", {})
    target, path = str(model.get("_target_", "")), model.get("path")
    if target.endswith("load_digits_pipeline"):
        world = model.get("world", "data/digits_world")
        return ["# the digits world's base model: sd3-rl unpacks it into <world>/base "
                "(pip install sd3-rl, or a checkout)",
                "from pipelines.digits import load_digits_pipeline", "",
                f"base = load_digits_pipeline({str(world)!r})", f"pipe = {pipeline}(**base.components)"]
    if not path:
        return ["# the tiny random SD3.5-architecture model, built in code by sd3-rl",
                "from pipelines import load_pipeline", "",
                f"base = load_pipeline(None, tiny_seed={model.get('tiny_seed', 0)})",
                f"pipe = {pipeline}(**base.components)"]
    loader = "from_single_file" if str(path).endswith(".safetensors") else "from_pretrained"
    return [f"pipe = {pipeline}.{loader}({str(path)!r}, torch_dtype=torch.bfloat16)"]


def license_of(config: dict[str, Any]) -> tuple[str, str | None]:
    """`(license, license_name)`: a published base's, a local folder's own card's, or this project's for the models
    it builds."""
    hub_id, _ = base_model(config)
    if hub_id in KNOWN_LICENSES:
        return KNOWN_LICENSES[hub_id]
    path = config.get("model", {}).get("path")
    if hub_id is None and not path:
        return PROJECT_LICENSE, None
    card = Path(str(path)).expanduser() / "README.md"
    if card.is_file():
        from huggingface_hub import ModelCard

        data = ModelCard.load(card).data
        if data.license:
            return data.license, data.get("license_name")
    return "other", "see-the-base-model"


def held_out(records: list[dict]) -> list[tuple[str, float | None, float | None, float | None]]:
    """`(metric, start, end, max)` of every held-out mean (`eval/*_mean`); a value logged as non-finite (`null` in
    `metrics.jsonl`) is None, and the max is over the finite ones (None if there are none)."""
    keys = sorted({k for r in records for k in r if k.startswith("eval/") and k.endswith("_mean")})
    rows = []
    for key in keys:
        values = [r[key] for r in records if key in r]
        finite = [v for v in values if v is not None]
        rows.append((key, values[0], values[-1], max(finite) if finite else None))
    return rows


def shown(value: float | None) -> str:
    """A table cell: 4 decimals, or "non-finite" for a value logged as NaN or infinite."""
    return "non-finite" if value is None else f"{value:.4f}"


def write_model_card(run_dir: Path, config: dict[str, Any], final: Path | None = None,
                     example_prompt: str = "a photo of a cat") -> Path:
    """Write `final/README.md` (and `final/samples.png`, the run's last held-out grid) for the run in `run_dir`."""
    from huggingface_hub import ModelCard, ModelCardData

    run_dir = Path(run_dir)
    final = Path(final or run_dir / "final")
    picked = choices(run_dir)
    target = str(config.get("algo", {}).get("_target_", "rl.algo.Algo"))  # rl.<algorithm's module>.<its config>
    algo = target.split(".")[-2] if target.count(".") >= 2 else target.lower()
    preset = picked.get("experiment")
    reward = picked.get("reward") or (config.get("reward") or {}).get("_target_", "none")
    hub_id, base_words = base_model(config)
    license_id, license_name = license_of(config)
    lora = (final / "pytorch_lora_weights.safetensors").exists()
    algo_config = config.get("algo", {})
    instance_prompt = algo_config.get("instance_prompt")
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []

    strength = (algo_config.get("sampling") or {}).get("strength")  # image-to-image training
    data = ModelCardData(
        base_model=hub_id, library_name="diffusers", license=license_id,
        pipeline_tag="image-to-image" if strength else "text-to-image",
        tags=["sd3-rl", "stable-diffusion-3", "stable-diffusion-3-diffusers", "text-to-image", "diffusers",
              *(["lora"] if lora else []), f"rl-{algo}", *(["reinforcement-learning"] if reward != "none" else [])],
    )
    if license_name:
        data.license_name = license_name
    data.algorithm, data.reward = algo, reward
    if preset:
        data.preset = preset
    if instance_prompt:
        data.instance_prompt = instance_prompt

    grids = sorted((run_dir / "samples").glob("step_*.png"))
    if grids:
        final.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(grids[-1], final / "samples.png")
    command = " ".join(["python -m rl.run", *overrides(run_dir)])
    lines = [f"# {algo} on {base_words}", "",
             f"Fine-tuned with sd3-rl (`algo={algo}`, reward `{reward}`), "
             f"{'as a LoRA' if lora else 'all transformer weights'}.", "",
             "## Training", "", "```bash", command, "```", ""]
    lr = (algo_config.get("optim") or {}).get("lr")
    settings = {"preset": f"experiment={preset}" if preset else None, "seed": config.get("seed"),
                "learning rate": f"{lr:.3g}" if isinstance(lr, float) else lr,
                "LoRA": _lora_words(algo_config.get("lora")), "instance prompt (trigger)": instance_prompt}
    for key, words in (("step", "steps or epochs"), ("train/samples", "sampled training images"),
                       ("train/seconds", "training seconds")):
        values = [r[key] for r in records if key in r]
        if values:
            settings[words] = round(values[-1])
    lines += [f"- {name}: {value}" for name, value in settings.items() if value is not None]
    rows = held_out(records)
    if rows:
        lines += ["", "## Held-out evaluation", "", "| metric | start | end | max |", "| --- | --- | --- | --- |"]
        lines += [f"| {key} | {shown(start)} | {shown(end)} | {shown(best)} |" for key, start, end, best in rows]
    if grids:
        lines += ["", f"![held-out samples at the last evaluation](samples.png) (`{grids[-1].name}`)"]
    pipeline = "StableDiffusion3Img2ImgPipeline" if strength else "StableDiffusion3Pipeline"
    lines += ["", "## How to use", "", "```python", "import torch", f"from diffusers import {pipeline}", ""]
    if lora:
        lines += [*load_base(config, pipeline),
                  "pipe.load_lora_weights(\"THIS_REPO_OR_FOLDER\", weight_name=\"pytorch_lora_weights.safetensors\")"]
    else:
        lines += [f"pipe = {pipeline}.from_pretrained(\"THIS_REPO_OR_FOLDER\", torch_dtype=torch.bfloat16)"]
    if strength:
        lines += [f"image = pipe({example_prompt!r}, image=source_image, strength={strength}).images[0]", "```"]
    else:
        lines += [f"image = pipe({example_prompt!r}).images[0]", "```"]
    if lora:
        lines += ["", ("ComfyUI and kohya-style tools: `comfyui_lora.safetensors` (the original SD3 module names; put "
                       "it in `models/loras`). Do not pass it to diffusers: `load_lora_weights` loads no adapter from "
                       "it (it only logs warnings); diffusers reads `pytorch_lora_weights.safetensors`.")]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n")
    final.mkdir(parents=True, exist_ok=True)
    card.save(final / "README.md")
    return final / "README.md"


def _lora_words(lora: dict | None) -> str | None:
    if not lora:
        return None
    return f"rank {lora.get('rank')}, alpha {lora.get('alpha') or lora.get('rank')}"


def main(argv: list[str] | None = None) -> None:
    from omegaconf import OmegaConf

    parser = argparse.ArgumentParser(description="(Re)write a run's final/README.md model card")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    config = OmegaConf.to_container(OmegaConf.load(args.run_dir / "config.yaml"), resolve=True)
    print(f"wrote {write_model_card(args.run_dir, config)}")


if __name__ == "__main__":
    main()
