"""Loading an SD3 / SD3.5 pipeline: the tiny random model, a local diffusers folder, a Hugging Face hub id, or a
single-file checkpoint (Stability AI's layout, loaded through diffusers' `from_single_file`: pipelines/single_file.py),
whole or for the transformer alone.

Everything that can be checked cheaply (does the folder exist, is it an SD3 pipeline, is the hub reachable, is CUDA
there for the options that need it) is checked before any weights are read, and fails with a one-line
`ModelLoadError` that says what to do.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from pipelines.hub import ModelLoadError, check_hub_file, looks_like_hub_id
from pipelines.pipeline_sd3_logprob import StableDiffusion3LogProbPipeline
from pipelines.single_file import SingleFileContents, check_text_encoders, inspect_file, is_single_file, locate

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_pipeline(
    path: str | None = None,
    *,
    config: str | None = None,
    transformer_file: str | None = None,
    tiny_seed: int = 0,
    revision: str | None = None,
    variant: str | None = None,
    dtype: str = "float32",
    drop_t5: bool = False,
    t5_8bit: bool = False,
    cpu_offload: bool = False,
    compile_transformer: bool = False,
    compile_vae_decode: bool = False,
    max_sequence_length: int = 256,
    precompute_prompt_embeds: bool = False,
    prompt_embeds_cache: str | None = None,
    device: str | torch.device = "cpu",
) -> StableDiffusion3LogProbPipeline:
    """Build or load an SD3 / SD3.5 pipeline as a `StableDiffusion3LogProbPipeline`.

    Args:
        path: a local diffusers pipeline folder, a hub id (e.g. "stabilityai/stable-diffusion-3.5-medium"), a
            single-file checkpoint (a local `.safetensors`, `ORG/REPO/FILE.safetensors` or a hub file URL), or None
            for the tiny random model built in code.
        config: for a single-file `path`, the diffusers folder or hub id whose configs (and tokenizers, and the
            weights of any part the file lacks) complete it; None: the hub config of the file's SD3 family.
        transformer_file: a single-file checkpoint whose transformer replaces `path`'s (its config is `path`'s).
        tiny_seed: the seed of the tiny model's weights (used when `path` is None).
        revision, variant: passed to `from_pretrained` (e.g. variant "fp16").
        dtype: "float32", "bfloat16" or "float16" for every component.
        drop_t5: load without the T5 encoder (`text_encoder_3=None`); SD3 then uses zeros for the T5 tokens.
        t5_8bit: load T5 in 8 bits with bitsandbytes (needs CUDA).
        cpu_offload: `enable_model_cpu_offload()` instead of moving everything to `device` (needs CUDA).
        compile_transformer, compile_vae_decode: `torch.compile` the transformer / the VAE decoder.
        max_sequence_length: the T5 tokens the pipeline encodes prompts to when a call does not say (SD3: 256).
        precompute_prompt_embeds, prompt_embeds_cache: training encodes every prompt once at start-up into a file in
            this folder (None: `prompt_embeds/` beside the run directory) and moves the text encoders off the
            accelerator (`pipelines/text.py`); kept on the pipeline for the session.
        device: where to put the pipeline.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"model.dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    torch_dtype = DTYPES[dtype]
    device = torch.device(device)
    if (t5_8bit or cpu_offload) and not torch.cuda.is_available():
        option = "model.t5_8bit" if t5_8bit else "model.cpu_offload"
        raise ModelLoadError(f"{option}=true needs a CUDA GPU and none is available; set {option}=false")
    if t5_8bit and importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("model.t5_8bit=true needs bitsandbytes: `pip install bitsandbytes`, or set it to false")
    if t5_8bit and drop_t5:
        raise ModelLoadError("model.t5_8bit and model.drop_t5 are both set; choose one")

    if path is None:
        from pipelines.tiny import build_tiny_components

        components = build_tiny_components(seed=tiny_seed)
        if drop_t5:
            components.update(text_encoder_3=None, tokenizer_3=None)
        if t5_8bit:
            raise ModelLoadError("model.t5_8bit applies to real checkpoints only; the tiny model has no 8-bit T5")
        pipe = StableDiffusion3LogProbPipeline(**components)
        if torch_dtype != torch.float32:
            pipe.to(dtype=torch_dtype)
    elif is_single_file(str(path)):
        if t5_8bit:
            raise ModelLoadError("model.t5_8bit applies to diffusers folders and hub ids, not to single files")
        file, contents, config = resolve_single_file(str(path), config, drop_t5, revision)
        kwargs = {"config": config, "torch_dtype": torch_dtype}
        if drop_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        try:
            kwargs.update(missing_parts(contents, config, drop_t5, revision, torch_dtype))
            pipe = StableDiffusion3LogProbPipeline.from_single_file(str(file), revision=revision, **kwargs)
        except OSError as error:  # a missing or corrupt file of the config, in many wordings
            reason = " ".join(str(error).split())
            raise ModelLoadError(f"cannot load {path} with the configs of {config}: {reason}") from None
        for component in pipe.components.values():  # diffusers leaves a T5 read from a single file in training
            if isinstance(component, torch.nn.Module):  # mode (dropout on); from_pretrained returns eval mode
                component.eval()
    else:
        source = resolve_source(str(path), revision=revision)
        kwargs = {"dtype": torch_dtype, "revision": revision, "variant": variant}
        if drop_t5:
            kwargs.update(text_encoder_3=None, tokenizer_3=None)
        if t5_8bit:
            from transformers import BitsAndBytesConfig, T5EncoderModel

            kwargs["text_encoder_3"] = T5EncoderModel.from_pretrained(
                source,
                subfolder="text_encoder_3",
                revision=revision,
                quantization_config=BitsAndBytesConfig(load_in_8bit=True),
                dtype=torch_dtype,
            )
        try:
            pipe = StableDiffusion3LogProbPipeline.from_pretrained(source, **kwargs)
        except OSError as error:  # diffusers' "Unable to load weights from checkpoint file ..." and the like
            reason = " ".join(str(error).split())
            raise ModelLoadError(f"cannot load the weights of {source}: {reason} (a truncated or corrupt file? "
                                 f"download it again)") from None

    if transformer_file is not None:
        pipe.transformer = load_transformer_file(transformer_file, path, revision, torch_dtype)

    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif t5_8bit:
        # bitsandbytes modules are placed on the GPU when loaded and cannot be moved with `.to`.
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module) and name != "text_encoder_3":
                component.to(device)
    else:
        pipe.to(device)
    pipe.max_sequence_length = max_sequence_length
    pipe.precompute_prompt_embeds, pipe.prompt_embeds_cache = precompute_prompt_embeds, prompt_embeds_cache
    if compile_transformer:
        pipe.transformer.compile()
    if compile_vae_decode:
        pipe.vae.decode = torch.compile(pipe.vae.decode)
    return pipe


