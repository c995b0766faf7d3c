"""A complete SD3 pipeline with random weights, small enough to train and sample on a CPU in seconds.

Every component is the real diffusers / transformers class that a real SD3 / SD3.5 checkpoint loads into, so the code
paths exercised here (text encoding, MMDiT forward, scheduler, VAE decode, LoRA injection, saving and loading) are the
ones used at full scale. Only the widths are small. The tokenizers are real too:

- the two CLIP tokenizers are built from the BPE vocabulary that open_clip ships, which is OpenAI's CLIP vocabulary, so
  they give the same token ids as `openai/clip-vit-large-patch14`'s tokenizer;
- the T5 tokenizer is a small Unigram (SentencePiece-style) model trained with `tokenizers` on the project's prompt
  files, laid out like T5's (`<pad>`=0, `</s>`=1, `<unk>`=2).

Build it with `build_tiny_pipeline(seed)`; save it as an ordinary diffusers folder with `scripts/save_tiny_model.py`.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

PROMPT_DIR = Path(__file__).resolve().parents[1] / "assets" / "prompts"

# Sizes of the tiny world. Images are 32x32; the VAE halves that into 16 latent channels of 16x16 (as SD3, 16 channels);
# the MMDiT patchifies latents 2x2 into 64 tokens.
IMAGE_SIZE = 32
LATENT_CHANNELS = 16
CLIP_WIDTH = 32  # two CLIP encoders: concatenated hidden states are 64 wide, pooled outputs 2 x 32 = 64
T5_WIDTH = 64  # = joint_attention_dim; must be >= the concatenated CLIP width, which SD3 zero-pads up to it
T5_VOCAB_SIZE = 1000

# The tiny transformer and VAE: the real classes with small widths (pipelines/geometry.py reads their sizes here).
TRANSFORMER_CONFIG = dict(
    sample_size=IMAGE_SIZE // 2,
    patch_size=2,
    in_channels=LATENT_CHANNELS,
    out_channels=LATENT_CHANNELS,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    caption_projection_dim=32,  # = num_attention_heads * attention_head_dim, as in every SD3 checkpoint
    joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=2 * CLIP_WIDTH,
    pos_embed_max_size=16,
    dual_attention_layers=(0,),  # SD3.5-Medium's MMDiT-X blocks
    qk_norm="rms_norm",  # SD3.5's QK normalisation
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(16, 32),
    layers_per_block=1,
    latent_channels=LATENT_CHANNELS,
    norm_num_groups=8,
    sample_size=IMAGE_SIZE,
    # SD3's VAE values; like SD3 it has no quant convs.
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


@lru_cache(maxsize=1)
def _clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """OpenAI CLIP's BPE vocabulary in Hugging Face's `vocab.json` / `merges.txt` layout.

    The vocabulary is byte-level BPE: the 256 byte symbols, the same with an end-of-word marker, one entry per merge,
    then the two special tokens; 49408 entries, exactly as in `openai/clip-vit-large-patch14`.
    """
    import open_clip

    vocab_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(vocab_path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the first line is a version header; CLIP keeps 48894 merges
    byte_symbols = list(_bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


def _bytes_to_unicode() -> dict[int, str]:
    # Adapted from open_clip.tokenizer.bytes_to_unicode: printable stand-ins for the 256 byte values, in CLIP's order.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values, characters = printable[:], printable[:]
    extra = 0
    for b in range(256):
        if b not in byte_values:
            byte_values.append(b)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, (chr(c) for c in characters), strict=True))


def build_clip_tokenizer() -> CLIPTokenizer:
    """A `CLIPTokenizer` with OpenAI CLIP's real vocabulary, built offline from open_clip's copy of it."""
    vocab, merges = _clip_vocab_and_merges()
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], model_max_length=77)


# The prompt files the tiny T5 tokenizer is trained on. A fixed list, so that adding a prompt set never changes the
# tiny model's tokenizer (and with it every result obtained with the tiny model).
T5_CORPUS = ("activities.txt", "digits_eval.txt", "digits_train.txt", "imagenet_classes.txt", "ocr_test.txt",
             "simple_animals.txt", "geneval_test_metadata.jsonl")


def _prompt_corpus() -> list[str]:
    texts = []
    for name in sorted(n for n in T5_CORPUS if n.endswith(".txt")):
        texts += [line.strip() for line in (PROMPT_DIR / name).read_text().splitlines() if line.strip()]
    for name in sorted(n for n in T5_CORPUS if n.endswith(".jsonl")):
        texts += [json.loads(line)["prompt"] for line in (PROMPT_DIR / name).read_text().splitlines() if line.strip()]
    return texts


@lru_cache(maxsize=4)
def _t5_vocab(vocab_size: int) -> tuple[tuple[str, float], ...]:
    from tokenizers import SentencePieceUnigramTokenizer

    trainer_tokenizer = SentencePieceUnigramTokenizer()
    trainer_tokenizer.train_from_iterator(
        _prompt_corpus(), vocab_size=vocab_size - 3, special_tokens=[], unk_token=None, show_progress=False
    )
    pieces = json.loads(trainer_tokenizer.to_str())["model"]["vocab"]
    # Training runs in parallel: every process gets the same pieces, but rare characters come back in another order
    # (their scores are a floor minus 1e-4 per place) and scores differ in the last digits, which would give a piece
    # another id. Scores rounded to 1e-3, then the piece itself, fix the order and so the ids.
    pieces = sorted(((p, round(float(s), 3)) for p, s in pieces), key=lambda item: (-item[1], item[0]))
    return tuple([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + pieces)


def build_t5_tokenizer(vocab_size: int = T5_VOCAB_SIZE) -> T5Tokenizer:
    """A small T5-layout Unigram tokenizer trained on the shipped prompt files (deterministic)."""
    return T5Tokenizer(vocab=list(_t5_vocab(vocab_size)), extra_ids=0, model_max_length=512)


def build_tiny_components(seed: int = 0, clip_widths: tuple[int, int] = (CLIP_WIDTH, CLIP_WIDTH)) -> dict:
    """The components of a tiny SD3.5-style pipeline, as `StableDiffusion3Pipeline(**components)` expects.

    The weights depend only on `seed`; the global RNG state is left untouched. `clip_widths` are the two CLIP
    encoders' widths (summing to 2 x CLIP_WIDTH, the transformer's pooled width): unequal ones, as SD3's 768 and 1280,
    let a single-file checkpoint tell CLIP-L from CLIP-G by width, as diffusers' `from_single_file` does.
    """
    if sum(clip_widths) != 2 * CLIP_WIDTH:
        raise ValueError(f"the CLIP widths must sum to {2 * CLIP_WIDTH} (the pooled width), got {clip_widths}")
    clip_tokenizer = build_clip_tokenizer()
    t5_tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(**TRANSFORMER_CONFIG)
        vae = AutoencoderKL(**VAE_CONFIG)
        text_encoders = []
        for width in clip_widths:
            config = CLIPTextConfig(
                vocab_size=clip_tokenizer.vocab_size,
                hidden_size=width,
                intermediate_size=64,
                projection_dim=width,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=77,
                hidden_act="gelu",
                bos_token_id=clip_tokenizer.bos_token_id,
                eos_token_id=clip_tokenizer.eos_token_id,
                pad_token_id=clip_tokenizer.pad_token_id,
            )
            text_encoders.append(CLIPTextModelWithProjection(config))
        t5_config = T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=T5_WIDTH,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",  # T5 v1.1, as SD3's t5-v1_1-xxl
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
            decoder_start_token_id=t5_tokenizer.pad_token_id,
        )
        text_encoder_3 = T5EncoderModel(t5_config)
    for module in (transformer, vae, *text_encoders, text_encoder_3):
        module.eval()
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "vae": vae,
        "text_encoder": text_encoders[0],
        "tokenizer": clip_tokenizer,
        "text_encoder_2": text_encoders[1],
        "tokenizer_2": build_clip_tokenizer(),
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": t5_tokenizer,
        "image_encoder": None,
        "feature_extractor": None,
    }
