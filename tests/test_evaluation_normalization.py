"""The evaluations normalise with the evaluated model's own mean and std: a start whose image processor
says mean = std = 0.5 (Google's ViTs) is scored on the pixels its own processor makes, by the library
(`load_feature_model`, `knn_accuracy`, the probes' and the pictures' transforms) and by the scripts."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import transformers as tf
from PIL import Image
from tiny import TINY_VIT

from dino_hf.convert.export import export_backbone
from dino_hf.evaluation import attention, features, pca
from dino_hf.evaluation.dense import segmentation_transform
from dino_hf.evaluation.feature_models import DinoFeatureModel, eval_transform, load_feature_model
from dino_hf.evaluation.features import ImageBatches, extract_features, knn_accuracy
from dino_hf.evaluation.linear_probe import train_transform
from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.modeling_dino import DinoModel
from dino_hf.models.normalization import IMAGENET, Normalization, normalization_of

REPO = Path(__file__).resolve().parents[1]
HALF = Normalization((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP = Normalization((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# The start's processor resizes the short side to 37 and crops 32, as DINO's evaluation transform does at
# 32 px: on 37 x 37 images both make the same pixels (no resampling, the same crop), so the features of
# dino_hf's evaluation and of the stock model on its stock processor's output can be compared to 1e-5.
SIDE, CROP = 37, 32


def random_image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def half_vit(tmp_path_factory) -> Path:
    """A transformers ViT folder whose image processor normalises with mean = std = 0.5. Its LayerNorm eps is
    DINO's 1e-6, which `load_feature_model` gives the ViT folders it converts (`dino_from_vit`)."""
    folder = tmp_path_factory.mktemp("half_vit")
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(**TINY_VIT, layer_norm_eps=1e-6), add_pooling_layer=False).save_pretrained(folder)
    tf.BitImageProcessor(
        size={"shortest_edge": SIDE},
        crop_size={"height": CROP, "width": CROP},
        image_mean=list(HALF.mean),
        image_std=list(HALF.std),
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """`train/` (5 per class) and `validation/` (2 per class) folders of 37 x 37 random images, two classes."""
    root = tmp_path_factory.mktemp("labelled")
    for split, count in (("train", 5), ("validation", 2)):
        for label, name in enumerate(("a", "b")):
            (root / split / name).mkdir(parents=True)
            for index in range(count):
                seed = 100 * (split == "train") + 10 * label + index
                random_image(seed).save(root / split / name / f"{index}.png")
    return root


def stock_features(folder: Path, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """`(pixel_values, CLS feature)` of the stock transformers model on its stock processor's output."""
    processor = tf.AutoImageProcessor.from_pretrained(folder)
    model = tf.AutoModel.from_pretrained(folder).eval()
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return pixel_values, model(pixel_values).last_hidden_state[:, 0]


def test_the_backbone_records_its_processors_mean_and_std(half_vit):
    assert normalization_of(build_backbone(str(half_vit))) == HALF


def test_features_equal_the_stock_models_on_its_own_processors_pixels(half_vit):
    model, transform = load_feature_model(half_vit)
    assert (model.normalization, model.normalization_source) == (HALF, "its image processor")
    assert model.image_size == CROP
    images = [random_image(seed) for seed in range(3)]
    rows = [{"image": image, "label": 0} for image in images]
    got, _ = extract_features(model, ImageBatches(rows, "image", transform, 3, "label"), "cpu")
    pixel_values, expected = stock_features(half_vit, images)
    torch.testing.assert_close(torch.stack([transform(image) for image in images]), pixel_values, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    imagenet, _ = extract_features(model, ImageBatches(rows, "image", eval_transform(CROP), 3, "label"), "cpu")
    assert (imagenet - expected).abs().max() > 1e-2  # ImageNet's mean and std would give other features


def test_the_training_knn_feeds_the_backbones_own_pixels(half_vit, labelled, monkeypatch):
    seen = []

    def recording(model, batches, device=None):
        batches = list(batches)
        seen.extend(pixels for pixels, _ in batches)
        return extract_features(model, batches, device)

    monkeypatch.setattr(features, "extract_features", recording)
    backbone = build_backbone(str(half_vit), drop_path_rate=0.0).train()
    sources = [dict(train_dir=str(labelled / split), streaming=False) for split in ("train", "validation")]
    metrics = knn_accuracy(backbone, sources, CROP, device="cpu")
    assert backbone.training and set(metrics) == {"knn_top1@10", "knn_top5@10"}  # a bank of 10 images
    fed = torch.cat(seen)
    assert fed.shape == (14, 3, CROP, CROP)
    files = sorted((labelled / "train").rglob("*.png")) + sorted((labelled / "validation").rglob("*.png"))
    pixel_values, _ = stock_features(half_vit, [Image.open(file).convert("RGB") for file in files])
    # The stream shuffles the files: each fed image is one of the stock processor's, to float rounding.
    distances = torch.cdist(fed.flatten(1), pixel_values.flatten(1))  # (14, 14)
    assert distances.min(dim=1).values.max() < 1e-4
    assert sorted(distances.argmin(dim=1).tolist()) == list(range(14))


def test_an_export_and_a_timm_folder_are_evaluated_with_their_own_mean_and_std(half_vit, tmp_path):
    export = export_backbone(build_backbone(str(half_vit)), tmp_path / "export", image_size=CROP)
    model, transform = load_feature_model(export)
    assert (model.normalization, model.normalization_source) == (HALF, "its image processor")
    uniform = Image.new("RGB", (SIDE, SIDE), (255, 0, 128))
    expected = torch.tensor([(255 / 255 - 0.5) / 0.5, (0 - 0.5) / 0.5, (128 / 255 - 0.5) / 0.5])
    torch.testing.assert_close(transform(uniform)[:, 0, 0], expected)

    timm_model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    )
    timm.models.save_for_hf(
        timm_model, tmp_path / "timm", safe_serialization=True, data_config=dict(mean=CLIP.mean, std=CLIP.std)
    )
    model, _ = load_feature_model(tmp_path / "timm")
    assert (model.normalization, model.normalization_source) == (CLIP, "timm's pretrained_cfg")


def test_a_model_that_names_no_mean_and_std_is_evaluated_with_imagenets(tmp_path):
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(**TINY_VIT), add_pooling_layer=False).save_pretrained(tmp_path / "bare")
    model, _ = load_feature_model(tmp_path / "bare")
    assert model.normalization == IMAGENET and "names no mean and std" in model.normalization_source
    dino = DinoModel(DinoConfig(**TINY_VIT))
    assert load_feature_model(dino)[0].normalization == IMAGENET  # an instance that records none


UNIFORM = (200, 30, 120)


def _first_pixel(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 3, *values.shape[-2:])[0, :, 0, 0]


@pytest.mark.parametrize("kind", ["eval", "train", "segmentation", "attention"])
def test_every_evaluation_transform_normalises_with_the_given_mean_and_std(kind):
    image = Image.new("RGB", (40, 36), UNIFORM)  # uniform: any resize or crop keeps its values
    transforms = {
        "eval": lambda: eval_transform(32, CLIP)(image),
        "train": lambda: train_transform(32, CLIP)(image),
        "segmentation": lambda: segmentation_transform(32, True, CLIP)(image, np.zeros((36, 40), np.uint8))[0],
        "attention": lambda: attention.model_input(image, 32, 8, CLIP),
    }
    expected = (torch.tensor(UNIFORM) / 255 - torch.tensor(CLIP.mean)) / torch.tensor(CLIP.std)
    torch.testing.assert_close(_first_pixel(transforms[kind]()), expected)


def test_the_pictures_are_drawn_from_the_models_own_pixels(monkeypatch, tmp_path):
    model = DinoFeatureModel(DinoModel(DinoConfig(**TINY_VIT)))
    model.normalization = HALF
    used, model_input = [], attention.model_input

    def recording(image, image_size, patch_size, normalization=IMAGENET):
        used.append(normalization)
        return model_input(image, image_size, patch_size, normalization)

    monkeypatch.setattr(attention, "model_input", recording)
    monkeypatch.setattr(pca, "model_input", recording)
    image = random_image(0)
    attention.save_attention_maps(model, image, tmp_path / "attention", image_size=32, device="cpu")
    pca.save_pca_maps(model, [("a", image), ("b", random_image(1))], tmp_path / "pca", image_size=32, device="cpu")
    assert used == [HALF, HALF, HALF]


def test_eval_knn_says_and_uses_the_models_mean_and_std(half_vit, labelled, capsys):
    spec = importlib.util.spec_from_file_location("eval_knn", REPO / "scripts" / "eval_knn.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = [
        "--model",
        str(half_vit),
        "--train_dir",
        str(labelled / "train"),
        "--eval_dir",
        str(labelled / "validation"),
    ]
    metrics = script.main([*argv, "--nb_knn", "1", "--batch_size", "4", "--num_workers", "0"])
    assert set(metrics) == {"knn_top1@1", "knn_top5@1"}
    printed = capsys.readouterr().out
    assert "normalised with mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5) (its image processor)" in printed


def test_a_processor_saved_by_transformers_5_gives_its_normalisation(tmp_path):
    """A processor of several parts (an image-text model's) is saved as `processor_config.json` with the image
    processor's settings nested in it, and no `preprocessor_config.json`; its mean and std are read as
    `AutoImageProcessor` reads them, for training and evaluation alike."""
    from dino_hf.models.normalization import saved_normalization

    mean, std = [0.48, 0.46, 0.41], [0.27, 0.26, 0.28]
    processor = {
        "image_processor": {"image_processor_type": "CLIPImageProcessor", "image_mean": mean, "image_std": std}
    }
    (tmp_path / "processor_config.json").write_text(json.dumps(processor))
    assert not (tmp_path / "preprocessor_config.json").exists()
    normalization = saved_normalization(tmp_path)
    assert list(normalization.mean) == pytest.approx(mean) and list(normalization.std) == pytest.approx(std)
