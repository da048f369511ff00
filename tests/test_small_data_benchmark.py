"""benchmarks/small_data.py: its generated sets and the label reference it reports beside DINO."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import small_data  # noqa: E402

from dino_hf.training.arguments import parse_training_args


@pytest.fixture
def tiny_shapes(tmp_path, monkeypatch):
    """The `shapes` set at 6 training and 2 validation images per class."""
    classes, draw, _, _ = small_data.SETS["shapes"]
    monkeypatch.setitem(small_data.SETS, "shapes", (classes, draw, 6, 2))
    return small_data.make_set("shapes", str(tmp_path / "sets"))


def _args(path: Path, tmp_path: Path):
    return parse_training_args(
        ["--backbone", "timm:resnet10t", "--global_crops_size", "32", "--local_crops_size", "16"]
        + ["--train_dir", str(path / "train"), "--eval_train_dir", str(path), "--eval_train_split", "train"]
        + ["--eval_split", "validation", "--per_device_train_batch_size", "16", "--output_dir", str(tmp_path / "out")]
    )


def test_make_set_writes_an_imagefolder_once(tiny_shapes, tmp_path):
    train = sorted(p.relative_to(tiny_shapes) for p in (tiny_shapes / "train").glob("*/*.png"))
    assert len(train) == 60 and len(list((tiny_shapes / "validation").glob("*/*.png"))) == 20
    assert str(train[0]) == "train/00_circle/00000.png"
    stamp = (tiny_shapes / small_data._MARKER).stat().st_mtime_ns
    assert small_data.make_set("shapes", str(tmp_path / "sets")) == tiny_shapes  # reused, not redrawn
    assert (tiny_shapes / small_data._MARKER).stat().st_mtime_ns == stamp


def test_label_reference_is_seeded_and_reported_in_its_own_column(tiny_shapes, tmp_path):
    args = _args(tiny_shapes, tmp_path)
    first = small_data.label_reference(tiny_shapes, args, epochs=2)
    assert 0 <= first <= 100
    assert small_data.label_reference(tiny_shapes, args, epochs=2) == first  # same seed, same figure

    row = {"set": "shapes", "chance": 10.0, "pixels": 11.0, "labels": first, "random init": 12.0, "trained": 15.5}
    lines = small_data.table([row | {"minutes": 1.5}], label_epochs=2).splitlines()
    assert lines[0] == "| set | chance | pixels | labels, 2 epochs | random init | trained | gain | minutes |"
    assert lines[2] == f"| shapes | 10.0 | 11.0 | {first:.1f} | 12.0 | 15.5 | 3.5 | 1.5 |"
    assert "labels" not in small_data.table([row | {"minutes": 1.5}])
