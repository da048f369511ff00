"""The evaluation scripts on a tiny model folder and generated image folders: in-process through their
`main(argv)`, and (slow) as subprocesses."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from tiny import TINY_VIT

from dino_hf import DinoConfig, DinoModel

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("red", "green", "blue")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_image(path: Path, label: int, seed: int, size=(40, 36)) -> None:
    rng = np.random.default_rng(seed)
    pixels = np.full((size[1], size[0], 3), 40.0)
    pixels[..., label] = 220
    pixels += rng.normal(0, 15, pixels.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """`model/` (a tiny DinoModel), `train/` and `val/` image folders with one sub-folder per class."""
    root = tmp_path_factory.mktemp("eval_scripts")
    torch.manual_seed(0)
    config = DinoConfig(
        **TINY_VIT,
        drop_path_rate=0.0,
    )
    DinoModel(config).save_pretrained(root / "model")
    for split, count in (("train", 6), ("val", 2)):
        for label, name in enumerate(CLASSES):
            for index in range(count):
                write_image(root / split / name / f"{index}.png", label, seed=hash((split, label, index)) % 2**32)
    return root


def data_args(root: Path) -> list[str]:
    return [
        "--model",
        str(root / "model"),
        "--train_dir",
        str(root / "train"),
        "--eval_dir",
        str(root / "val"),
        "--image_size",
        "32",
        "--batch_size",
        "4",
        "--num_workers",
        "0",
    ]


def test_eval_knn(workspace, tmp_path):
    metrics = load_script("eval_knn").main(
        data_args(workspace) + ["--nb_knn", "1", "5", "--output_file", str(tmp_path / "knn.json")]
    )
    assert set(metrics) == {"knn_top1@1", "knn_top5@1", "knn_top1@5", "knn_top5@5"}
    assert metrics["knn_top1@5"] == 100.0  # one colour per class: separable even for a random ViT
    assert json.loads((tmp_path / "knn.json").read_text()) == metrics


@pytest.mark.parametrize(
    "options, width",
    [
        (["--cache_features", "--n_last_blocks", "2"], 64),
        (["--n_last_blocks", "1", "--avgpool_patchtokens"], 64),
    ],
)
def test_eval_linear(workspace, tmp_path, options, width):
    output = tmp_path / "linear"
    metrics = load_script("eval_linear").main(
        data_args(workspace) + options + ["--epochs", "2", "--lr", "1.0", "--output_dir", str(output)]
    )
    assert set(metrics) == {"top1", "top5"} and 0 <= metrics["top1"] <= metrics["top5"] == 100.0  # 3 classes
    weights = torch.load(output / "linear_probe.pth", weights_only=True)
    assert weights["linear.weight"].shape == (3, width)  # 3 classes, from the folder names
    assert json.loads((output / "metrics.json").read_text()) == metrics


def test_extract_features(workspace, tmp_path):
    counts = load_script("extract_features").main(
        [
            "--model",
            str(workspace / "model"),
            "--train_dir",
            str(workspace / "train"),
            "--output_dir",
            str(tmp_path / "out"),
            "--image_size",
            "32",
            "--batch_size",
            "4",
            "--num_workers",
            "0",
            "--rows_per_shard",
            "5",
            "--patch_tokens",
        ]
    )
    assert counts == {"rows": 18, "skipped": 0, "shards": 4}
    loaded = datasets.load_dataset(str(tmp_path / "out"), split="train", cache_dir=str(tmp_path / "cache"))
    assert loaded.num_rows == 18
    assert set(loaded.column_names) == {"image", "label", "cls_features", "mean_patch_features", "patch_features"}
    assert loaded.features["label"].names == list(sorted(CLASSES))
    row = loaded[0]
    assert row["image"].size == (40, 36)  # the image itself, embedded, not a path
    assert len(row["cls_features"]) == 32 and np.asarray(row["patch_features"]).shape == (16, 32)


def test_visualize_attention(workspace, tmp_path):
    image = workspace / "val" / "red" / "0.png"
    written = load_script("visualize_attention").main(
        [
            "--model",
            str(workspace / "model"),
            "--image",
            str(image),
            "--output_dir",
            str(tmp_path / "attn"),
            "--image_size",
            "32",
        ]
    )
    assert len(written) == 4  # 2 heads x (heat map, mask)
    for path in written:
        with Image.open(path) as decoded:
            decoded.load()
            assert decoded.size == (40, 36)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"{name}.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_eval_knn_subprocess_with_workers(workspace):
    args = data_args(workspace)
    args[args.index("--num_workers") + 1] = "2"
    result = run_script("eval_knn", *args, "--nb_knn", "5")
    assert "5-NN classifier result: Top1: 100.00" in result.stdout


@pytest.mark.slow
def test_eval_linear_subprocess(workspace, tmp_path):
    result = run_script(
        "eval_linear", *data_args(workspace), "--epochs", "1", "--cache_features", "--n_last_blocks", "2"
    )
    assert "Linear probe on 6 test images" in result.stdout


@pytest.mark.slow
def test_extract_features_subprocess(workspace, tmp_path):
    result = run_script(
        "extract_features",
        "--model",
        str(workspace / "model"),
        "--train_dir",
        str(workspace / "val"),
        "--output_dir",
        str(tmp_path / "out"),
        "--image_size",
        "32",
        "--num_workers",
        "0",
    )
    assert "wrote 6 rows in 1 shards" in result.stdout
    assert len(list((tmp_path / "out" / "data").glob("train-*.parquet"))) == 1


@pytest.mark.slow
def test_visualize_attention_subprocess(workspace, tmp_path):
    run_script(
        "visualize_attention",
        "--model",
        str(workspace / "model"),
        "--image",
        str(workspace / "val" / "blue" / "1.png"),
        "--output_dir",
        str(tmp_path / "attn"),
        "--image_size",
        "32",
    )
    assert sorted(p.name for p in (tmp_path / "attn").iterdir()) == [
        "attn-head0.png",
        "attn-head1.png",
        "mask-head0.png",
        "mask-head1.png",
    ]


@pytest.fixture(scope="module")
def model_at_24px(workspace, tmp_path_factory) -> Path:
    """The workspace's model exported as training does: its image processor crops 24 px."""
    from dino_hf.convert.export import export_backbone

    folder = tmp_path_factory.mktemp("model24") / "teacher_backbone"
    export_backbone(DinoModel.from_pretrained(workspace / "model"), folder, image_size=24)
    return folder


