"""Train the digits reward's classifier on real handwritten digits and report its held-out accuracy.

    python -m scripts.train_digit_classifier            # writes assets/digits/classifier.pt

scikit-learn's `load_digits` (1797 real 8 x 8 digits) is split once, with a fixed seed, into a classifier part and a
held-out part (`experiments/digits_data.py`); the digits world's *generator* trains on the other half, so the reward
never scores images of digits it was trained on. The held-out accuracy is printed and stored next to the weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from experiments.digits_data import digits_split
from rewards.digits import ASSETS, DigitClassifier


def train_classifier(epochs: int = 300, hidden: int = 128, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Full-batch Adam with light pixel noise as augmentation; returns the model and its held-out accuracy."""
    torch.manual_seed(seed)
    images, labels = (torch.as_tensor(a) for a in digits_split("classifier"))
    images = images.float()
    model = DigitClassifier(hidden)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(epochs):
        noisy = (images + 0.05 * torch.randn_like(images)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(noisy), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    test_images, test_labels = (torch.as_tensor(a) for a in digits_split("held_out"))
    with torch.no_grad():
        accuracy = (model(test_images.float()).argmax(-1) == test_labels).float().mean().item()
    return model, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS / "classifier.pt", help="where to write the weights")
    parser.add_argument("--epochs", type=int, default=300, help="full-batch epochs")
    args = parser.parse_args()
    model, accuracy = train_classifier(args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    args.out.with_suffix(".json").write_text(json.dumps({"held_out_accuracy": accuracy, "epochs": args.epochs}) + "\n")
    print(f"held-out accuracy on real digits: {accuracy:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
