import hashlib
import os

import numpy as np
from PIL import Image

from dino_hf.data.demo import default_demo_root, make_demo_dataset
from dino_hf.data.sources import load_image_stream

SMALL = dict(num_classes=4, train_per_class=6, eval_per_class=2, image_size=32)


def digest(folder):
    h = hashlib.sha256()
    for dirpath, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            h.update(name.encode())
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(f.read())
    return h.hexdigest()


def test_layout_counts_and_image_format(tmp_path):
    path = make_demo_dataset(str(tmp_path), **SMALL)
    classes = sorted(os.listdir(os.path.join(path, "train")))
    assert classes == sorted(os.listdir(os.path.join(path, "validation"))) and len(classes) == 4
    assert len(set(c.split("_")[1] for c in classes)) == 4  # one shape per class
    for split, count in (("train", 6), ("validation", 2)):
        for c in classes:
            files = os.listdir(os.path.join(path, split, c))
            assert len(files) == count
            image = Image.open(os.path.join(path, split, c, files[0]))
            assert image.mode == "RGB" and image.size == (32, 32)
    stream, column = load_image_stream(train_dir=os.path.join(path, "train"))
    assert stream.features["label"].names == classes and len(list(stream)) == 24


def test_generation_is_deterministic_and_cached(tmp_path):
    a = make_demo_dataset(str(tmp_path / "a"), **SMALL)
    b = make_demo_dataset(str(tmp_path / "b"), **SMALL)
    c = make_demo_dataset(str(tmp_path / "c"), seed=1, **SMALL)
    assert digest(a) == digest(b) != digest(c)
    marker = os.path.join(a, "dataset_info.json")
    before = os.stat(marker).st_mtime_ns
    assert make_demo_dataset(str(tmp_path / "a"), **SMALL) == a
    assert os.stat(marker).st_mtime_ns == before


def test_incomplete_dataset_is_regenerated(tmp_path):
    path = make_demo_dataset(str(tmp_path), **SMALL)
    os.remove(os.path.join(path, "dataset_info.json"))
    assert make_demo_dataset(str(tmp_path), **SMALL) == path
    assert os.path.exists(os.path.join(path, "dataset_info.json"))
    assert len(os.listdir(os.path.join(path, "train"))) == 4


def test_classes_differ_in_shape_and_images_vary_within_a_class(tmp_path):
    path = make_demo_dataset(str(tmp_path), num_classes=4, train_per_class=20, eval_per_class=1, image_size=32)
    means = []
    for c in sorted(os.listdir(os.path.join(path, "train"))):
        folder = os.path.join(path, "train", c)
        images = np.stack(
            [np.asarray(Image.open(os.path.join(folder, f)), np.float32) for f in sorted(os.listdir(folder))]
        )
        assert images.std(axis=0).mean() > 30  # position, scale, rotation, colour and background vary
        means.append(images.mean(axis=0))
    # Class means are close: the class is not given away by the average image (colours are random).
    assert max(np.abs(m - means[0]).mean() for m in means) < 40


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DINO_HF_DEMO_DIR", str(tmp_path / "demo"))
    assert default_demo_root() == str(tmp_path / "demo")
    monkeypatch.delenv("DINO_HF_DEMO_DIR")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_demo_root() == os.path.join(str(tmp_path / "hf"), "dino_hf", "demo")
    monkeypatch.delenv("HF_HOME")
    assert default_demo_root().endswith(os.path.join(".cache", "dino_hf", "demo"))
