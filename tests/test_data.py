import io
import logging
import os
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from dino_hf.augment.multicrop import MultiCropTransform
from dino_hf.data.decoding import decode_image
from dino_hf.data.loader import SkipReport, build_multicrop_dataloader
from dino_hf.data.sources import count_rows, find_image_column, load_image_stream

TINY = dict(global_crops_size=32, local_crops_size=16, local_crops_number=2)


def random_image(height=24, width=20, seed=0, mode="RGB"):
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(array).convert(mode)


def encode(image, fmt="PNG", **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_header_only(width, height):
    """A PNG whose header claims width x height pixels, without pixel data."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def write_folder(root, classes=("cat", "dog"), per_class=10, bad=True):
    """Images in class sub-folders; with `bad`, one file of each bad kind and a text file."""
    for k, name in enumerate(classes):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            random_image(seed=100 * k + i).save(root / name / f"{i:03d}.png")
    if bad:
        png = encode(random_image())
        (root / classes[0] / "zero.png").write_bytes(b"")
        (root / classes[0] / "truncated.png").write_bytes(png[: len(png) // 2])
        (root / classes[1] / "corrupt.png").write_bytes(png[:60] + b"x" * 50 + png[110:])
        (root / classes[1] / "text.jpg").write_bytes(b"this is not an image")
        (root / "notes.txt").write_text("not an image and not listed")
    return root


BAD_COUNTS = {"zero_byte": 1, "truncated": 1, "corrupt": 1, "not_an_image": 1}


# decode_image ---------------------------------------------------------------------------------


def test_bad_files_are_skipped_and_counted_by_reason(tmp_path):
    png = encode(random_image())
    jpeg = encode(random_image(), "JPEG")
    skipped = Counter()
    values = {
        "zero_byte": b"",
        "truncated": jpeg[: len(jpeg) // 2],
        "corrupt": png[:60] + b"x" * 50 + png[110:],
        "not_an_image": b"hello, world" * 10,
        "missing_file": str(tmp_path / "nowhere.png"),
        "no_image_value": None,
    }
    for reason, value in values.items():
        assert decode_image(value, skipped) is None, reason
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert decode_image(str(empty), skipped) is None
    assert skipped == Counter({**{reason: 1 for reason in values}, "zero_byte": 2})


def test_decompression_bomb_and_max_pixels_are_skipped_without_decoding():
    skipped = Counter()
    assert decode_image(png_header_only(30000, 30000), skipped) is None  # 900 M pixels > PIL's 2 x 89 M
    assert decode_image(encode(random_image(200, 200)), skipped, max_pixels=10_000) is None
    assert decode_image(encode(random_image(99, 100)), skipped, max_pixels=10_000) is not None
    assert skipped == Counter({"too_large": 2})


def test_tiny_images_are_kept_unless_below_min_side():
    skipped = Counter()
    for size in [(1, 1), (1, 4000), (4000, 1)]:
        image = decode_image(encode(random_image(*size)), skipped)
        assert image.mode == "RGB" and image.size == size[::-1]
    assert decode_image(encode(random_image(1, 1)), skipped, min_side=2) is None
    assert skipped == Counter({"too_small": 1})


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (4, 3), 100), (100, 100, 100)),
        (lambda: Image.new("LA", (4, 3), (100, 0)), (255, 255, 255)),  # transparent: white
        (lambda: Image.new("LA", (4, 3), (100, 255)), (100, 100, 100)),
        (lambda: Image.new("RGBA", (4, 3), (10, 20, 30, 255)), (10, 20, 30)),
        (lambda: Image.new("RGBA", (4, 3), (10, 20, 30, 0)), (255, 255, 255)),
        (lambda: Image.new("RGB", (4, 3), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE), (10, 20, 30)),
        (lambda: Image.new("CMYK", (4, 3), (0, 0, 0, 0)), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((3, 4), 65535, np.uint16)), (255, 255, 255)),  # I;16
        (lambda: Image.fromarray(np.full((3, 4), 32896, np.uint16)), (128, 128, 128)),
        (lambda: Image.fromarray(np.full((3, 4), 0.5, np.float32)), (128, 128, 128)),  # F in [0, 1]
        (lambda: Image.fromarray(np.full((3, 4), 200.0, np.float32)), (200, 200, 200)),
        (lambda: Image.fromarray(np.full((3, 4), 60000, np.int32)), (233, 233, 233)),  # I, 16-bit range
    ],
)
def test_modes_are_converted_to_rgb(make, expected):
    source = make()
    fmt = "TIFF" if source.mode in ("CMYK", "F", "I", "I;16") else "PNG"
    for value in (source, encode(source, fmt)):
        image = decode_image(value)
        assert image.mode == "RGB" and image.size == (4, 3)
        assert image.getpixel((1, 1)) == expected


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (4, 3), 0)
    image.putpalette([10, 20, 30] * 256)
    image.info["transparency"] = 0
    assert decode_image(encode(image)).getpixel((0, 0)) == (255, 255, 255)


def test_exif_rotation_is_applied():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert decoded.size == (10, 20)
    assert decoded.getpixel((5, 2))[0] > 200 and decoded.getpixel((5, 17))[0] < 50  # white on top


# sources --------------------------------------------------------------------------------------


def read_ids(stream, column):
    return sorted(os.path.basename(row[column]["path"]) for row in stream)


def test_folder_with_class_subfolders_gives_labels_and_skips_non_image_extensions(tmp_path, caplog):
    write_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        stream, column = load_image_stream(train_dir=str(tmp_path))
    assert "'.txt': 1" in caplog.text
    assert column == "image" and stream.features["label"].names == ["cat", "dog"]
    rows = list(stream)
    assert len(rows) == 24 and stream.num_shards == 24
    labels = {os.path.basename(os.path.dirname(r["image"]["path"])): r["label"] for r in rows}
    assert labels == {"cat": 0, "dog": 1}


def test_flat_and_nested_folders(tmp_path):
    for i in range(3):
        random_image(seed=i).save(tmp_path / f"{i}.png")
    os.makedirs(tmp_path / "a" / "b")
    random_image().save(tmp_path / "a" / "b" / "deep.jpg")
    stream, column = load_image_stream(train_dir=str(tmp_path))
    assert "label" not in stream.features
    assert read_ids(stream, column) == ["0.png", "1.png", "2.png", "deep.jpg"]


def test_parquet_arrow_and_hub_style_loading(tmp_path):
    images = [{"bytes": encode(random_image(seed=i)), "path": f"{i}.png"} for i in range(6)]
    ds = Dataset.from_dict(
        {"picture": images, "idx": list(range(6))},
        features=Features({"picture": ImageFeature(), "idx": Value("int64")}),
    )
    os.makedirs(tmp_path / "data")
    ds.to_parquet(str(tmp_path / "data" / "train-00000.parquet"))
    for source in (
        dict(train_dir=str(tmp_path / "data")),
        dict(data_files=str(tmp_path / "data" / "*.parquet")),
        dict(dataset_name=str(tmp_path / "data")),
    ):
        stream, column = load_image_stream(**source)
        assert column == "picture"
        rows = list(stream)
        assert sorted(r["idx"] for r in rows) == list(range(6))
        assert decode_image(rows[0][column]).size == (20, 24)
    arrow_dir = tmp_path / "arrow"
    ds.save_to_disk(str(arrow_dir))
    stream, column = load_image_stream(data_files=str(arrow_dir / "*.arrow"))
    assert column == "picture" and len(list(stream)) == 6
    # An epoch's length is known from the files' headers, without reading the images.
    assert count_rows(train_dir=str(tmp_path / "data")) == 6
    assert count_rows(data_files=str(tmp_path / "data" / "*.parquet")) == 6
    assert count_rows(data_files=str(arrow_dir / "*.arrow")) == 6
    assert count_rows(data_files="hf://datasets/org/name/*.parquet") is None


def test_webdataset_tar_shards(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard}.tar", "w") as tar:
            for i in range(3):
                for name, data in (
                    (f"{shard}{i:03d}.jpg", encode(random_image(seed=i), "JPEG")),
                    (f"{shard}{i:03d}.cls", b"1"),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    stream, column = load_image_stream(train_dir=str(tmp_path))
    assert column == "jpg" and stream.num_shards == 2
    rows = list(stream)
    assert len(rows) == 6 and all(decode_image(r[column]).size == (20, 24) for r in rows)
    assert count_rows(train_dir=str(tmp_path)) == count_rows(data_files=str(tmp_path / "*.tar")) == 6


def test_image_column_override_and_error_listing_columns(tmp_path):
    ds = Dataset.from_dict({"text": ["a", "b"], "blob": [encode(random_image()), encode(random_image(seed=1))]})
    ds.to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(ValueError, match=r"\['text', 'blob'\]"):
        load_image_stream(data_files=str(tmp_path / "x.parquet"))
    stream, column = load_image_stream(data_files=str(tmp_path / "x.parquet"), image_column_name="blob")
    assert column == "blob" and decode_image(next(iter(stream))["blob"]).mode == "RGB"
    with pytest.raises(ValueError, match="'nope' not found"):
        find_image_column(stream, "nope")
    with pytest.raises(ValueError, match="exactly one of"):
        load_image_stream(train_dir=str(tmp_path), data_files=str(tmp_path / "x.parquet"))


def test_processes_read_disjoint_parts_that_cover_the_stream(tmp_path):
    write_folder(tmp_path, per_class=7, bad=False)
    parts = [
        [row["image"]["path"] for row in load_image_stream(train_dir=str(tmp_path), rank=r, world_size=3)[0]]
        for r in range(3)
    ]
    assert sum(len(p) for p in parts) == 14 and len(set().union(*parts)) == 14


# loader ---------------------------------------------------------------------------------------


def run_loader(stream, column, num_workers, stop_after=None, state=None, epoch=0, buffer=8):
    loader = build_multicrop_dataloader(
        stream,
        column,
        MultiCropTransform(**TINY),
        batch_size=4,
        num_workers=num_workers,
        shuffle_buffer_size=buffer,
        drop_last=False,
    )
    loader.dataset.set_epoch(epoch)
    if state is not None:
        loader.load_state_dict(state)
    ids, crops, skipped = [], [], Counter()
    for batch in loader:
        ids += batch["ids"]
        crops.append(batch["crops"])
        skipped.update(batch["skipped"])
        if stop_after is not None and len(crops) == stop_after:
            return ids, crops, skipped, loader.state_dict()
    return ids, crops, skipped, None


def test_batches_hold_one_tensor_per_crop_position(tmp_path):
    write_folder(tmp_path, per_class=3, bad=False)
    _, crops, _, _ = run_loader(*load_image_stream(train_dir=str(tmp_path)), num_workers=0)
    assert [tuple(c.shape) for c in crops[0]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumed_iteration_sees_the_same_samples_and_counts_as_an_uninterrupted_one(tmp_path, num_workers):
    write_folder(tmp_path)
    stream, column = load_image_stream(train_dir=str(tmp_path))
    ids, crops, skipped, _ = run_loader(stream, column, num_workers)
    assert len(ids) == 20 and len(set(ids)) == 20
    assert skipped == BAD_COUNTS  # counted in whichever worker met them
    first, first_crops, first_skipped, state = run_loader(stream, column, num_workers, stop_after=2)
    rest, rest_crops, rest_skipped, _ = run_loader(stream, column, num_workers, state=state)
    assert first + rest == ids
    assert first_skipped + rest_skipped == skipped
    for a, b in zip(first_crops + rest_crops, crops):  # augmentations are reproduced too
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_epochs_reshuffle_the_stream(tmp_path):
    write_folder(tmp_path, per_class=12, bad=False)
    stream, column = load_image_stream(train_dir=str(tmp_path))
    epoch0 = run_loader(stream, column, 0, epoch=0)[0]
    epoch1 = run_loader(stream, column, 0, epoch=1)[0]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1
    assert run_loader(stream, column, 0, epoch=1)[0] == epoch1


def test_too_many_workers_are_capped_at_the_number_of_shards(tmp_path, caplog):
    ds = Dataset.from_dict(
        {"image": [{"bytes": encode(random_image(seed=i)), "path": None} for i in range(5)]},
        features=Features({"image": ImageFeature()}),
    )
    ds.to_parquet(str(tmp_path / "one.parquet"))
    stream, column = load_image_stream(data_files=str(tmp_path / "one.parquet"))
    with caplog.at_level(logging.WARNING):
        loader = build_multicrop_dataloader(stream, column, MultiCropTransform(**TINY), batch_size=2, num_workers=2)
    assert loader.num_workers == 1 and "1 shards" in caplog.text
    ids = [i for batch in loader for i in batch["ids"]]
    assert len(ids) == 4 and len(set(ids)) == 4  # positional ids: no path in the rows


def test_skip_report_warns_once_per_reason(caplog):
    report = SkipReport()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            report.update({"corrupt": 2, "zero_byte": 1})
    assert caplog.text.count("corrupt") == 1 and caplog.text.count("zero byte") == 1
    assert report.counts == Counter({"corrupt": 6, "zero_byte": 3})
    assert report.summary() == "skipped images: corrupt 6, zero_byte 3"
