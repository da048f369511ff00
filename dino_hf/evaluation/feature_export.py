"""Embeddings of a whole dataset for other programs: CLS, mean of the patch tokens and, optionally,
every patch token of a ViT (the pooled feature of a CNN), streamed into parquet shards that keep the
dataset's original columns (so it works on datasets larger than memory)."""

import os
from collections.abc import Callable
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import torch
from accelerate import PartialState
from datasets.table import embed_table_storage

from .feature_models import FeatureModel
from .features import ImageBatches


def write_feature_dataset(
    model: FeatureModel,
    rows,
    image_column: str,
    output_dir: "str | os.PathLike",
    transform: Callable,
    batch_size: int = 64,
    rows_per_shard: int = 1000,
    patch_tokens: bool = False,
    split: str = "train",
    num_workers: int = 0,
    device=None,
) -> dict[str, int]:
    """Stream `rows` through the model and write `output_dir/data/{split}-NNNNN.parquet` shards, each
    row its original columns plus, for a ViT, `cls_features` (D,), `mean_patch_features` (D,) and, with
    `patch_tokens`, `patch_features` (N, D); for a backbone without tokens (a CNN), `pooled_features`
    (D,). `datasets.load_dataset(output_dir)` reads the result. `transform` makes the model's input:
    the transform `load_feature_model` returns with `model`, normalised with the model's own mean and std.

    Images are written back exactly as they came (the column is read undecoded); rows whose image does
    not decode are left out and counted. Returns `{"rows": written, "skipped": skipped, "shards": n}`.
    """
    if patch_tokens and not model.has_tokens:
        raise ValueError(
            f"patch tokens need a ViT; {type(model.model).__name__} has only a pooled feature: leave out "
            "--patch_tokens to write it"
        )
    device = PartialState().device if device is None else device
    model.to(device).eval()
    source_features = getattr(rows, "features", None)
    if source_features is not None and isinstance(source_features.get(image_column), datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))
        source_features = rows.features
    batches = ImageBatches(rows, image_column, transform, batch_size, num_workers=num_workers)
    output_dir = Path(output_dir) / "data"
    output_dir.mkdir(parents=True, exist_ok=True)
    pending, written, shards = [], 0, 0

    def flush(count: int) -> None:
        nonlocal pending, shards
        features = None
        if source_features is not None:
            tokens = pending[0].get("patch_features")
            vectors = {
                name: datasets.List(datasets.Value("float32"), length=len(pending[0][name]))
                for name in ("cls_features", "mean_patch_features", "pooled_features")
                if name in pending[0]
            }
            # The image is read back decoded, as images.
            features = datasets.Features({**source_features, image_column: datasets.Image(), **vectors})
            if tokens is not None:
                features["patch_features"] = datasets.Array2D(shape=tokens.shape, dtype="float32")
        table = datasets.Dataset.from_list(pending[:count], features=features).data.table
        # Images given as local paths are embedded as bytes, so the dataset stands on its own.
        pq.write_table(embed_table_storage(table), output_dir / f"{split}-{shards:05d}.parquet")
        pending, shards = pending[count:], shards + 1

    with torch.inference_mode():
        for pixel_values, batch_rows in batches:
            pending += _with_features(model, pixel_values.to(device), batch_rows, patch_tokens)
            written += len(batch_rows)
            while len(pending) >= rows_per_shard:
                flush(rows_per_shard)
    if pending:
        flush(len(pending))
    return {"rows": written, "skipped": batches.skipped, "shards": shards}


__all__ = ["write_feature_dataset"]


def _with_features(model: FeatureModel, pixel_values: torch.Tensor, rows: list, patch_tokens: bool) -> list[dict]:
    """`rows` with their features: `pooled_features` for a backbone without tokens, else `cls_features`,
    `mean_patch_features` and, with `patch_tokens`, `patch_features`."""
    if not model.has_tokens:
        pooled = model(pixel_values).float().cpu().numpy()  # (B, D)
        return [dict(row, pooled_features=pooled[index]) for index, row in enumerate(rows)]
    tokens = model.last_blocks(pixel_values, 1)[-1].float()  # (B, P + N, D)
    patches = tokens[:, model.num_prefix_tokens :]  # (B, N, D)
    cls, mean_patch = tokens[:, 0].cpu().numpy(), patches.mean(dim=1).cpu().numpy()
    patches = patches.cpu().numpy() if patch_tokens else None
    featured = []
    for index, row in enumerate(rows):
        row = dict(row, cls_features=cls[index], mean_patch_features=mean_patch[index])
        if patch_tokens:
            row["patch_features"] = patches[index]
        featured.append(row)
    return featured
