"""`scripts/pretrain.py --config configs/demo.yaml` with the user's own data: each data flag replaces
the demo's generated dataset, and the run says which data it trains on."""

import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SHORT = [
    "--max_train_steps",
    "2",
    "--samples_per_epoch",
    "8",
    "--per_device_train_batch_size",
    "4",
    "--dataloader_num_workers",
    "0",
    "--logging_steps",
    "1",
    "--shuffle_buffer_size",
    "8",
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict:
    """The same 12 images as a folder, as parquet files and as a local dataset folder."""
    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    for index in range(12):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "images" / f"{index:02d}.png")
    images = datasets.Dataset.from_dict({"image": sorted(str(path) for path in (root / "images").iterdir())})
    images = images.cast_column("image", datasets.Image())
    (root / "parquet").mkdir()
    images.to_parquet(str(root / "parquet" / "train-00000.parquet"))
    return {
        "--train_dir": str(root / "images"),
        "--data_files": str(root / "parquet" / "*.parquet"),
        "--dataset_name": str(root / "parquet"),
    }


@pytest.mark.parametrize(
    "flag, described",
    [
        ("--train_dir", "training data: the images under "),
        ("--data_files", "training data: data files "),
        ("--dataset_name", "training data: dataset "),
    ],
)
def test_a_data_flag_takes_the_demo_recipe_to_the_users_data(sources, tmp_path, flag, described):
    env = {**os.environ, "DINO_HF_DEMO_DIR": str(tmp_path / "demo"), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "pretrain.py"),
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            flag,
            sources[flag],
            "--output_dir",
            str(tmp_path / "out"),
            *SHORT,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert f"{described}{sources[flag]}" in completed.stdout
    assert not (tmp_path / "demo").exists()  # the generated demo dataset was not made
    assert (tmp_path / "out" / "teacher_backbone" / "config.json").is_file()
