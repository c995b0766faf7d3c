"""Text rendering as Flow-GRPO scores it: an OCR engine reads the image, and the reward is 1 minus the normalised edit
distance between what it read and the text the prompt puts between double quotes (`rewards/ocr_rule.py` has the
rule). Not differentiable.

Engines (`reward.engine`):

- `rapidocr` (default): PaddleOCR's PP-OCRv4 detection and recognition models as ONNX, shipped inside the
  `rapidocr-onnxruntime` wheel (about 15 MB), run by onnxruntime: offline, nothing to download. Its recogniser is
  PP-OCRv4's Chinese-English one; Flow-GRPO's `PaddleOCR(lang="en")` runs the English one (`paddleocr` below).
  `pip install -e ".[ocr]"`. On a GPU with `onnxruntime-gpu` installed, `reward.device=cuda` runs it there.
- `paddleocr`: a PaddleOCR install, as Flow-GRPO calls it (`PaddleOCR(use_angle_cls=False, lang="en")`, `ocr(image,
  cls=False)`); `reward.model_dir` points at local detection / recognition / classifier model folders (`det`, `rec`,
  `cls` inside it) for machines without internet.
- `tesseract`: the `tesseract` program (Debian / Ubuntu: `apt install tesseract-ocr`), one call per image.

Each engine returns the lines it read with their confidences; the lines with confidence above `min_confidence`
(Flow-GRPO: 0) are joined in reading order without a separator, as Flow-GRPO joins them. PaddleOCR and rapidocr have
already dropped lines below 0.5 (PaddleOCR's `drop_score`, rapidocr's `text_score`, set alike here, with PaddleOCR's
detection settings). Images go to the engines as 8-bit RGB arrays, as Flow-GRPO hands them to PaddleOCR. The engines
read one image at a time. The mean score is what Flow-GRPO reports as *OCR accuracy* (0.59 -> 0.92 on SD3.5 Medium);
`info` also carries `ocr_exact` (1 when the asked text was read in full), the share of images read exactly.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from rewards.base import Reward, RewardInputError
from rewards.ocr_rule import ocr_score, quoted_text

ENGINES = ("rapidocr", "paddleocr", "tesseract")


def to_uint8_arrays(images: torch.Tensor) -> list[np.ndarray]:
    """NCHW float images in [0, 1] -> HWC uint8 RGB arrays (rounded, as a saved image would be)."""
    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [np.ascontiguousarray(array) for array in arrays]


def joined_text(lines: list[tuple[str, float]], min_confidence: float = 0.0) -> str:
    """The lines read with confidence above `min_confidence`, joined in order without a separator."""
    return "".join(text for text, confidence in lines if confidence > min_confidence)


class RapidOcrEngine:
    """rapidocr-onnxruntime's bundled PP-OCR models (no angle classifier, as Flow-GRPO)."""

    def __init__(self, device: str = "cpu"):
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError:
            raise RewardInputError('reward.engine=rapidocr needs rapidocr-onnxruntime: pip install -e ".[ocr]" (or '
                                   "reward.engine=tesseract / paddleocr)") from None
        cuda = device.startswith("cuda")
        # PaddleOCR's detection defaults (rapidocr's own differ: side 736 "min", box 0.5, unclip 1.6); both drop lines
        # read with confidence below 0.5 (rapidocr's text_score, PaddleOCR's drop_score)
        self.model = RapidOCR(use_angle_cls=False, det_use_cuda=cuda, rec_use_cuda=cuda, det_limit_side_len=960,
                              det_limit_type="max", det_box_thresh=0.6, det_unclip_ratio=1.5, text_score=0.5)

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        result, _ = self.model(image, use_cls=False)
        return [(str(text), float(confidence)) for _, text, confidence in (result or [])]


