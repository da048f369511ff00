"""Test-wide settings, and the fixtures that several test files share.

The suite runs on two CPU cores, often with training subprocesses beside the pytest process: one
intra-op thread per process avoids oversubscribing the cores (two busy processes with two OpenMP
threads each run several times slower than with one). Subprocesses inherit OMP_NUM_THREADS.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_VIT

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    """What the training tests train on: `images/` (24 generated 40 x 40 images) and `model/` (a tiny
    DinoModel: 32 px, hidden 32, 2 layers, patch 8)."""
    from dino_hf import DinoConfig, DinoModel

    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for index in range(24):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "images" / f"{index:03d}.png")
    torch.manual_seed(0)
    DinoModel(
        DinoConfig(
            **TINY_VIT,
        )
    ).save_pretrained(root / "model")
    return root


@pytest.fixture(scope="session")
def labelled_images(tmp_path_factory):
    """A k-NN evaluation folder: `train/` (10 images per class) and `validation/` (5 per class) with the
    class sub-folders `red/` and `blue/`, 40 x 40 noisy images of their colour: a random-init tiny ViT
    tells them apart (k-NN top-1 100 %), a backbone that ignores its input does not (50 %)."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for split, count in (("train", 10), ("validation", 5)):
        for name, colour in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(rng.normal(colour, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / name / f"{index}.png")
    return root


@pytest.fixture(scope="session")
def trained_run(data, tmp_path_factory):
    """The output folder of a 2-step run (tests/runs.py's TINY settings) on `data`: its checkpoint is
    `checkpoints/checkpoint-2`, its export `teacher_backbone/`."""
    from runs import train_in_process

    output_dir = tmp_path_factory.mktemp("trained_run") / "out"
    train_in_process(
        train_dir=str(data / "images"),
        model_name_or_path=str(data / "model"),
        output_dir=str(output_dir),
        max_train_steps=2,
    )
    return output_dir
