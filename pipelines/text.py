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
  then leave the accelerator, and rows are read from the file (memory-mapped) when needed. Each row's SHA-256 is kept
  in the file: a row that no longer matches is encoded again (one warning), and a file that cannot be read is
  rebuilt (one warning).

The negative prompt is the stock pipeline's default: the empty string.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipelines.errors import UserError

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


def row_digest(embeds: torch.Tensor, pooled: torch.Tensor) -> str:
    """The SHA-256 of one prompt's rows (their bytes as stored)."""
    digest = hashlib.sha256()
    for tensor in (embeds, pooled):
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class DamagedCacheError(UserError):
    """A prompt-embedding cache file that cannot be read as written (truncated, overwritten, without its hashes)."""


class PrecomputedEmbeddings:
    """Every prompt's embeddings in one safetensors file, read row by row (memory-mapped) on the CPU. Each row is
    checked against its SHA-256 when read; one that differs is encoded again by `repair` (a warning names the file
    and the prompt), or raises `DamagedCacheError` without `repair`."""

    def __init__(self, path: Path, repair: Callable[[str], tuple[torch.Tensor, torch.Tensor]] | None = None):
        self.path, self.repair = path, repair
        self.repaired: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            metadata = self._file.metadata() or {}
            texts, self.digests = json.loads(metadata["texts"]), json.loads(metadata["sha256"])
            rows = self._file.get_slice("prompt_embeds").get_shape()[0]
            pooled_rows = self._file.get_slice("pooled_prompt_embeds").get_shape()[0]
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as error:
            raise DamagedCacheError(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                                    ) from None
        if not len(texts) == len(self.digests) == rows == pooled_rows:
            raise DamagedCacheError(f"{len(texts)} prompts, {len(self.digests)} hashes and {rows} / {pooled_rows} rows")
        self.row = {text: index for index, text in enumerate(texts)}

    def __contains__(self, text: str) -> bool:
        return text in self.row

    def __getitem__(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        if text not in self.row:
            raise KeyError(f"{text!r} was not precomputed into {self.path}")
        if text in self.repaired:
            return self.repaired[text]
        index = self.row[text]
        try:
            embeds = self._file.get_slice("prompt_embeds")[index]
            pooled = self._file.get_slice("pooled_prompt_embeds")[index]
            intact = row_digest(embeds, pooled) == self.digests[index]
        except (SafetensorError, OSError) as error:  # the file changed under the run
            intact, embeds, pooled = False, None, error
        if intact:
            return embeds, pooled
        if self.repair is None:
            raise DamagedCacheError(f"the row of {text!r} in {self.path} differs from what was written")
        logger.warning("the prompt-embedding cache %s holds a damaged row (the prompt %r): encoded again for this run; "
                       "delete the file to rebuild it", self.path, text[:80])
        self.repaired[text] = self.repair(text)
        return self.repaired[text]


def precompute(pipe, texts: Iterable[str], cache_dir: Path, max_sequence_length: int,
               is_main_process: bool = True) -> PrecomputedEmbeddings:
    """Encode every distinct text (and the negative prompt) once into `<cache_dir>/<key>.safetensors`, unless that
    file exists; the key is a hash of `encoder_fingerprint` and the texts. Only the main process writes (call it
    inside `main_process_first`); the file is written under a temporary name and renamed, so a killed run never
    leaves a partial cache. A file that cannot be read as written (`DamagedCacheError`) is set aside as
    `<name>.damaged` and rebuilt, with one warning; a folder that takes no file stops the run with one line."""
    distinct = sorted(set(texts) | {NEGATIVE_PROMPT})
    key = hashlib.sha256((encoder_fingerprint(pipe, max_sequence_length) + json.dumps(distinct)).encode())
    path = cache_dir / f"{key.hexdigest()[:24]}.safetensors"

    def repair(text: str) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_one(pipe, text, max_sequence_length, "cpu")

    if path.is_file():
        try:
            store = PrecomputedEmbeddings(path, repair)
            logger.info("prompt embeddings of %d prompts from %s", len(distinct), path)
            return store
        except DamagedCacheError as error:
            if not is_main_process:
                raise RuntimeError(f"the main process did not rebuild {path}: {error}") from None
            logger.warning("the prompt-embedding cache %s cannot be read as written (%s): rebuilding it; the old file "
                           "is kept as %s.damaged", path, error, path.name)
            os.replace(path, path.with_name(f"{path.name}.damaged"))
    if not is_main_process:
        raise RuntimeError(f"the main process did not write {path}")
    rows = [encode_one(pipe, text, max_sequence_length, "cpu")
            for text in tqdm(distinct, desc="prompt embeddings", leave=False)]
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        save_file({"prompt_embeds": torch.stack([r[0] for r in rows]).contiguous(),
                   "pooled_prompt_embeds": torch.stack([r[1] for r in rows]).contiguous()},
                  str(partial), metadata={"texts": json.dumps(distinct),
                                          "sha256": json.dumps([row_digest(*row) for row in rows])})
        partial.rename(path)
    except (OSError, SafetensorError) as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot write the prompt-embedding cache {path}: {getattr(error, 'strerror', None) or error}; "
                        f"free space there or set model.prompt_embeds_cache=<a writable folder>") from None
    logger.info("prompt embeddings of %d prompts computed once into %s", len(distinct), path)
    return PrecomputedEmbeddings(path, repair)
