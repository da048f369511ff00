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
