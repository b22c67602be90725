"""Train the small digits CNN that `graphopt demo` optimizes, and write it with its test split.

What it does: loads scikit-learn's bundled digits data set (1797 8x8 grayscale images, no network needed),
scales pixels to [0, 1], makes a stratified 70/30 train/test split with a fixed seed, trains a small CNN
on CPU for a few seconds, and exports it to ONNX (opset 17, TorchScript exporter, eval mode, no constant
folding) so that the file still holds BatchNormalization nodes, Constant nodes, an unfolded
Shape -> Reshape chain and other things a lossless optimizer can clean up. It then checks with
onnxruntime that the ONNX model scores the same test accuracy as torch, and prints the node counts by
op type, the file sizes and the accuracy.

How to run (from the repository root; needs `pip install torch==2.13.0 scikit-learn`):

    python benchmarks/train_demo.py              # writes into graphopt/demo/
    python benchmarks/train_demo.py --out DIR    # writes into DIR

What it writes:

    digits_cnn.onnx   input `image` float32 [batch, 1, 8, 8] (batch is dynamic), output `logits` [batch, 10]
    digits_test.npz   `image` float32 [N, 1, 8, 8] (the held-out test split), `labels` int64 [N]

The files are committed, so this script is NOT needed to run the demo; it documents how they were made.
Runs are seeded and deterministic (one thread, deterministic algorithms).
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from graphopt.runtime import run_all

SEED = 0
TEST_FRACTION = 0.3
EPOCHS = 30
BATCH_SIZE = 64
LEARNING_RATE = 1e-3
OPSET = 17
MIN_TEST_ACCURACY = 0.95

MODEL_FILE = "digits_cnn.onnx"
DATA_FILE = "digits_test.npz"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "graphopt" / "demo"


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, dropout, then a two-layer classifier: 8x8 image -> 10 logits.

    The flattening is written `reshape(batch, -1)`, the common hand-written PyTorch idiom, rather than
    nn.Flatten: it exports as a Shape -> Gather -> Unsqueeze -> Concat -> Reshape chain fed by Constant
    nodes, which is what exported models really look like and what shape folding cleans up.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, kernel_size=3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, kernel_size=3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Dropout(0.25),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Dropout(0.25),
            nn.Linear(64, 10),
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.features(image)
        return self.classifier(features.reshape(features.size(0), -1))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits images as float32 [N, 1, 8, 8] in [0, 1] with int64 labels, split stratified train/test."""
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    train_x, test_x, train_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SEED
    )
    return train_x, train_y, test_x, test_y


def train(model: DigitsCNN, images: np.ndarray, labels: np.ndarray) -> None:
    """Adam on shuffled mini-batches; the shuffling order comes from a seeded generator."""
    generator = torch.Generator().manual_seed(SEED)
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        for batch in torch.randperm(len(x), generator=generator).split(BATCH_SIZE):
            optimizer.zero_grad()
            loss_fn(model(x[batch]), y[batch]).backward()
            optimizer.step()


def torch_accuracy(model: DigitsCNN, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model(torch.from_numpy(images)).argmax(dim=1).numpy()
    return float((predicted == labels).mean())


def export(model: DigitsCNN, path: Path) -> None:
    """TorchScript exporter in eval mode. `do_constant_folding=False` keeps BatchNormalization, the
    Constant nodes and the shape chain as exported, so the lossless passes have real work to do.
    Dropout is dropped by the exporter in eval mode, so none appears in the file."""
    model.eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        dynamo=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=OPSET,
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.EVAL,
    )


def onnx_accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy with onnxruntime (no graph optimizations), one image per run, as `graphopt demo` feeds it."""
    feeds = [{"image": image[None]} for image in images]
    outputs = run_all(onnx.load(str(path)), feeds, what=path.name)
    predicted = np.array([out["logits"].argmax() for out in outputs])
    return float((predicted == labels).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)

    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    train_x, train_y, test_x, test_y = load_split()
    model = DigitsCNN()
    train(model, train_x, train_y)
    accuracy = torch_accuracy(model, test_x, test_y)
    if accuracy < MIN_TEST_ACCURACY:
        print(f"test accuracy {accuracy:.4f} is below {MIN_TEST_ACCURACY}; not writing files", file=sys.stderr)
        return 1

    args.out.mkdir(parents=True, exist_ok=True)
    model_path, data_path = args.out / MODEL_FILE, args.out / DATA_FILE
    export(model, model_path)
    onnx.checker.check_model(str(model_path), full_check=True)
    np.savez_compressed(data_path, image=test_x, labels=test_y)

    ort_accuracy = onnx_accuracy(model_path, test_x, test_y)
    op_counts = collections.Counter(node.op_type for node in onnx.load(str(model_path)).graph.node)
    print(f"train/test images: {len(train_x)}/{len(test_x)}")
    print(f"test accuracy: torch {accuracy:.4f}, onnxruntime {ort_accuracy:.4f}")
    print("nodes: " + ", ".join(f"{op} x{n}" for op, n in sorted(op_counts.items())))
    for path in (model_path, data_path):
        print(f"{path}: {os.path.getsize(path)} bytes")
    if ort_accuracy != accuracy:
        print("onnxruntime accuracy differs from torch's", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
