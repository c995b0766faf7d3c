"""Publishing a run: the model card (rl/model_card.py) and `python -m experiments.push` (one line without a token or the
network; the upload itself with huggingface_hub's API replaced by a recorder, since the hub cannot be reached here)."""

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import ModelCard

from experiments import push
from rl.model_card import held_out, license_of, write_model_card

ROOT = Path(__file__).resolve().parents[1]


def fake_run(run_dir: Path, model: dict, algo: dict | None = None, lora: bool = True) -> dict:
    """A finished run's files, as rl.run leaves them (metrics, a sample grid, final/)."""
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "samples").mkdir()
    (run_dir / "samples" / "step_000004.png").write_bytes(b"png 4")
    (run_dir / "samples" / "step_000000.png").write_bytes(b"png 0")
    weights = "pytorch_lora_weights.safetensors" if lora else "model_index.json"
    (run_dir / "final" / weights).write_bytes(b"weights")
    records = [{"step": 0, "eval/reward_mean": 0.25, "eval/correct_mean": 0.5},
               {"step": 2, "train/samples": 64, "train/seconds": 10.4, "eval/reward_mean": 0.75},
               {"step": 4, "train/samples": 128, "train/seconds": 20.6, "eval/reward_mean": 0.5,
                "eval/correct_mean": 0.875}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {"seed": 3, "model": model, "reward": {"_target_": "rewards.digits.DigitReward"},
              "algo": {"_target_": "rl.grpo.GRPO", "optim": {"lr": 3e-4}, "lora": {"rank": 8, "alpha": 16},
                       **(algo or {})}}
    (run_dir / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return config


def test_the_model_card_parses_and_says_what_was_trained(tmp_path):
    config = fake_run(tmp_path, {"_target_": "pipelines.load_pipeline",
                                 "path": "stabilityai/stable-diffusion-3.5-medium"})
    card = ModelCard.load(write_model_card(tmp_path, config, example_prompt="a red cube"))
    data = card.data
    assert data.base_model == "stabilityai/stable-diffusion-3.5-medium" and data.library_name == "diffusers"
    assert (data.license, data.license_name) == ("other", "stabilityai-ai-community")
    assert {"lora", "rl-grpo", "stable-diffusion-3"} <= set(data.tags) and data.algorithm == "grpo"
    assert "| eval/reward_mean | 0.2500 | 0.5000 | 0.7500 |" in card.text  # start, end, max
    assert "| eval/correct_mean | 0.5000 | 0.8750 | 0.8750 |" in card.text
    assert "- sampled training images: 128" in card.text and "- learning rate: 0.0003" in card.text
    assert "pipe.load_lora_weights" in card.text and "pipe('a red cube')" in card.text
    # diffusers' file by name; the ComfyUI file, which diffusers would load nothing from, only for ComfyUI
    assert 'weight_name="pytorch_lora_weights.safetensors"' in card.text
    assert "Do not pass it to diffusers" in card.text
    assert (tmp_path / "final" / "samples.png").read_bytes() == b"png 4"  # the last grid


def test_a_dreambooth_card_carries_the_trigger_and_a_full_fine_tune_loads_whole(tmp_path):
    config = fake_run(tmp_path, {"_target_": "pipelines.load_pipeline", "path": None},
                      algo={"_target_": "rl.dreambooth.DreamBooth", "instance_prompt": "a photo of sks dog"},
                      lora=False)
    card = ModelCard.load(write_model_card(tmp_path, config))
    assert card.data.instance_prompt == "a photo of sks dog" and card.data.base_model is None
    assert card.data.license == "apache-2.0"  # the tiny model is this project's
    assert "from_pretrained(\"THIS_REPO_OR_FOLDER\"" in card.text and "lora" not in card.data.tags


def test_an_image_to_image_card_loads_with_the_img2img_pipeline(tmp_path):
    config = fake_run(tmp_path, {"_target_": "pipelines.load_pipeline", "path": None},
                      algo={"sampling": {"strength": 0.6}})
    card = ModelCard.load(write_model_card(tmp_path, config, example_prompt="a handwritten digit 3"))
    assert (card.data.pipeline_tag == "image-to-image"
            and "StableDiffusion3Img2ImgPipeline(**base.components)" in card.text)
    assert "image=source_image, strength=0.6" in card.text


def test_a_local_base_folder_lends_its_own_cards_licence(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: openrail++\n---\n# a base\n")
    assert license_of({"model": {"path": str(base)}}) == ("openrail++", None)
    assert license_of({"model": {"path": str(tmp_path / "elsewhere")}}) == ("other", "see-the-base-model")


def test_held_out_rows_by_hand():
    records = [{"eval/a_mean": 0.1}, {"x": 1}, {"eval/a_mean": 0.3, "eval/a_std": 9}, {"eval/a_mean": 0.2}]
    assert held_out(records) == [("eval/a_mean", 0.1, 0.2, 0.3)]
    with_null = [{"eval/a_mean": None, "nonfinite": ["eval/a_mean"]}, {"eval/a_mean": 0.3}, {"eval/a_mean": None}]
    assert held_out(with_null) == [("eval/a_mean", None, None, 0.3)]
    assert held_out([{"eval/a_mean": None}]) == [("eval/a_mean", None, None, None)]


def test_push_without_a_token_or_offline_stops_in_one_line(tmp_path, monkeypatch):
    fake_run(tmp_path / "run", {"_target_": "pipelines.load_pipeline", "path": None})
    env = {"HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-m", "experiments.push", str(tmp_path / "run"), "--repo", "me/run"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: no Hugging Face token: run `hf auth login` (or set HF_TOKEN) with a token that can write")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(push.PushError, match="HF_HUB_OFFLINE is set: pushing needs the network"):
        push.push(tmp_path / "run", "me/run")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token: (_ for _ in ()).throw(OSError("Network is down")))
    with pytest.raises(push.PushError, match=r"does not answer for this token \(Network is down\); nothing"):
        push.push(tmp_path / "run", "me/run")
    class ReadOnly:
        def __init__(self, token):
            pass

        def create_repo(self, *args, **kwargs):
            raise PermissionError("403 Forbidden: token is read-only\nmore lines")

    monkeypatch.setattr(huggingface_hub, "whoami", lambda token: {"name": "me"})
    monkeypatch.setattr(huggingface_hub, "HfApi", ReadOnly)
    with pytest.raises(push.PushError, match=r"^uploading to me/run failed \(403 Forbidden: token is read-only\)$"):
        push.push(tmp_path / "run", "me/run")
    with pytest.raises(push.PushError, match="not a hub repository id"):
        push.push(tmp_path / "run", "not a repo")
    with pytest.raises(push.PushError, match="has no final/ folder"):
        push.push(tmp_path, "me/run")


def test_push_uploads_final_with_its_card(tmp_path, monkeypatch):
    fake_run(tmp_path / "run", {"_target_": "pipelines.load_pipeline", "path": None})
    calls = []

    class Api:
        def __init__(self, token):
            calls.append(("token", token))

        def create_repo(self, repo, private, exist_ok):
            calls.append(("create", repo, private, exist_ok))
            return f"https://huggingface.co/{repo}"

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id, sorted(p.name for p in Path(folder_path).iterdir())))

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(huggingface_hub, "whoami", lambda token: {"name": "me"})
    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    assert push.push(tmp_path / "run", "me/run", private=True) == "https://huggingface.co/me/run"
    final = str(tmp_path / "run" / "final")
    assert calls == [("token", "hf_x"), ("create", "me/run", True, True),
                     ("upload", final, "me/run", ["README.md", "pytorch_lora_weights.safetensors", "samples.png"])]


@pytest.mark.parametrize("model, loads", [
    ({"_target_": "pipelines.load_pipeline", "path": "stabilityai/stable-diffusion-3.5-medium"},
     ("pipe = StableDiffusion3Pipeline.from_pretrained('stabilityai/stable-diffusion-3.5-medium', "
      "torch_dtype=torch.bfloat16)")),
    ({"_target_": "pipelines.load_pipeline", "path": "/models/sd3.5_medium.safetensors"},
     ("pipe = StableDiffusion3Pipeline.from_single_file('/models/sd3.5_medium.safetensors', "
      "torch_dtype=torch.bfloat16)")),
    ({"_target_": "pipelines.digits.load_digits_pipeline", "world": "data/digits_world"},
     "base = load_digits_pipeline('data/digits_world')\npipe = StableDiffusion3Pipeline(**base.components)"),
    ({"_target_": "pipelines.load_pipeline", "path": None, "tiny_seed": 2}, "base = load_pipeline(None, tiny_seed=2)"),
], ids=["hub", "single file", "digits world", "tiny"])
def test_the_card_says_how_to_load_the_base_a_lora_was_trained_on(tmp_path, model, loads):
    card = ModelCard.load(write_model_card(tmp_path, fake_run(tmp_path, model)))
    assert loads in card.text and "BASE_MODEL" not in card.text