def check_model_source(model: dict) -> None:
    """Everything about a model config's `path`, `config` and `transformer_file` that can be checked without reading
    weights (folders, files' headers, the hub cache); raises `ModelLoadError` with a one-line message."""
    path, revision = model.get("path"), model.get("revision")
    if path and is_single_file(str(path)):
        resolve_single_file(str(path), model.get("config"), bool(model.get("drop_t5")), revision, download=False)
    elif path:
        resolve_source(str(path), revision=revision)
    elif model.get("config"):
        raise ModelLoadError("model.config completes a single-file checkpoint; set model.path to one, or drop it")
    if model.get("transformer_file"):
        check_transformer_file(str(model["transformer_file"]), path, download=False)


def resolve_single_file(path: str, config: str | None, drop_t5: bool, revision: str | None = None,
                        download: bool = True) -> tuple[Path | None, SingleFileContents | None, str | None]:
    """A single-file checkpoint's local path, what it holds and the diffusers config to complete it with, checked:
    an SD3 file, a config that exists (a folder or a reachable / cached hub id), and weights for every part the file
    lacks (the SD3.5 files hold the transformer and VAE only; SD3's `*_incl_clips` leave T5 out). Without `download`
    (the checks before a run starts) a hub file that is not cached yet is only checked to exist: its header is read
    when it loads (then the path and contents are None, and so is the config when it is to be read from the file)."""
    file = locate(path, download=download)
    contents = inspect_file(file) if file is not None else None
    if contents is not None:
        check_text_encoders(path, contents)
    if config is None:
        if contents is None:
            return None, None, None
        config = contents.default_config
        if config is None:
            raise ModelLoadError(f"model.path={path} is an SD3-layout checkpoint of no published size: set "
                                 f"model.config to the diffusers folder whose configs it fits")
    missing = [] if contents is None else [name for name, present in (
        ("vae", contents.vae), ("text_encoder", contents.clip_l), ("text_encoder_2", contents.clip_g),
        ("text_encoder_3", contents.t5 or drop_t5)) if not present]

    def refuse(name: str) -> None:
        hint = (" (or model.drop_t5=true: SD3's *_incl_clips files are meant to run without T5)"
                if name == "text_encoder_3" else "")
        raise ModelLoadError(f"model.path={path} holds no {name} and model.config={config} has no weights for it: "
                             f"point model.config at a full diffusers folder or hub id{hint}")

    config_folder = Path(str(config)).expanduser()
    if config_folder.is_dir():
        check_sd3_folder(config_folder)
        for name in missing:
            if not any((config_folder / name).glob("*.safetensors")) and not any((config_folder / name).glob("*.bin")):
                refuse(name)
        return file, contents, str(config_folder)
    if not looks_like_hub_id(str(config)):
        raise ModelLoadError(f"model.config={config}: no such folder (and not a hub id of the form 'org/name'); it "
                             f"names the diffusers configs that complete the single-file model.path={path}")
    check_hub_file(str(config), "model_index.json", "set model.config=DIR (a diffusers folder of the same model)",
                   revision=revision)
    for name in missing:
        weights = [f"{name}/{stem}{suffix}" for stem in ("model", "diffusion_pytorch_model")
                   for suffix in (".safetensors", ".safetensors.index.json")]
        try:
            check_hub_file(str(config), weights, "set model.config=DIR", revision=revision)
        except ModelLoadError:
            refuse(name)
    return file, contents, str(config)


