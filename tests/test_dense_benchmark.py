"""benchmarks/dense.py: its recipes differ only by their losses, and a backbone is measured on both tasks and
on the foreground set made from the segmentation set."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import dense  # noqa: E402

from dino_hf import DinoConfig, DinoModel
from dino_hf.data.segmentation import make_segmentation_set
from dino_hf.training.arguments import parse_training_args

LOSSES = ("ibot_loss_weight", "gram_loss_weight", "gram_teacher", "gram_start_step", "gram_update_steps")
LOSSES += ("gram_max_updates",)


@pytest.mark.parametrize("start", ["scratch", "released"])
def test_the_three_recipes_share_the_budget_and_differ_by_their_losses(start, tmp_path):
    image_dir = str(tmp_path)  # parsing only checks that the folder exists
    steps = 120
    parsed = []
    for flags in dense.recipes(start, steps).values():
        model = [] if start == "scratch" else ["--model_name_or_path", "vit_tiny_patch8"]
        args = parse_training_args(
            flags + dense.BUDGET + ["--train_dir", image_dir, "--max_steps", str(steps)] + model
        ).to_dict()
        parsed.append(args)
    (dino, ibot, gram) = parsed
    assert (dino["ibot_loss_weight"], ibot["ibot_loss_weight"], gram["ibot_loss_weight"]) == (0.0, 1.0, 1.0)
    assert (dino["gram_loss_weight"], ibot["gram_loss_weight"], gram["gram_loss_weight"]) == (0.0, 0.0, 1.0)
    if start == "scratch":  # an EMA Gram teacher from half the run, refreshed once at three quarters
        assert (gram["gram_teacher"], gram["gram_start_step"], gram["gram_update_steps"]) == ("ema", 60, 30)
        assert gram["gram_max_updates"] == 1 and dino["model_name_or_path"] == "vit_tiny_patch8"
    else:  # the release itself is the Gram teacher, the config's warm-ups scaled to the run
        assert gram["gram_teacher"] == "start" and gram["head_warmup_steps"] == steps // 7
    for other in (ibot, gram):
        differing = {key for key in dino if dino[key] != other[key]}
        assert differing <= set(LOSSES), differing
    assert dino["max_steps"] == steps and dino["per_device_train_batch_size"] == 32


def test_a_backbone_is_measured_by_knn_and_by_the_segmentation_probe(tmp_path):
    segmentation = make_segmentation_set(tmp_path / "sets", train_per_class=3, eval_per_class=1)
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    config = DinoConfig.from_preset("vit_tiny_patch8", num_hidden_layers=1, image_size=64)
    DinoModel(config).save_pretrained(folder)
    figures = dense.measure(folder, segmentation, probe_epochs=1)
    assert set(figures) == {"k-NN", "mIoU", "pixel acc.", "foreground IoU", "attention IoU"}
    assert all(0.0 <= value <= 100.0 for value in figures.values())
    binary = tmp_path / "sets" / f"{segmentation.name}_foreground"
    for split, count in (("train", 30), ("validation", 10)):
        masks = sorted((binary / split / "masks").glob("*/*.png"))
        assert len(masks) == count and len(list((binary / split / "images").glob("*/*.png"))) == count
        for mask in masks:  # any shape is class 1, the background 0
            shapes = np.asarray(Image.open(segmentation / split / "masks" / mask.parent.name / mask.name))
            np.testing.assert_array_equal(np.asarray(Image.open(mask)), (shapes > 0).astype(np.uint8))
    assert figures["pixel acc."] > figures["mIoU"]  # mostly background: pixels right, classes missed
    row = dense.table([{"start": "scratch", "recipe": "(0) untrained", **figures}])
    assert f"| scratch | (0) untrained | {figures['k-NN']:.1f} | {figures['mIoU']:.1f} |" in row