@pytest.mark.parametrize(
    "script, extra",
    [
        ("eval_knn", ["--train_dir", "TRAIN", "--eval_dir", "VAL", "--nb_knn", "5"]),
        (
            "eval_linear",
            ["--train_dir", "TRAIN", "--eval_dir", "VAL", "--epochs", "1", "--cache_features", "--n_last_blocks", "2"],
        ),
        ("extract_features", ["--train_dir", "VAL", "--output_dir", "OUT"]),
        ("visualize_attention", ["--image", "IMAGE", "--output_dir", "OUT"]),
    ],
)
def test_scripts_evaluate_at_the_models_own_size_by_default(workspace, model_at_24px, tmp_path, capsys, script, extra):
    where = {
        "TRAIN": str(workspace / "train"),
        "VAL": str(workspace / "val"),
        "OUT": str(tmp_path / "out"),
        "IMAGE": str(workspace / "val" / "red" / "0.png"),
    }
    options = ["--batch_size", "4", "--num_workers", "0"] if script != "visualize_attention" else []
    load_script(script).main(["--model", str(model_at_24px), *[where.get(arg, arg) for arg in extra], *options])
    assert "image size: 24 px (the crop size of its image processor)" in capsys.readouterr().out
    load_script(script).main(
        ["--model", str(model_at_24px), *[where.get(arg, arg) for arg in extra], *options, "--image_size", "16"]
    )
    assert "image size: 16 px (given)" in capsys.readouterr().out
