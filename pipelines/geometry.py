"""The image sizes a model can make, read from its config files before any weights load.

An SD3 transformer turns an image of `size` pixels into (size / vae_factor / patch_size)^2 tokens, and its positional
embedding covers at most `pos_embed_max_size` patches a side. A resolution that is not a multiple of
`vae_factor * patch_size`, or larger than the embedding covers, fails inside diffusers after the weights loaded (and
after samples were written); `ModelGeometry.check` says so first, in one line. SD3 / SD3.5: VAE x8, patches of 2,
native 1024 px (sample_size 128), at most 192 x 16 = 3072 px (SD3.5-Medium: 384 x 16).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.errors import ConfigError
from pipelines.hub import looks_like_hub_id


@dataclass(frozen=True)
class ModelGeometry:
    vae_factor: int  # pixels per latent: 2 ** (the VAE's blocks - 1)
    patch_size: int  # latents per token a side
    native: int  # the model's default image size in pixels (the transformer's sample_size in pixels)
    largest: int | None  # the largest size its positional embedding covers; None: no limit

    @classmethod
    def from_configs(cls, transformer: Mapping[str, Any], vae: Mapping[str, Any]) -> ModelGeometry:
        """From the transformer's and the VAE's `config.json` (or their constructor arguments)."""
        vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
        patch = int(transformer.get("patch_size", 2))
        max_patches = transformer.get("pos_embed_max_size", 96)  # diffusers' default
        return cls(vae_factor=vae_factor, patch_size=patch, native=int(transformer["sample_size"]) * vae_factor,
                   largest=None if max_patches is None else int(max_patches) * patch * vae_factor)

    def check(self, option: str, value: int | None) -> None:
        """Raise `ConfigError` naming `option` when `value` pixels do not fit this model (None: its native size)."""
        if value is None:
            return
        step = self.vae_factor * self.patch_size
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{option} must be a positive whole number of pixels, got {value!r}")
        if value % step:
            raise ConfigError(f"{option}={value} does not fit this model: its images are made of {step} x {step} "
                              f"pixel patches (VAE x{self.vae_factor}, patches of {self.patch_size}); use a multiple "
                              f"of {step}, e.g. {max(step, value // step * step)}")
        if self.largest is not None and value > self.largest:
            raise ConfigError(f"{option}={value} is larger than this model's positional embedding covers "
                              f"({self.largest} px); use at most {self.largest} (its native size is {self.native})")


def folder_geometry(folder: Path) -> ModelGeometry | None:
    """From a diffusers pipeline folder's `transformer/` and `vae/` configs; None when they are not there."""
    try:
        transformer, vae = (json.loads((folder / part / "config.json").read_text()) for part in ("transformer", "vae"))
    except (OSError, json.JSONDecodeError):
        return None
    return ModelGeometry.from_configs(transformer, vae)


def hub_geometry(repo_id: str, revision: str | None = None) -> ModelGeometry | None:
    """From a hub repository's two config files (a few kB, cached like any hub file); None when they cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        transformer, vae = (json.loads(Path(hf_hub_download(repo_id, f"{part}/config.json", revision=revision))
                                       .read_text()) for part in ("transformer", "vae"))
    except Exception:  # offline, gated, missing: loading the model says why, in one line (pipelines/loading.py)
        return None
    return ModelGeometry.from_configs(transformer, vae)


def pipeline_geometry(path: str | None = None, revision: str | None = None, config: str | None = None,
                      **_: Any) -> ModelGeometry | None:
    """The geometry of what `pipelines.load_pipeline(path, ...)` loads: the tiny model, a folder, a hub id, or a
    single file (that of the diffusers config completing it)."""
    if path is None:
        from pipelines.tiny import TRANSFORMER_CONFIG, VAE_CONFIG

        return ModelGeometry.from_configs(TRANSFORMER_CONFIG, VAE_CONFIG)
    from pipelines.single_file import inspect_file, is_single_file, locate

    if is_single_file(str(path)):
        if config is None:
            try:
                file = locate(str(path), download=False)  # a hub file not cached yet: read when it loads
                config = inspect_file(file).default_config if file is not None else None
            except Exception:  # a file that cannot be read or had: loading says why, in one line
                return None
        return None if config is None else pipeline_geometry(str(config), revision)
    local = Path(str(path)).expanduser()
    if local.is_dir():
        return folder_geometry(local)
    return hub_geometry(str(path), revision) if looks_like_hub_id(str(path)) else None


def digits_geometry(world: str | None = None, build: bool = False, **_: Any) -> ModelGeometry | None:
    """The geometry of `model=digits`: the shipped base model's configs (or, with `build`, the one built in `world`)."""
    from pipelines.digits import DEFAULT_DIR, ROOT, SHIPPED

    if not build:
        return folder_geometry(SHIPPED)
    folder = Path(world or DEFAULT_DIR).expanduser()
    return folder_geometry((folder if folder.is_absolute() else ROOT / folder) / "base")


LOADERS: dict[str, Callable[..., ModelGeometry | None]] = {  # a model config's `_target_` -> its geometry
    "pipelines.load_pipeline": pipeline_geometry,
    "pipelines.loading.load_pipeline": pipeline_geometry,
    "pipelines.digits.load_digits_pipeline": digits_geometry,
}


def model_geometry(model: Mapping[str, Any]) -> ModelGeometry | None:
    """The geometry of the model a `conf/model/*.yaml` config loads, from config files only; None when unknown (a
    loader this file does not know, or config files that cannot be read: then loading reports the cause)."""
    reader = LOADERS.get(str(model.get("_target_", "")))
    options = {k: v for k, v in model.items() if k != "_target_"}
    return None if reader is None else reader(**options)
