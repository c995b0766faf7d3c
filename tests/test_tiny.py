"""The tiny offline SD3 world: real tokenizers, seeded weights, and a save / load round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import torch
from diffusers import StableDiffusion3Pipeline

from pipelines.tiny import build_clip_tokenizer, build_t5_tokenizer, build_tiny_components
from rl.prompts import load_prompts
from scripts.save_tiny_model import save_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def test_clip_tokenizer_matches_openai_clip_tokenization():
    tokenizer = build_clip_tokenizer()
    prompts = [p.text for p in load_prompts("simple_animals.txt")]
    prompts += [p.text for p in load_prompts("ocr_test.txt", stop=30)]
    prompts += ["a photo of a cat", "Café crème, 2 × naïve résumés!"]
    for prompt in prompts:
        reference = open_clip.tokenize([prompt])[0]  # open_clip's own BPE implementation of OpenAI CLIP
        reference = reference[reference != 0].tolist()
        assert tokenizer(prompt).input_ids[:77] == reference, prompt
    assert tokenizer.vocab_size == 49408
    # Known ids of OpenAI CLIP's vocabulary: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_t5_tokenizer_has_t5_layout_and_is_deterministic():
    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("a photo of a cat").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    from pipelines import tiny

    vocabulary = tokenizer.get_vocab()
    for _ in range(2):  # retrain from scratch: the same corpus gives the same pieces with the same ids, every time
        tiny._t5_vocab.cache_clear()
        assert build_t5_tokenizer().get_vocab() == vocabulary
    # ... also in another process with another number of threads (training runs in parallel)
    code = ("import json; from pipelines.tiny import build_t5_tokenizer; "
            "print(json.dumps(build_t5_tokenizer().get_vocab()))")
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, cwd=ROOT)
    assert json.loads(other.stdout) == vocabulary


def test_weights_are_a_function_of_the_seed():
    a, b, c = (build_tiny_components(seed)["transformer"].state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_building_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    build_tiny_components(0)
    assert torch.equal(torch.rand(3), expected)


def test_saved_folder_loads_with_stock_diffusers_and_samples_the_same(tiny_pipe, tmp_path):
    save_tiny_model(tmp_path / "tiny", seed=0)
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "tiny")
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=["a cat"], num_inference_steps=3, guidance_scale=4.5, output_type="pt")
    expected = tiny_pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    images = loaded(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
