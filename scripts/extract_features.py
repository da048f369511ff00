"""Embeddings of every image of a dataset, written as a Hugging Face dataset (parquet shards).

    python scripts/extract_features.py --model outputs/dino/checkpoints/checkpoint-1000 --dataset_name beans \
        --train_split train --output_dir features/beans [--patch_tokens]

Each row keeps the dataset's original columns and gains `cls_features` (D,), `mean_patch_features`
(D,) and, with --patch_tokens, `patch_features` (N, D). Rows stream in and shards stream out, so the
dataset may be larger than memory. Read the result with `datasets.load_dataset(OUTPUT_DIR)`.
"""

import argparse
import sys

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.evaluation.cli import (
    add_dataset_arguments,
    add_model_argument,
    default_num_workers,
    image_size_line,
    load_split,
)
from dino_hf.evaluation.feature_export import write_feature_dataset
from dino_hf.evaluation.feature_models import load_feature_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    add_dataset_arguments(parser, labelled=False)
    parser.add_argument("--output_dir", required=True, help="Folder of the output dataset.")
    parser.add_argument("--patch_tokens", action="store_true", help="Also write every patch token (N x D per image).")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--rows_per_shard", type=int, default=1000, help="Rows per parquet file.")
    parser.add_argument(
        "--num_workers", type=int, default=default_num_workers(), help="DataLoader processes decoding images."
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, transform = load_feature_model(args.model, args.image_size)
    print(image_size_line(model))
    rows, image_column, _ = load_split(args, "train")
    counts = write_feature_dataset(
        model,
        rows,
        image_column,
        args.output_dir,
        transform,
        batch_size=args.batch_size,
        rows_per_shard=args.rows_per_shard,
        patch_tokens=args.patch_tokens,
        split=args.train_split,
        num_workers=args.num_workers,
    )
    print(
        f"wrote {counts['rows']} rows in {counts['shards']} shards to {args.output_dir}, "
        f"{counts['skipped']} skipped (unreadable images)"
    )
    return counts


if __name__ == "__main__":
    sys.exit(run_script(main, "extract_features.py"))