SINGLE_FILE_PARTS = {"vae": ("diffusers", "AutoencoderKL"),
                     "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
                     "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
                     "text_encoder_3": ("transformers", "T5EncoderModel")}


def missing_parts(contents: SingleFileContents, config: str, drop_t5: bool, revision: str | None,
                  dtype: torch.dtype) -> dict:
    """The parts a single file lacks, loaded from `config` with `from_pretrained` (diffusers' `from_single_file` would
    look for them under diffusers' weight names only, which a transformers text encoder folder does not use)."""
    present = {"vae": contents.vae, "text_encoder": contents.clip_l, "text_encoder_2": contents.clip_g,
               "text_encoder_3": contents.t5 or drop_t5}
    parts = {}
    for name, (library, class_name) in SINGLE_FILE_PARTS.items():
        if not present[name]:
            cls = getattr(importlib.import_module(library), class_name)
            precision = {"torch_dtype" if library == "diffusers" else "dtype": dtype}
            parts[name] = cls.from_pretrained(config, subfolder=name, revision=revision, **precision)
    return parts


def check_transformer_file(transformer_file: str, path: str | None, download: bool = True) -> Path | None:
    """`model.transformer_file` is an SD3 single file and `model.path` names the folder or hub id it fits into
    (without `download`, a hub file not cached yet is only checked to exist, as in `resolve_single_file`)."""
    if not path or is_single_file(str(path)):
        raise ModelLoadError("model.transformer_file replaces the transformer of model.path: set model.path to a "
                             "diffusers folder or hub id of the same architecture")
    file = locate(transformer_file, download=download)
    if file is not None:
        inspect_file(file)
    return file


def load_transformer_file(transformer_file: str, path: str, revision: str | None, dtype: torch.dtype):
    """The transformer of a single-file checkpoint, configured as `path`'s (diffusers' `from_single_file`)."""
    from diffusers import SD3Transformer2DModel

    file = check_transformer_file(transformer_file, path)
    source = resolve_source(str(path), revision=revision)
    return SD3Transformer2DModel.from_single_file(str(file), config=source, subfolder="transformer",
                                                  torch_dtype=dtype)


def resolve_source(path: str, revision: str | None = None) -> str:
    """Check that `path` is a loadable SD3 pipeline folder or hub id before any weights are read; return what to pass
    to `from_pretrained`. Raises `ModelLoadError` with a one-line message otherwise."""
    local = Path(path).expanduser()
    if local.is_dir():
        check_sd3_folder(local)
        return str(local)
    if local.exists():
        raise ModelLoadError(f"model.path={path} is a file but not a single-file checkpoint (.safetensors); point "
                             f"it at one, or at a diffusers pipeline folder")
    if not looks_like_hub_id(path):
        raise ModelLoadError(f"model.path={path}: no such folder (and not a hub id of the form 'org/name')")
    check_hub_file(path, "model_index.json", "set model.path=DIR", revision=revision)
    return path


def check_sd3_folder(folder: Path) -> None:
    """A diffusers SD3 pipeline folder has a `model_index.json` naming an SD3 pipeline and a transformer folder."""
    index_file = folder / "model_index.json"
    hint = "save one with `StableDiffusion3Pipeline.save_pretrained` or `python -m scripts.save_tiny_model --out DIR`"
    if not index_file.is_file():
        raise ModelLoadError(f"{folder} is not a diffusers pipeline folder (no model_index.json); {hint}")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(f"{index_file} is not valid JSON ({error}); {hint}") from None
    class_name = index.get("_class_name", "")
    if not class_name.startswith("StableDiffusion3"):
        raise ModelLoadError(f"{folder} holds a {class_name or 'unknown'} pipeline, not an SD3 / SD3.5 one; {hint}")
    if not (folder / "transformer" / "config.json").is_file():
        raise ModelLoadError(f"{folder} has no transformer/config.json: the SD3 pipeline folder is incomplete")
