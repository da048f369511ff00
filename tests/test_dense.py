"""Dense evaluation: the segmentation metrics by hand, the patch-token grid, the linear segmentation probe,
the PCA picture, the generated shapes segmentation set, and scripts/eval_dense.py and
scripts/visualize_pca.py (in-process through `main(argv)`, and (slow) as subprocesses)."""

import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_scripts_eval import load_script, run_script
from tiny import TINY_VIT

from dino_hf import DinoConfig, DinoModel
from dino_hf.data.segmentation import (
    IGNORE_INDEX,
    SHAPES,
    draw_shape_with_mask,
    make_segmentation_set,
    num_mask_classes,
    segmentation_folder,
    segmentation_rows,
)
from dino_hf.evaluation.dense import (
    SegmentationBatches,
    confusion_matrix,
    evaluate_segmentation_probe,
    patch_features,
    segmentation_metrics,
    segmentation_transform,
    train_segmentation_probe,
)
from dino_hf.evaluation.feature_models import load_feature_model
from dino_hf.evaluation.features import extract_features
from dino_hf.evaluation.linear_probe import cached_batches
from dino_hf.evaluation.pca import foreground_pca, principal_components, save_pca_maps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import small_data  # noqa: E402

CPU = torch.device("cpu")


def write_colour_squares(root: Path, count: int, seed: int) -> None:
    """`images/` and `masks/` of `count` 32 px images: a 16 px square, red (class 1) or green (class 2),
    on dark noise (class 0); the top row of every mask is `IGNORE_INDEX`."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir(parents=True)
    for index in range(count):
        pixels = rng.normal(60, 20, (32, 32, 3))
        mask = np.zeros((32, 32), np.uint8)
        label = index % 2 + 1
        x, y = rng.integers(0, 17, 2)
        pixels[y : y + 16, x : x + 16] = (220, 40, 40) if label == 1 else (40, 220, 40)
        mask[y : y + 16, x : x + 16] = label
        mask[0] = IGNORE_INDEX
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / "images" / f"{index:03d}.jpg")
        Image.fromarray(mask).save(root / "masks" / f"{index:03d}.png")


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("squares")
    write_colour_squares(root / "train", 24, seed=0)
    write_colour_squares(root / "validation", 8, seed=1)
    return root


@pytest.fixture(scope="module")
def shapes_set(tmp_path_factory) -> Path:
    """The generated segmentation set at 3 training and 1 validation image per class."""
    return make_segmentation_set(tmp_path_factory.mktemp("sets"), train_per_class=3, eval_per_class=1)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return load_feature_model(DinoModel(DinoConfig(**TINY_VIT, drop_path_rate=0.0)), 32)[0]


# ---- metrics ------------------------------------------------------------------------------------


def test_miou_and_pixel_accuracy_by_hand():
    targets = torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    predictions = torch.tensor([[0, 1, 1], [1, 1, 2]])
    confusion = confusion_matrix(predictions, targets, num_labels=4)
    assert confusion.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]  # the 255 pixel left out
    metrics = segmentation_metrics(confusion)
    # IoU: class 0 1 / (1 + 0 + 1), class 1 2 / (2 + 2 + 0), class 2 0 / (0 + 0 + 1); class 3 is in neither: skipped.
    assert metrics["iou_per_class"][:3] == pytest.approx([50.0, 50.0, 0.0]) and metrics["iou_per_class"][3] is None
    assert metrics["miou"] == pytest.approx(100 / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(60.0)  # 3 of 5 labelled pixels

    # A class predicted but absent from the ground truth counts, with IoU 0.
    metrics = segmentation_metrics(confusion_matrix(torch.tensor([3, 1]), torch.tensor([0, 1]), num_labels=4))
    assert metrics["iou_per_class"] == [0.0, 100.0, None, 0.0] and metrics["miou"] == pytest.approx(100 / 3)
    assert metrics["pixel_accuracy"] == pytest.approx(50.0)


def test_metrics_refuse_class_ids_beyond_the_classes_and_empty_masks():
    with pytest.raises(ValueError, match="class id 5 .* there are 3 classes; pass --num_labels"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([5, 1]), num_labels=3)
    with pytest.raises(ValueError, match="no labelled pixel"):
        segmentation_metrics(confusion_matrix(torch.tensor([1]), torch.tensor([IGNORE_INDEX]), num_labels=3))


def test_evaluation_adds_up_the_confusion_of_all_batches():
    """A probe that predicts class 1 everywhere: per-class IoU over the whole set, not a mean of batches."""
    probe = torch.nn.Conv2d(4, 2, 1)
    with torch.no_grad():
        probe.weight.zero_()
        probe.bias.copy_(torch.tensor([0.0, 1.0]))
    first, second = torch.ones(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    first[0, :2] = 0  # 8 of 16 pixels of class 0
    batches = [(torch.randn(1, 4, 2, 2), first.long()), (torch.randn(1, 4, 2, 2), second)]
    metrics = evaluate_segmentation_probe(probe, batches, num_labels=2, device=CPU)
    # 32 pixels, 8 of class 1 all right, 24 of class 0 all wrong: IoU 0 and 8 / 32.
    assert metrics["iou_per_class"] == [0.0, 25.0] and metrics["pixel_accuracy"] == 25.0
    assert (metrics["images"], metrics["pixels"]) == (2, 32)


# ---- features, probe ----------------------------------------------------------------------------


def test_patch_features_are_the_last_block_tokens_on_the_grid(tiny_model):
    pixel_values = torch.randn(2, 3, 16, 24)  # a 2 x 3 grid: rows and columns cannot be swapped unseen
    with torch.no_grad():
        tokens = tiny_model.last_blocks(pixel_values, 1)[0]  # (2, 1 + 6, 32)
        grid = patch_features(tiny_model, pixel_values)
    assert grid.shape == (2, 32, 2, 3)
    torch.testing.assert_close(grid[:, :, 1, 2], tokens[:, 1 + 1 * 3 + 2])  # CLS dropped, row-major
    torch.testing.assert_close(grid[:, :, 0, 1], tokens[:, 2])


@pytest.mark.parametrize("family", ["dino_vit", "dinov2_with_registers", "dinov3_vit"])
def test_patch_features_drop_the_register_tokens(family):
    import transformers as tf

    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    if family == "dino_vit":
        model = DinoModel(DinoConfig(**TINY_VIT, num_register_tokens=2)).eval()
    elif family == "dinov3_vit":
        config = tf.DINOv3ViTConfig(**sizes, intermediate_size=64, num_register_tokens=2)
        model = tf.DINOv3ViTModel(config).eval()
    else:
        config = tf.Dinov2WithRegistersConfig(**sizes, mlp_ratio=2, num_register_tokens=2)
        model = tf.Dinov2WithRegistersModel(config).eval()
    feature_model = load_feature_model(model)[0]
    # DinoModel's last_blocks leave the registers out already; transformers' keep them in the prefix.
    prefix = model.num_prefix_tokens if family == "dino_vit" else feature_model.num_prefix_tokens
    assert prefix == 3  # CLS + 2 registers
    pixel_values = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state[:, 3:]  # (1, 16, 32), after the final norm
        grid = patch_features(feature_model, pixel_values)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), expected)


def test_segmentation_transform_moves_image_and_mask_together():
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = 255  # the left half white, as the mask's class 1
    mask = np.zeros((40, 60), np.int64)
    mask[:, :30] = 1
    image = Image.fromarray(pixels)
    values, resized = segmentation_transform(20)(image, mask)
    assert values.shape == (3, 20, 20) and resized.shape == (20, 20) and resized.dtype == torch.long
    assert set(resized.unique().tolist()) == {0, 1}  # nearest: no blended class ids
    assert ((values[0] > 0) == (resized == 1)).all()  # short side to 20, the centre 20 x 20 of a 20 x 30 image
    torch.manual_seed(0)
    flipped = [segmentation_transform(20, flip=True)(image, mask) for _ in range(8)]
    assert any(m[0, 0] == 0 for _, m in flipped) and all(((v[0] > 0) == (m == 1)).all() for v, m in flipped)


def test_probe_learns_colour_squares_with_a_tiny_vit(squares, tiny_model):
    data = {}
    for split in ("train", "validation"):
        rows, image_column, mask_column = segmentation_rows(segmentation_folder(squares / split))
        batches = SegmentationBatches(rows, image_column, mask_column, segmentation_transform(32), batch_size=8)
        data[split] = extract_features(tiny_model, batches, CPU, patch_features)
    assert data["train"][0].shape == (24, 32, 4, 4) and data["train"][1].shape == (24, 32, 32)
    losses = []
    torch.manual_seed(0)
    log = lambda _, loss: losses.append(loss)  # noqa: E731
    probe = train_segmentation_probe(cached_batches(*data["train"], 4), 32, 3, epochs=5, lr=0.01, device=CPU, log=log)
    metrics = evaluate_segmentation_probe(probe, cached_batches(*data["validation"], 8, shuffle=False)(0), 3, CPU)
    masks = data["validation"][1]
    background = segmentation_metrics(confusion_matrix(torch.zeros_like(masks), masks, 3))
    assert background["miou"] < 30  # the background's IoU (about 3/4) shared by three classes
    assert metrics["miou"] > background["miou"] + 30 and losses[-1] < losses[0] / 2
    assert all(value > 40 for value in metrics["iou_per_class"])  # both squares are found


# ---- PCA ----------------------------------------------------------------------------------------


def test_principal_components_match_an_eigendecomposition():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ np.diag([5, 3, 2, 1, 0.5, 0.1]) @ np.linalg.qr(rng.normal(size=(6, 6)))[0]
    mean, components = principal_components(torch.from_numpy(x), 3)
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x.T))
    expected = eigenvectors[:, ::-1][:, :3].T  # the 3 largest
    np.testing.assert_allclose(np.abs((components.numpy() * expected).sum(1)), 1.0, atol=1e-6)
    np.testing.assert_allclose(mean.numpy(), x.mean(0), atol=1e-12)
    largest = components.gather(1, components.abs().argmax(1, keepdim=True))
    assert (largest > 0).all()  # the sign rule


@pytest.mark.parametrize("swap", [False, True])
def test_foreground_is_the_inner_object_whichever_sign_the_svd_gives(swap):
    """4 x 4 grids: the outer ring near one vector, the inner 2 x 2 near another, one kind of patch each."""
    rng = np.random.default_rng(1)
    far, near = np.zeros(8), np.zeros(8)
    far[0], near[0] = 10.0, -10.0
    background, inner = (near, far) if swap else (far, near)
    features = []
    for _ in range(2):
        grid = background + 0.01 * rng.normal(size=(4, 4, 8))
        for k, (i, j) in enumerate([(1, 1), (1, 2), (2, 1), (2, 2)]):
            grid[i, j] = inner + np.eye(8)[1 + k] * 3 + 0.01 * rng.normal(size=8)  # 4 kinds: 3 components
        features.append(torch.from_numpy(grid).permute(2, 0, 1))  # (D, h, w)
    maps = foreground_pca(features)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1:3, 1:3] = True
    for rgb, foreground in maps:
        assert foreground.equal(expected) and rgb.shape == (4, 4, 3)
        assert (rgb[~foreground] == 0).all() and rgb.min() >= 0 and rgb.max() <= 1
    colours = torch.stack([rgb[1, 1] for rgb, _ in maps] + [rgb[2, 2] for rgb, _ in maps])
    assert torch.allclose(colours[0], colours[1], atol=0.05) and not torch.allclose(colours[0], colours[2], atol=0.2)
    with pytest.raises(ValueError, match="lower the threshold"):
        foreground_pca(features, threshold=100.0)


def test_pca_maps_are_written_beside_the_image_at_its_size(tiny_model, tmp_path):
    rng = np.random.default_rng(0)
    images = [(f"img{k}", Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8))) for k in range(2)]
    written = save_pca_maps(tiny_model, images, tmp_path, image_size=32, device=CPU)
    assert [path.name for path in written] == ["pca-img0.png", "pca-img1.png"]
    for (_, image), path in zip(images, written):
        with Image.open(path) as picture:
            assert picture.size == (80, 36)  # the image, then its map
            assert np.array_equal(np.asarray(picture)[:, :40], np.asarray(image))


# ---- data ---------------------------------------------------------------------------------------


def test_generated_set_is_the_shapes_set_with_its_masks(shapes_set, tmp_path, monkeypatch):
    info = json.loads((shapes_set / "dataset_info.json").read_text())
    assert info["classes"] == ["background", *SHAPES] and info["ignore_index"] == IGNORE_INDEX
    images = sorted((shapes_set / "train" / "images").glob("*/*.png"))
    assert len(images) == 30 and len(list((shapes_set / "validation" / "masks").glob("*/*.png"))) == 10
    # The benchmark's `shapes` set of the same seed: the same images, pixel for pixel.
    classes, draw, _, _ = small_data.SETS["shapes"]
    monkeypatch.setitem(small_data.SETS, "shapes", (classes, draw, 3, 1))
    benchmark = small_data.make_set("shapes", str(tmp_path / "benchmark"))
    for image in images + sorted((shapes_set / "validation" / "images").glob("*/*.png")):
        split, class_folder = image.parts[-4], image.parts[-2]
        with Image.open(image) as ours, Image.open(benchmark / split / class_folder / image.name) as theirs:
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), image
    # Each mask is k + 1 exactly where shape k was painted.
    rng = np.random.default_rng([0, 0, 3])  # train split, class 3 (star)
    for index in range(3):
        _, painted = draw_shape_with_mask(3, 64, rng)
        with Image.open(shapes_set / "train" / "masks" / "03_star" / f"{index:05d}.png") as mask:
            assert mask.mode == "L"
            np.testing.assert_array_equal(np.asarray(mask), np.where(np.asarray(painted) > 0, 4, 0))
    stamp = (shapes_set / "dataset_info.json").stat().st_mtime_ns
    assert make_segmentation_set(shapes_set.parent, train_per_class=3, eval_per_class=1) == shapes_set  # reused
    assert (shapes_set / "dataset_info.json").stat().st_mtime_ns == stamp


def test_segmentation_folder_pairs_by_relative_path_and_refuses_a_missing_mask(squares, tmp_path):
    rows = segmentation_folder(squares / "validation")
    assert rows.column_names == ["image", "mask"] and len(rows) == 8
    assert rows[3]["image"]["path"].endswith("images/003.jpg") and rows[3]["mask"]["path"].endswith("masks/003.png")
    assert num_mask_classes(rows, "mask") == 3  # ids 0, 1, 2; the 255 row ignored
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "a.jpg")
    with pytest.raises(ValueError, match="1 of the 1 images .* have no mask; the first missing is .*masks/a.png"):
        segmentation_folder(tmp_path)
    with pytest.raises(ValueError, match="needs the sub-folders images/ and masks/"):
        segmentation_folder(tmp_path / "images")


def test_segmentation_rows_find_the_image_and_the_mask_column():
    rgb, grey = Image.new("RGB", (8, 8)), Image.new("L", (8, 8))
    palette = Image.new("P", (8, 8))
    table = {"picture": [rgb], "annotation": [palette], "label": [0]}
    features = {"picture": datasets.Image(), "annotation": datasets.Image(), "label": datasets.Value("int64")}
    rows = datasets.Dataset.from_dict(table, features=datasets.Features(features))
    rows, image_column, mask_column = segmentation_rows(rows)
    assert (image_column, mask_column) == ("picture", "annotation")
    assert not rows.features["picture"].decode and not rows.features["annotation"].decode  # decoded later, safely

    two_masks = datasets.Dataset.from_dict(
        {"a": [grey], "b": [grey], "c": [rgb]},
        features=datasets.Features({name: datasets.Image() for name in "abc"}),
    )
    with pytest.raises(ValueError, match=r"single-channel image columns \['a', 'b'\]; name it with --mask_column"):
        segmentation_rows(two_masks)
    assert segmentation_rows(two_masks, image_column_name="c", mask_column_name="b")[1:] == ("c", "b")
    assert segmentation_rows(two_masks, image_column_name="a")[1:] == ("a", "b")  # a grey image, the other a mask
    with pytest.raises(ValueError, match="mask column 'c' holds RGB images"):
        segmentation_rows(two_masks, mask_column_name="c")


# ---- the scripts --------------------------------------------------------------------------------


def test_eval_dense_on_the_generated_set(data, shapes_set, tmp_path, capsys):
    output = tmp_path / "dense"
    metrics = load_script("eval_dense").main(
        ["--model", str(data / "model"), "--train_dir", str(shapes_set / "train")]
        + ["--eval_dir", str(shapes_set / "validation"), "--epochs", "2", "--batch_size", "8", "--num_workers", "0"]
        + ["--output_dir", str(output)]
    )
    printed = capsys.readouterr().out
    assert "image size: 32 px (the crop size of its image processor)" in printed and "11 classes" in printed
    assert "Linear segmentation probe on 10 test images: mIoU" in printed
    assert metrics["images"] == 10 and metrics["pixels"] == 10 * 32 * 32 and len(metrics["iou_per_class"]) == 11
    assert 0 <= metrics["miou"] <= 100 and 0 <= metrics["pixel_accuracy"] <= 100
    assert json.loads((output / "metrics.json").read_text()) == metrics | {"num_labels": 11, "image_size": 32}
    weights = torch.load(output / "segmentation_probe.pth", weights_only=True)
    assert weights["classifier.weight"].shape == (11, 32, 1, 1) and "norm.running_mean" in weights


def test_eval_dense_demo_evaluates_on_the_generated_set(data, shapes_set, tmp_path, capsys, monkeypatch):
    from dino_hf.data import segmentation

    monkeypatch.setattr(segmentation, "make_segmentation_set", lambda: shapes_set)
    arguments = ["--model", str(data / "model"), "--epochs", "1", "--batch_size", "8", "--num_workers", "0"]
    script = load_script("eval_dense")
    metrics = script.main([*arguments, "--demo"])
    printed = capsys.readouterr().out
    assert f"train split: the generated shapes segmentation set, {shapes_set / 'train'}" in printed
    assert f"eval split: the generated shapes segmentation set, {shapes_set / 'validation'}" in printed
    assert metrics["images"] == 10 and len(metrics["iou_per_class"]) == 11
    with pytest.raises(ValueError, match="--demo evaluates on the generated set; leave out --train_dir, or --demo"):
        script.main([*arguments, "--demo", "--train_dir", str(shapes_set / "train")])


def _embedded(value: dict) -> dict:
    return {"bytes": Path(value["path"]).read_bytes(), "path": None}


def test_eval_dense_finds_the_columns_of_parquet_files(data, squares, tmp_path):
    for split in ("train", "validation"):
        pairs = segmentation_folder(squares / split)
        table = datasets.Dataset.from_dict(
            {column: [_embedded(row[key]) for row in pairs] for column, key in (("photo", "image"), ("seg", "mask"))},
            features=datasets.Features({"photo": datasets.Image(), "seg": datasets.Image()}),
        )
        table.to_parquet(str(tmp_path / f"{split}.parquet"))
    metrics = load_script("eval_dense").main(
        ["--model", str(data / "model"), "--train_files", str(tmp_path / "train.parquet")]
        + ["--eval_files", str(tmp_path / "validation.parquet"), "--epochs", "3", "--lr", "0.01"]
        + ["--batch_size", "4", "--num_workers", "0", "--cache_features", "--no_batch_norm"]
    )
    assert metrics["images"] == 8 and metrics["pixels"] == 8 * 31 * 32  # the ignored top rows left out
    assert metrics["miou"] > 40


def cnn_folder(tmp_path: Path) -> Path:
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("resnet10t", num_classes=0), tmp_path / "cnn")
    return tmp_path / "cnn"


def test_the_dense_scripts_refuse_a_cnn(shapes_set, tmp_path):
    cnn = str(cnn_folder(tmp_path))
    with pytest.raises(ValueError, match="dense evaluation needs patch tokens; ResNet .* Pass a ViT"):
        load_script("eval_dense").main(["--model", cnn, "--train_dir", str(shapes_set / "train")])
    with pytest.raises(ValueError, match="PCA of patch features needs patch tokens"):
        load_script("visualize_pca").main(
            ["--model", cnn, "--images", str(shapes_set / "validation" / "images"), "--output_dir", str(tmp_path)]
        )


def test_visualize_pca_writes_one_picture_per_image(data, shapes_set, tmp_path, capsys):
    folder = shapes_set / "validation" / "images"
    files = [str(folder / "00_circle" / "00000.png"), str(folder / "07_crescent" / "00000.png")]
    written = load_script("visualize_pca").main(
        ["--model", str(data / "model"), "--images", *files, "--output_dir", str(tmp_path / "pca")]
    )
    assert "image size: 32 px (the crop size of its image processor)" in capsys.readouterr().out
    assert [path.name for path in written] == ["pca-00000.png", "pca-00000-1.png"]  # same names, both kept
    for path in written:
        with Image.open(path) as picture:
            assert picture.size == (128, 64)


@pytest.mark.slow
def test_eval_dense_subprocess(data, shapes_set, tmp_path):
    result = run_script(
        "eval_dense",
        *["--model", str(data / "model"), "--train_dir", str(shapes_set / "train")],
        *["--eval_dir", str(shapes_set / "validation"), "--epochs", "1", "--num_workers", "2"],
        *["--output_dir", str(tmp_path / "out")],
    )
    assert "Linear segmentation probe on 10 test images" in result.stdout
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["num_labels"] == 11


@pytest.mark.slow
def test_eval_dense_subprocess_refuses_a_cnn_with_exit_2(shapes_set, tmp_path):
    import subprocess

    result = subprocess.run(
        [sys.executable, "scripts/eval_dense.py", "--model", str(cnn_folder(tmp_path))]
        + ["--train_dir", str(shapes_set / "train"), "--eval_dir", str(shapes_set / "validation")],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "eval_dense.py: error: dense evaluation needs patch tokens" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_visualize_pca_subprocess(data, shapes_set, tmp_path):
    run_script(
        "visualize_pca",
        *["--model", str(data / "model"), "--images", str(shapes_set / "validation" / "images" / "03_star")],
        *["--output_dir", str(tmp_path / "pca"), "--image_size", "48"],
    )
    with Image.open(tmp_path / "pca" / "pca-00000.png") as picture:
        assert picture.size == (128, 64)


class _FixedAttention(torch.nn.Module):
    """A ViT stand-in whose last-block CLS attention over its 2 x 2 patches (patch size 2) is given."""

    patch_size, num_prefix_tokens = 2, 1

    def __init__(self, cls_rows: list[list[float]]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.cls_rows = torch.tensor(cls_rows)

    def last_selfattention(self, pixel_values):
        attention = torch.zeros(len(pixel_values), 1, 5, 5)
        attention[:, 0, 0, 1:] = self.cls_rows[-len(pixel_values) :]  # the last rows for a shorter batch
        return attention


def test_attention_foreground_iou_by_hand():
    from dino_hf.evaluation.attention import attention_foreground_iou

    model = _FixedAttention([[0.7, 0.1, 0.1, 0.1], [0.35, 0.35, 0.15, 0.15], [0.25, 0.25, 0.25, 0.25]])
    masks = torch.zeros(3, 4, 4, dtype=torch.int64)
    masks[0, :2, :2] = 3  # the first patch, and one pixel beyond it: IoU 4 / 5 with the first patch kept
    masks[0, 2, 0] = 1
    masks[1, :2, :2] = 2  # the first patch; the top two are kept: IoU 4 / 8
    masks[1, 3, 3] = IGNORE_INDEX
    masks[2] = IGNORE_INDEX  # nothing to score: left out
    iou = attention_foreground_iou(model, [(torch.zeros(3, 3, 4, 4), masks)])
    assert iou == pytest.approx(100 * (4 / 5 + 4 / 8) / 2)
    with pytest.raises(ValueError, match="no image to score"):
        attention_foreground_iou(model, [(torch.zeros(1, 3, 4, 4), masks[2:])])
