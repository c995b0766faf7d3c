"""Prompt embeddings with each distinct prompt through the text encoders once.

SD3's three text encoders (two CLIPs and T5-XXL, about 11 GB in bf16) cost the same for a prompt whatever it is used
for, and an RL epoch uses each prompt many times: G images of a group, the training forwards, the held-out evaluation
at every check. `PromptEncoder` encodes each distinct text once and hands out its rows:

- training prompts are kept for an epoch (`forget` drops them at the next one), held-out prompts (`keep=True`) and
  the negative prompt for the whole run;
- every text is encoded on its own (a batch of one), so a prompt's embedding is a function of the prompt alone: the
  same in any epoch, batch, process count, and whether or not it was precomputed;
- with a `PrecomputedEmbeddings` store (`model.precompute_prompt_embeds=true`), every training and held-out prompt is
  encoded at start-up into a file on disk, keyed by the encoders' weights, the T5 length and the texts; the encoders
  then leave the accelerator, and rows are read from the file (memory-mapped) when needed.

The negative prompt is the stock pipeline's default: the empty string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

NEGATIVE_PROMPT = ""  # the stock StableDiffusion3Pipeline's negative prompt when none is given


def text_encoders(pipe) -> list[torch.nn.Module]:
    """The pipeline's text encoders that are loaded (T5 may be dropped)."""
    return [e for e in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3) if e is not None]


class PromptEncoder:
    """Prompt and pooled embeddings of texts, each distinct text encoded once (see the module's docstring).

    `rows_encoded` counts the texts that went through the encoders (one row each); `experiments.bench` reports it per
    distinct prompt.
    """

    def __init__(self, pipe, max_sequence_length: int | None = None, store: PrecomputedEmbeddings | None = None):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length or pipe.max_sequence_length
        self.store = store
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.kept: set[str] = {NEGATIVE_PROMPT}
        self.rows_encoded = 0

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def __call__(self, texts: Sequence[str], keep: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`(prompt_embeds, pooled_prompt_embeds)` with one row per text, on the transformer's device; `keep`: keep
        these texts' embeddings for the whole run (held-out prompts), not only until `forget`. While a text encoder
        trains (DreamBooth's LoRA), nothing is kept: its embeddings change at every step."""
        if self.store is None and any(p.requires_grad for e in text_encoders(self.pipe) for p in e.parameters()):
            self.cached.clear()
        for text in dict.fromkeys(texts):
            if text not in self.cached:
                self.cached[text] = self._encode(text)
            if keep:
                self.kept.add(text)
        rows = [self.cached[text] for text in texts]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def negative(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The negative prompt's embeddings for `batch_size` rows (one encoding per run, expanded without copies)."""
        embeds, pooled = self([NEGATIVE_PROMPT])
        return embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)

    def forget(self) -> None:
        """Drop the embeddings of texts not kept for the run (an epoch's training prompts)."""
        self.cached = {text: rows for text, rows in self.cached.items() if text in self.kept}

    @torch.no_grad()
    def _encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.store is not None:
            embeds, pooled = self.store[text]
            return embeds.to(self.device), pooled.to(self.device)
        self.rows_encoded += 1
        return encode_one(self.pipe, text, self.max_sequence_length, self.device)


@torch.no_grad()
def encode_one(pipe, text: str, max_sequence_length: int, device: torch.device | str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One text through the pipeline's text encoders (on whatever device they are), as rows on `device`."""
    encoder_device = text_encoders(pipe)[0].device
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=[text], prompt_2=None, prompt_3=None, device=encoder_device,
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return embeds[0].to(device), pooled[0].to(device)


def encoder_fingerprint(pipe, max_sequence_length: int) -> str:
    """What a prompt's embedding depends on besides its text: the encoders' classes, dtypes and weights (a sum and a
    sample of each parameter), the tokenizers' vocabulary sizes and the T5 length."""
    digest = hashlib.sha256(f"T5 length {max_sequence_length}".encode())
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        digest.update(f"{name} {type(tokenizer).__name__} {len(tokenizer) if tokenizer is not None else 0}".encode())
    for encoder in text_encoders(pipe):
        digest.update(type(encoder).__name__.encode())
        for parameter_name, parameter in encoder.named_parameters():
            flat = parameter.detach().reshape(-1)
            summary = torch.stack([flat.float().sum(), flat[: 64].float().sum(), flat[-64:].float().sum()])
            digest.update(f"{parameter_name} {parameter.dtype} {tuple(parameter.shape)}".encode())
            digest.update(summary.cpu().numpy().tobytes())
    return digest.hexdigest()


class PrecomputedEmbeddings:
    """Every prompt's embeddings in one safetensors file, read row by row (memory-mapped) on the CPU."""

    def __init__(self, path: Path):
        self.path = path
        self._file = safe_open(str(path), framework="pt", device="cpu")
        texts = json.loads(self._file.metadata()["texts"])
        self.row = {text: index for index, text in enumerate(texts)}

    def __contains__(self, text: str) -> bool:
        return text in self.row

    def __getitem__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if text not in self.row:
            raise KeyError(f"{text!r} was not precomputed into {self.path}")
        index = self.row[text]
        return self._file.get_slice("prompt_embeds")[index], self._file.get_slice("pooled_prompt_embeds")[index]


def precompute(pipe, texts: Iterable[str], cache_dir: Path, max_sequence_length: int,
               is_main_process: bool = True) -> PrecomputedEmbeddings:
    """Encode every distinct text (and the negative prompt) once into `<cache_dir>/<key>.safetensors`, unless that
    file exists; the key is a hash of `encoder_fingerprint` and the texts. Only the main process writes (call it
    inside `main_process_first`); the file is written under a temporary name and renamed, so a killed run never
    leaves a partial cache."""
    distinct = sorted(set(texts) | {NEGATIVE_PROMPT})
    key = hashlib.sha256((encoder_fingerprint(pipe, max_sequence_length) + json.dumps(distinct)).encode())
    path = cache_dir / f"{key.hexdigest()[:24]}.safetensors"
    if path.is_file():
        logger.info("prompt embeddings of %d prompts from %s", len(distinct), path)
        return PrecomputedEmbeddings(path)
    if not is_main_process:
        raise RuntimeError(f"the main process did not write {path}")
    rows = [encode_one(pipe, text, max_sequence_length, "cpu")
            for text in tqdm(distinct, desc="prompt embeddings", leave=False)]
    cache_dir.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    save_file({"prompt_embeds": torch.stack([r[0] for r in rows]).contiguous(),
               "pooled_prompt_embeds": torch.stack([r[1] for r in rows]).contiguous()},
              str(partial), metadata={"texts": json.dumps(distinct)})
    partial.rename(path)
    logger.info("prompt embeddings of %d prompts computed once into %s", len(distinct), path)
    return PrecomputedEmbeddings(path)
