"""Weighted k-NN evaluation of a backbone (docs/evaluation.md#weighted-k-nn; reference eval_knn.py).

    python scripts/eval_knn.py --model outputs/dino/checkpoints/checkpoint-1000 --dataset_name imagenet-1k \
        --train_split train --eval_split validation

Features are the backbone's output (CLS token after the final LayerNorm) of resize 256 + centre-crop 224
images, computed in batches on the accelerator when there is one; top-1 / top-5 for each k.
"""

import argparse
import json
import sys

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.evaluation.cli import (
    add_dataset_arguments,
    add_model_argument,
    default_num_workers,
    image_size_line,
    load_split,
)
from dino_hf.evaluation.feature_models import load_feature_model
from dino_hf.evaluation.features import ImageBatches, extract_features
from dino_hf.evaluation.knn import KNN_KS, KNN_TEMPERATURE, knn_evaluate


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    add_dataset_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=128, help="Images per forward pass.")
    parser.add_argument("--nb_knn", type=int, nargs="+", default=list(KNN_KS), help="Numbers of neighbours k.")
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE, help="Vote weight exp(sim / T).")
    parser.add_argument("--chunk_size", type=int, default=128, help="Test features per similarity matrix.")
    parser.add_argument(
        "--num_workers", type=int, default=default_num_workers(), help="DataLoader processes decoding images."
    )
    parser.add_argument("--output_file", help="Also write the metrics to this JSON file.")
    return parser.parse_args(argv)


def usable_ks(ks: list[int], train_size: int) -> list[int]:
    """The k of `ks` that `train_size` train features allow, as the trainer's k-NN keeps them; the others
    are dropped with a note."""
    usable = sorted(k for k in set(ks) if k <= train_size)
    dropped = sorted(set(ks) - set(usable))
    if not usable:
        raise ValueError(
            f"every k of --nb_knn {' '.join(map(str, sorted(set(ks))))} is larger than the {train_size} train "
            f"images; pass a k of at most {train_size}, or a larger train set"
        )
    if dropped:
        print(f"k = {', '.join(map(str, dropped))} left out: larger than the {train_size} train images")
    return usable


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, transform = load_feature_model(args.model, args.image_size)
    print(image_size_line(model))
    label_ids = {}  # shared so that string labels get the same ids in both splits
    features = {}
    for which in ("train", "eval"):
        rows, image_column, label_column = load_split(args, which)
        batches = ImageBatches(
            rows, image_column, transform, args.batch_size, label_column, args.num_workers, label_ids
        )
        features[which] = extract_features(model, batches)
        print(f"{which}: {len(features[which][1])} images, {batches.skipped} skipped (unreadable)")
    ks = usable_ks(args.nb_knn, len(features["train"][1]))
    metrics = knn_evaluate(
        *features["train"], *features["eval"], ks=ks, temperature=args.temperature, chunk_size=args.chunk_size
    )
    for k in ks:
        print(f"{k}-NN classifier result: Top1: {metrics[f'knn_top1@{k}']:.2f}, Top5: {metrics[f'knn_top5@{k}']:.2f}")
    if args.output_file:
        with open(args.output_file, "w") as file:
            json.dump(metrics, file, indent=2)
    return metrics


if __name__ == "__main__":
    sys.exit(run_script(main, "eval_knn.py"))
