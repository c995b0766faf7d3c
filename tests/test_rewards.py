"""Reward models: the contract, the real LAION head, gradients, batching, JPEG, multi-rewards, preprocessing."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from open_clip.transform import image_transform
from safetensors.torch import load_file, save_file
from skimage import data
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from pipelines.configs import build
from pipelines.hub import ModelLoadError
from pipelines.tiny import build_clip_tokenizer
from rewards import RewardInputError
from rewards.aesthetic import AestheticReward, improved_head, load_head_file
from rewards.clip_model import ClipModel
from rewards.clip_similarity import ClipSimilarityReward
from rewards.jpeg import JpegSizeReward, jpeg_size_kb
from rewards.multi import MultiReward
from rewards.preprocess import clip_preprocess

ROOT = Path(__file__).resolve().parents[1]
REAL_HEAD = ROOT / "assets" / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]


def photo(name: str, size: int | None = 64) -> torch.Tensor:
    image = PIL.Image.fromarray(getattr(data, name)()).convert("RGB")
    if size:
        image = image.resize((size, size), PIL.Image.BICUBIC)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


@pytest.fixture(scope="module")
def photos():
    return torch.stack([photo(name) for name in PHOTOS])


PROMPTS = ["an astronaut", "a cup of coffee", "a cat", "a rocket"]


@pytest.fixture(scope="module")
def tiny_clip_768():
    torch.manual_seed(0)
    return ClipModel("open_clip", "tiny-ViT-768", pretrained=None)


@pytest.fixture(scope="module")
def tiny_hf_clip_dir(tmp_path_factory):
    """A tiny random transformers CLIPModel saved with a real-vocabulary tokenizer and an image processor."""
    folder = tmp_path_factory.mktemp("hf_clip")
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, vocab_size=49408, bos_token_id=49406, eos_token_id=49407),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=64,
    )
    CLIPModel(config).save_pretrained(folder)
    build_clip_tokenizer().save_pretrained(folder)
    CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224}).save_pretrained(folder)
    return folder


def real_head_linear_map():
    """The improved predictor has no activations, so it is x -> A x + c; compose A and c from the file by hand."""
    sd = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    matrix, offset = torch.eye(768, dtype=torch.float64), torch.zeros(768, dtype=torch.float64)
    for i in (0, 2, 4, 6, 7):
        w, b = sd[f"layers.{i}.weight"].double(), sd[f"layers.{i}.bias"].double()
        matrix, offset = w @ matrix, w @ offset + b
    return matrix, offset


def test_real_laion_head_computes_its_documented_linear_map():
    head = load_head_file(str(REAL_HEAD)).eval()
    matrix, offset = real_head_linear_map()
    embeds = torch.nn.functional.normalize(torch.randn(5, 768), dim=-1)
    expected = embeds.double() @ matrix.T + offset
    torch.testing.assert_close(head(embeds).double(), expected, atol=1e-5, rtol=1e-5)
    assert matrix.shape == (1, 768)


def test_shipped_head_by_name_equals_the_file():
    by_name = load_head_file("sac+logos+ava1-l14-linearMSE.pth")
    by_path = load_head_file(str(REAL_HEAD))
    assert all(torch.equal(a, b)
               for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values(), strict=True))


def test_head_file_with_wrong_keys_names_the_expected_format(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 768), "fc.bias": torch.zeros(1)}, bad)
    with pytest.raises(ModelLoadError,
                       match=r"expected an improved-aesthetic-predictor MLP \(keys layers.\{0,2,4,6,7\}"):
        load_head_file(str(bad))
    torch.save(torch.zeros(3), bad)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        load_head_file(str(bad))
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="cannot read aesthetic head"):
        load_head_file(str(bad))
    with pytest.raises(ModelLoadError, match="no such file"):
        load_head_file(str(tmp_path / "missing.pth"))


def test_tiny_clip_tower_with_the_real_head_gives_finite_scores(tiny_clip_768, photos):
    reward = AestheticReward(clip=tiny_clip_768, head=str(REAL_HEAD))
    scores, _ = reward(photos, PROMPTS)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    # The score is the head's linear map of the normalised CLIP embedding.
    embeds = torch.nn.functional.normalize(tiny_clip_768.embed_images(photos), dim=-1)
    matrix, offset = real_head_linear_map()
    torch.testing.assert_close(scores.double(), (embeds.double() @ matrix.T + offset).squeeze(-1), atol=1e-4, rtol=0)


def test_v1_linear_head(tmp_path, tiny_clip_768, photos):
    linear = torch.nn.Linear(768, 1)
    torch.save(linear.state_dict(), tmp_path / "sa_0_4_vit_l_14_linear.pth")
    reward = AestheticReward(clip=tiny_clip_768, head=str(tmp_path / "sa_0_4_vit_l_14_linear.pth"))
    embeds = torch.nn.functional.normalize(tiny_clip_768.embed_images(photos), dim=-1)
    torch.testing.assert_close(reward(photos, PROMPTS)[0], linear(embeds).squeeze(-1).detach(), atol=1e-5, rtol=0)


def test_hugging_face_predictor_folder(tmp_path, photos):
    """shunk031/aesthetics-predictor-v2 layout: a CLIPVisionModelWithProjection whose weights also hold `layers.*`."""
    torch.manual_seed(0)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=224,
        patch_size=32, projection_dim=768))
    vision.save_pretrained(tmp_path)
    CLIPImageProcessor(crop_size={"height": 224, "width": 224}).save_pretrained(tmp_path)
    head = improved_head(768)
    weights = load_file(tmp_path / "model.safetensors")
    weights.update({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()})
    save_file(weights, tmp_path / "model.safetensors")

    reward = AestheticReward(head=str(tmp_path))
    pixels = clip_preprocess(photos)
    embeds = vision.visual_projection(vision.vision_model(pixel_values=pixels).pooler_output)
    expected = head.eval()(torch.nn.functional.normalize(embeds, dim=-1)).squeeze(-1)
    torch.testing.assert_close(reward(photos, PROMPTS)[0], expected.detach(), atol=1e-5, rtol=0)


def differentiable_rewards(tiny_clip_768, tiny_hf_clip_dir):
    torch.manual_seed(1)
    open_clip_1024 = ClipModel("open_clip", "tiny-ViT-1024", pretrained=None)
    hf_clip = ClipModel("hf", str(tiny_hf_clip_dir))
    aesthetic = AestheticReward(clip=tiny_clip_768, head=str(REAL_HEAD))
    return {
        "aesthetic": aesthetic,
        "clip_score": ClipSimilarityReward(tiny_clip_768, scale=2.5, clamp_negative=False),
        "pickscore_style_hf": ClipSimilarityReward(hf_clip, scale=1 / 26, use_logit_scale=True),
        "hpsv2_style_open_clip": ClipSimilarityReward(open_clip_1024),
        "multi": MultiReward({"a": aesthetic, "c": ClipSimilarityReward(hf_clip)}, {"a": 0.3, "c": 0.7}),
    }


def test_differentiable_rewards_give_finite_nonzero_gradients_on_images(tiny_clip_768, tiny_hf_clip_dir, photos):
    for name, reward in differentiable_rewards(tiny_clip_768, tiny_hf_clip_dir).items():
        assert reward.differentiable, name
        images = photos.clone().requires_grad_(True)
        scores, _ = reward(images, PROMPTS)
        scores.sum().backward()
        assert torch.isfinite(images.grad).all(), name
        assert images.grad.abs().sum() > 0, name
        assert all(p.grad is None for p in reward.parameters()), f"{name}: reward weights must stay frozen"


def test_batch_and_one_at_a_time_agree(tiny_clip_768, tiny_hf_clip_dir, photos):
    rewards = differentiable_rewards(tiny_clip_768, tiny_hf_clip_dir)
    rewards["jpeg"] = JpegSizeReward()
    for name, reward in rewards.items():
        with torch.no_grad():
            batch, _ = reward(photos, PROMPTS)
            single = torch.cat([reward(photos[i : i + 1], PROMPTS[i : i + 1])[0] for i in range(len(PROMPTS))])
        torch.testing.assert_close(batch, single, atol=1e-4, rtol=1e-4, msg=name)


def test_clip_similarity_matches_a_hand_computation(tiny_clip_768, photos):
    reward = ClipSimilarityReward(tiny_clip_768, scale=2.5, clamp_negative=True)
    with torch.no_grad():
        image = tiny_clip_768.embed_images(photos)
        text = tiny_clip_768.embed_texts(PROMPTS)
        cosine = (image * text).sum(-1) / (image.norm(dim=-1) * text.norm(dim=-1))
        scores, info = reward(photos, PROMPTS)
    torch.testing.assert_close(scores, 2.5 * cosine.clamp(min=0), atol=1e-5, rtol=0)
    torch.testing.assert_close(info["cosine"], cosine, atol=1e-5, rtol=0)


def test_jpeg_compressibility_ranks_flat_above_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise, photo("astronaut")[None]])
    compress, info = JpegSizeReward(compressible=True)(images, ["", "", ""])
    assert compress[0] > compress[2] > compress[1]
    incompress, _ = JpegSizeReward(compressible=False)(images, ["", "", ""])
    torch.testing.assert_close(incompress, -compress)
    torch.testing.assert_close(info["jpeg_kb"], incompress)
    assert not JpegSizeReward.differentiable
    # The size is the byte count of the quality-95 JPEG the PIL encoder writes, in kB.
    import io

    buffer = io.BytesIO()
    PIL.Image.fromarray((noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
        buffer, format="JPEG", quality=95)
    assert jpeg_size_kb(noise[0]) == buffer.tell() / 1000
    assert JpegSizeReward(scale=0.002)(noise, [""])[0].item() == pytest.approx(-buffer.tell() / 1000 * 0.002)


def test_multi_reward_is_the_weighted_sum_of_its_parts(tiny_clip_768, photos):
    aesthetic = AestheticReward(clip=tiny_clip_768, head=str(REAL_HEAD))
    clip_score = ClipSimilarityReward(tiny_clip_768, scale=100)
    jpeg = JpegSizeReward(scale=0.01)
    multi = MultiReward({"aesthetic": aesthetic, "clip_score": clip_score, "jpeg": jpeg},
                        {"aesthetic": 0.3, "clip_score": 0.7, "jpeg": 2.0})
    with torch.no_grad():
        total, info = multi(photos, PROMPTS)
        parts = {name: r(photos, PROMPTS)[0] for name, r in [("aesthetic", aesthetic), ("clip_score", clip_score),
                                                              ("jpeg", jpeg)]}
    torch.testing.assert_close(total, 0.3 * parts["aesthetic"] + 0.7 * parts["clip_score"] + 2.0 * parts["jpeg"])
    for name, scores in parts.items():
        torch.testing.assert_close(info[name], scores)
    assert "jpeg/jpeg_kb" in info and "clip_score/cosine" in info
    assert not multi.differentiable  # JPEG has no gradient
    with pytest.raises(ValueError, match="must name exactly the components"):
        MultiReward({"aesthetic": aesthetic}, {"aesthetic": 1.0, "jpeg": 1.0})


@pytest.mark.parametrize(
    "images, prompts, message",
    [
        (torch.zeros(0, 3, 32, 32), [], "batch of images is empty"),
        (torch.full((2, 3, 32, 32), float("nan")), ["a", "b"], "NaN"),
        (torch.zeros(2, 32, 32, 3), ["a", "b"], "NCHW with 3 channels"),
        (torch.zeros(3, 32, 32), ["a"], "NCHW with 3 channels"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), ["a", "b"], "float tensor"),
        (torch.full((2, 3, 32, 32), -1.0), ["a", "b"], r"in \[0, 1\].*\[-1, 1\]"),
        (torch.zeros(2, 3, 32, 32), ["a"], "1 prompts for 2 images"),
        (torch.zeros(2, 3, 32, 32), "a cat", "a single string"),
        ("not a tensor", ["a"], "torch.Tensor"),
    ],
)
def test_bad_inputs_get_clear_errors(images, prompts, message):
    with pytest.raises(RewardInputError, match=message):
        JpegSizeReward()(images, prompts)


def test_preprocessing_matches_the_pil_pipeline_on_real_photos():
    reference = image_transform(224, is_train=False)  # open_clip's (= OpenAI CLIP's) PIL preprocessing
    for name in PHOTOS:
        image = photo(name, size=None)
        pil = PIL.Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        ours = clip_preprocess(image[None])[0]
        assert ours.shape == (3, 224, 224)
        assert (reference(pil) - ours).abs().mean() < 0.01, name  # PIL rounds to 8 bits; torch does not


def test_preprocessing_is_differentiable():
    images = torch.rand(2, 3, 32, 48, requires_grad=True)
    clip_preprocess(images).square().sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_open_clip_checkpoint_file_loads_like_hpsv2(tmp_path):
    """HPSv2 ships a whole-model checkpoint under a `state_dict` key; open_clip loads it from a local file."""
    torch.manual_seed(3)
    source = ClipModel("open_clip", "tiny-ViT-1024", pretrained=None)
    torch.save({"state_dict": source.model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    loaded = ClipModel("open_clip", "tiny-ViT-1024", pretrained=str(tmp_path / "HPS_v2.1_compressed.pt"))
    for key, value in source.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[key], value, rtol=0, atol=0)


def test_weights_that_cannot_be_had_fail_at_once(monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="clip.pretrained=DIR/open_clip_pytorch_model.bin"):
        ClipModel("open_clip", "ViT-L-14", pretrained="openai")
    with pytest.raises(ModelLoadError, match="clip.model=DIR"):
        ClipModel("hf", "yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    with pytest.raises(ModelLoadError, match="clip.pretrained=<local file>"):
        ClipModel("open_clip", "ViT-H-14", pretrained="xswu/HPSv2/HPS_v2.1_compressed.pt")
    with pytest.raises(ModelLoadError, match="no pretrained tag"):
        ClipModel("open_clip", "ViT-L-14", pretrained="nonsense")
    with pytest.raises(ModelLoadError, match="unknown open_clip model"):
        ClipModel("open_clip", "ViT-Q-99", pretrained=None)


# Overrides that swap each shipped reward config's weights for tiny random ones, keeping its code path.
TINY_OVERRIDES = {
    "aesthetic": ["reward.clip.model=tiny-ViT-768", "reward.clip.pretrained=null"],
    "clip_score": ["reward.clip.backend=open_clip", "reward.clip.model=tiny-ViT-768", "reward.clip.pretrained=null"],
    "pickscore": ["reward.clip.backend=open_clip", "reward.clip.model=tiny-ViT-1024", "reward.clip.pretrained=null",
                  "reward.clip.processor=null"],
    "hpsv2": ["reward.clip.model=tiny-ViT-1024", "reward.clip.pretrained=null"],
    "multi": ["reward.components.aesthetic.clip.model=tiny-ViT-768", "reward.components.aesthetic.clip.pretrained=null",
              "reward.components.clip_score.clip.backend=open_clip",
              "reward.components.clip_score.clip.model=tiny-ViT-768",
              "reward.components.clip_score.clip.pretrained=null"],
    "jpeg_compressibility": [],
    "jpeg_incompressibility": [],
}
REWARD_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "reward").glob("*.yaml"))


@pytest.mark.parametrize("name", REWARD_CONFIGS)
def test_every_reward_config_builds_and_scores(name, photos, tmp_path):
    overrides = list(TINY_OVERRIDES.get(name, []))
    if name == "geneval":  # a tiny random Mask2Former written where the hub's would be
        from test_geneval_reward import save_tiny_mask2former

        overrides += [f"reward.detector={save_tiny_mask2former(tmp_path / 'detector')}",
                      "reward.clip.model=tiny-ViT-768", "reward.clip.pretrained=null"]
    if name == "remote":  # the JPEG reward served in this process
        from test_remote_reward import serve_in_thread

        server, url = serve_in_thread(JpegSizeReward())
        overrides.append(f"reward.url={url}")
    if name == "vlm_judge":  # a stand-in of an OpenAI-compatible judge
        from test_vlm_judge import StubJudge

        stub = StubJudge()
        server, url = stub.server, stub.url
        overrides.append(f"reward.url={url}")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"reward={name}", *overrides])
    if name == "imagereward":
        pytest.importorskip("ImageReward", reason="the optional image-reward package is not installed")
    reward = build(cfg.reward)
    prompts = [f"a handwritten digit {n}" for n in range(4)] if name.startswith("digits") else PROMPTS  # a digit each
    metadata = None
    if name == "ocr":  # the text to render, in quotes
        prompts = [f'a sign that says "{word}"' for word in ("cat", "dog", "fish", "bird")]
    if name == "geneval":  # GenEval's metadata with each prompt
        lines = (ROOT / "assets/prompts/geneval_test_metadata.jsonl").read_text().splitlines()[:4]
        metadata = [json.loads(line) for line in lines]
        prompts = [m["prompt"] for m in metadata]
    if name == "digits_bolder":  # an image-to-image reward: each prompt's source image (here the photographs)
        metadata = []
        for i, photo in enumerate(photos):
            path = tmp_path / f"source_{i}.png"
            PIL.Image.fromarray((photo.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(path)
            metadata.append({"image": str(path)})
    scores, _ = reward(photos, prompts, metadata)
    if name in ("remote", "vlm_judge"):
        server.shutdown()
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    not_differentiable = ("jpeg_compressibility", "jpeg_incompressibility", "ocr", "geneval", "remote", "vlm_judge")
    assert reward.differentiable == (name not in not_differentiable)
    assert get_class(cfg.reward._target_).differentiable or name.startswith(("multi", *not_differentiable))


def test_imagereward_without_its_package_says_how_to_install():
    try:
        import ImageReward  # noqa: F401
    except ImportError:
        from rewards.imagereward import ImageRewardReward

        with pytest.raises(ModelLoadError, match="pip install image-reward"):
            ImageRewardReward()
    else:
        pytest.skip("image-reward is installed here; its missing-package error cannot be shown")


def run_score(*args):
    return subprocess.run([sys.executable, "-m", "rewards.score", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_score_cli_prints_one_json_line_per_image(tmp_path):
    for name in ("astronaut", "coffee"):
        PIL.Image.fromarray(getattr(data, name)()).resize((48, 48)).save(tmp_path / f"{name}.png")
    PIL.Image.fromarray(np.full((48, 48, 3), 128, np.uint8)).save(tmp_path / "flat.png")
    result = run_score("reward=jpeg_compressibility", f"images={tmp_path}", "prompt=a photo")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["image"]).name for r in lines] == ["astronaut.png", "coffee.png", "flat.png"]
    assert all(r["prompt"] == "a photo" and r["score"] == -r["jpeg_kb"] for r in lines)
    assert lines[2]["score"] > lines[0]["score"]

    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = run_score("reward=aesthetic", f"images={tmp_path}")  # fails on the image, before loading any weights
    assert result.returncode == 2
    assert (result.stderr.strip().splitlines()[-1].startswith("error: cannot read image")
            and "broken.png" in result.stderr)


@pytest.mark.parametrize("backend", ["open_clip", "hf"])
def test_a_clip_reward_in_bf16_scores_as_in_float32_within_a_stated_tolerance(backend, photos, tiny_hf_clip_dir):
    """`reward.clip.dtype=bfloat16`: half the memory. On the tiny random CLIPs and the skimage photographs the
    PickScore-style scores (logit_scale x cosine) stay within 3% of the largest score (measured: 1.1% for open_clip),
    the photographs rank the same for each prompt, and gradients still reach the images (ReFL)."""
    def clip(dtype):
        torch.manual_seed(0)
        if backend == "open_clip":
            return ClipModel("open_clip", "tiny-ViT-768", pretrained=None, dtype=dtype)
        return ClipModel("hf", str(tiny_hf_clip_dir), dtype=dtype)

    scores = {}
    for dtype in ("float32", "bfloat16"):
        reward = ClipSimilarityReward(clip(dtype), use_logit_scale=True)
        assert reward.clip.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        scores[dtype] = torch.stack([reward(photos, [prompt] * len(photos))[0] for prompt in PROMPTS])
    full, half = scores["float32"], scores["bfloat16"]
    assert half.dtype == torch.float32
    assert (half - full).abs().max() <= 0.03 * full.abs().max()
    assert torch.equal(half.argsort(dim=1), full.argsort(dim=1))
    images = photos.clone().requires_grad_(True)
    ClipSimilarityReward(clip("bfloat16"), use_logit_scale=True)(images, PROMPTS)[0].sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    with pytest.raises(ModelLoadError, match="clip.dtype must be one of"):
        clip("float8")


def test_score_help_lists_its_options_and_every_reward_not_the_training_groups():
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "rewards.score", "--help"], capture_output=True, text=True, timeout=300,
                         cwd=root, check=True).stdout
    listed = {line.split()[0] for line in out.split("Rewards (reward=<name>; conf/reward/):")[1].splitlines() if line}
    assert listed == {p.stem for p in (root / "conf" / "reward").glob("*.yaml")}
    assert "images:" in out and "prompts_file:" in out
    assert "algo" not in out and "experiment" not in out and "lora" not in out
