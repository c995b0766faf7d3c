"""Prompt sets: shipped and user files, JSONL metadata, slicing, templates, clear errors, and the benchmark presets'
training and held-out sets."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from rl.prompts import Prompt, PromptSetError, load_prompts

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_shipped_set_by_name_with_template_and_slice():
    prompts = load_prompts("simple_animals.txt", start=0, stop=3, template="a photo of a {}")
    assert prompts == [Prompt("a photo of a cat"), Prompt("a photo of a dog"), Prompt("a photo of a horse")]


def test_jsonl_keeps_metadata():
    first = load_prompts("geneval_test_metadata.jsonl", stop=1)[0]
    assert first.text == "a photo of two wine glasses"
    assert first.metadata["tag"] == "counting" and first.metadata["include"][0]["count"] == 2


def test_user_file_and_unique(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("a red cube\n\n a blue ball \na red cube\n")
    assert [p.text for p in load_prompts(str(path))] == ["a red cube", "a blue ball"]
    assert len(load_prompts(str(path), unique=False)) == 3


@pytest.mark.parametrize(
    "content, kwargs, message",
    [
        ("\n  \n", {}, "holds no prompts"),
        ("a cat\n", {"start": 5}, r"slice \[5:None\] is empty"),
    ],
)
def test_empty_sets_fail(tmp_path, content, kwargs, message):
    path = tmp_path / "prompts.txt"
    path.write_text(content)
    with pytest.raises(PromptSetError, match=message):
        load_prompts(str(path), **kwargs)


def test_bad_jsonl_and_missing_file_fail(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(PromptSetError, match=r"prompts.jsonl:2: each line needs a string 'prompt' key"):
        load_prompts(str(path))
    path.write_text('{"prompt": "a cat"\n')
    with pytest.raises(PromptSetError, match=r"prompts.jsonl:1: not valid JSON"):
        load_prompts(str(path))
    with pytest.raises(PromptSetError, match="not found"):
        load_prompts(str(tmp_path / "nope.txt"))


@pytest.mark.parametrize("option, train_file, test_file, test_size", [
    ("geneval", "geneval_train_metadata.jsonl", "geneval_test_metadata.jsonl", 553),
    ("ocr", "ocr_train.txt", "ocr_test.txt", 1018),
])
def test_benchmark_sets_train_on_their_own_file_and_hold_out_the_whole_test_set(option, train_file, test_file,
                                                                                 test_size):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"prompts={option}"])
    assert (cfg.prompts.train.file, cfg.prompts.eval.file) == (train_file, test_file)
    train, held_out = instantiate(cfg.prompts.train), instantiate(cfg.prompts.eval)
    assert len(held_out) == test_size  # every distinct test prompt
    assert not {p.text for p in train} & {p.text for p in held_out}