class PaddleOcrEngine:
    """A PaddleOCR install, called as Flow-GRPO calls it."""

    def __init__(self, device: str = "cpu", model_dir: str | None = None):
        try:
            from paddleocr import PaddleOCR
        except ImportError:
            raise RewardInputError("reward.engine=paddleocr needs PaddleOCR 2.x, as Flow-GRPO: pip install "
                                   "paddlepaddle 'paddleocr<3' (or reward.engine=rapidocr, the PP-OCRv4 models on "
                                   "onnxruntime)") from None
        options: dict[str, Any] = {"use_angle_cls": False, "lang": "en", "show_log": False,
                                   "use_gpu": device.startswith("cuda")}
        if model_dir is not None:
            folder = Path(model_dir).expanduser()
            missing = [name for name in ("det", "rec", "cls") if not (folder / name).is_dir()]
            if missing:
                raise RewardInputError(f"reward.model_dir={model_dir} lacks the PaddleOCR model folder(s) "
                                       f"{', '.join(missing)} (expected det/, rec/ and cls/ inside it)")
            options.update(det_model_dir=str(folder / "det"), rec_model_dir=str(folder / "rec"),
                           cls_model_dir=str(folder / "cls"))
        try:
            self.model = PaddleOCR(**options)
        except (TypeError, ValueError) as error:  # PaddleOCR 3.x takes none of 2.x's options
            reason = " ".join(str(error).split())[:200]
            raise RewardInputError(f"PaddleOCR refused Flow-GRPO's options ({reason}); install PaddleOCR 2.x: "
                                   f"pip install 'paddleocr<3'") from None

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        result = self.model.ocr(image, cls=False)
        rows = result[0] if result else None
        return [(str(row[1][0]), float(row[1][1])) for row in (rows or [])]


class TesseractEngine:
    """The `tesseract` program on one image at a time; its lines (confidence 1: tesseract gives none per line)."""

    def __init__(self, executable: str = "tesseract", page_mode: int = 11):
        self.executable = shutil.which(executable)
        if self.executable is None:
            raise RewardInputError(f"reward.engine=tesseract needs the {executable!r} program on PATH (Debian / "
                                   "Ubuntu: apt install tesseract-ocr), or reward.engine=rapidocr")
        self.page_mode = page_mode  # 11: sparse text, in no particular layout (text on a picture)

    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "image.png"
            PIL.Image.fromarray(image).save(path)
            done = subprocess.run([self.executable, str(path), "stdout", "--psm", str(self.page_mode)],
                                  capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"tesseract failed ({done.returncode}): {done.stderr.strip()[-300:]}")
        return [(line.strip(), 1.0) for line in done.stdout.splitlines() if line.strip()]


def make_engine(engine: str, device: str = "cpu", model_dir: str | None = None):
    """The OCR engine named by `reward.engine` (a one-line error for an unknown or uninstalled one)."""
    if engine == "rapidocr":
        return RapidOcrEngine(device)
    if engine == "paddleocr":
        return PaddleOcrEngine(device, model_dir)
    if engine == "tesseract":
        return TesseractEngine()
    raise RewardInputError(f"unknown reward.engine={engine!r}; choose one of {', '.join(ENGINES)}")


class OcrReward(Reward):
    """`1 - normalised edit distance(quoted text, OCR reading)` per image, in [0, 1]."""

    differentiable = False

    def __init__(self, engine: str = "rapidocr", device: str = "cpu", model_dir: str | None = None,
                 min_confidence: float = 0.0):
        super().__init__()
        self.engine_name = engine
        self.engine = make_engine(engine, device, model_dir)
        self.min_confidence = min_confidence

    def check_prompts(self, prompts) -> None:
        for prompt in prompts:
            quoted_text(prompt)  # one line for a prompt without quoted text

    def read(self, images: torch.Tensor) -> list[str]:
        """What the engine reads in each image (the kept lines, joined)."""
        return [joined_text(self.engine.read(array), self.min_confidence) for array in to_uint8_arrays(images)]

    def score(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        readings = self.read(images)
        scores = torch.tensor([ocr_score(quoted_text(p), read) for p, read in zip(prompts, readings, strict=True)])
        return scores, {"ocr_exact": (scores == 1).float()}
