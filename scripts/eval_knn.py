"""Weighted k-NN evaluation of a backbone (docs/evaluation.md#weighted-k-nn; reference eval_knn.py).

    python scripts/eval_knn.py --model outputs/dino/checkpoints/checkpoint-1000 --dataset_name imagenet-1k \
        --train_split train --eval_split validation

Features are the backbone's output (CLS token after the final LayerNorm) of resize 256 + centre-crop 224
images, computed in batches on the accelerator when there is one; top-1 / top-5 for each k.
"""

import argparse
import json

from dino_hf.evaluation.cli import add_dataset_arguments, add_model_argument, image_size_line, load_split
from dino_hf.evaluation.feature_models import load_feature_model
from dino_hf.evaluation.features import ImageBatches, extract_features
from dino_hf.evaluation.knn import KNN_KS, KNN_TEMPERATURE, knn_evaluate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    add_dataset_arguments(parser)
    parser.add_argument("--batch_size", type=int, default=128, help="Images per forward pass.")
    parser.add_argument("--nb_knn", type=int, nargs="+", default=list(KNN_KS), help="Numbers of neighbours k.")
    parser.add_argument("--temperature", type=float, default=KNN_TEMPERATURE, help="Vote weight exp(sim / T).")
    parser.add_argument("--chunk_size", type=int, default=128, help="Test features per similarity matrix.")
    parser.add_argument("--num_workers", type=int, default=4, help="DataLoader processes decoding images.")
    parser.add_argument("--output_file", help="Also write the metrics to this JSON file.")
    return parser.parse_args(argv)


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
    metrics = knn_evaluate(
        *features["train"], *features["eval"], ks=args.nb_knn, temperature=args.temperature, chunk_size=args.chunk_size
    )
    for k in sorted(args.nb_knn):
        print(f"{k}-NN classifier result: Top1: {metrics[f'knn_top1@{k}']:.2f}, Top5: {metrics[f'knn_top5@{k}']:.2f}")
    if args.output_file:
        with open(args.output_file, "w") as file:
            json.dump(metrics, file, indent=2)
    return metrics


if __name__ == "__main__":
    main()
