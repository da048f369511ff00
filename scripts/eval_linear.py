"""Linear probe on a frozen backbone (docs/evaluation.md#linear-probe; reference eval_linear.py).

    python scripts/eval_linear.py --model outputs/dino/checkpoints/checkpoint-1000 --dataset_name imagenet-1k \
        --n_last_blocks 4                       # ViT-S: CLS of the last 4 blocks
    python scripts/eval_linear.py ... --n_last_blocks 1 --avgpool_patchtokens   # ViT-B

SGD momentum 0.9, weight decay 0, lr 0.001 x batch / 256, cosine over the epochs. By default every
epoch recomputes the features of RandomResizedCrop + flip images, as the reference; with
--cache_features they are computed once on the evaluation transform (far faster, no augmentation).
"""

import argparse
import functools
import sys

import datasets
import torch
from accelerate import PartialState

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.evaluation.cli import (
    add_dataset_arguments,
    add_model_argument,
    add_probe_run_arguments,
    epoch_rows,
    image_size_line,
    load_split,
    save_probe,
)
from dino_hf.evaluation.feature_models import load_feature_model
from dino_hf.evaluation.features import ImageBatches, extract_features
from dino_hf.evaluation.linear_probe import (
    cached_batches,
    evaluate_linear_probe,
    probe_feature_size,
    probe_features,
    train_linear_probe,
    train_transform,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser)
    add_dataset_arguments(parser)
    parser.add_argument(
        "--n_last_blocks", type=int, default=4, help="CLS tokens of this many last blocks (4 for ViT-S)."
    )
    parser.add_argument(
        "--avgpool_patchtokens",
        action="store_true",
        help="Add the mean patch token of the last block (ViT-B, with --n_last_blocks 1).",
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.001, help="Base lr, scaled by batch_size / 256.")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument(
        "--num_labels", type=int, help="Classes (default: from the ClassLabel feature, else the largest label + 1)."
    )
    add_probe_run_arguments(
        parser, cache_features_help="Compute the train features once (eval transform) and train on them."
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = PartialState().device
    model, transform = load_feature_model(args.model, args.image_size)
    print(image_size_line(model))
    model.to(device)
    feature_fn = functools.partial(
        probe_features, n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens
    )
    label_ids = {}
    train_rows, image_column, label_column = load_split(args, "train")
    eval_rows, eval_image_column, eval_label_column = load_split(args, "eval")

    def batches(rows, column, labels, image_transform):
        return ImageBatches(rows, column, image_transform, args.batch_size, labels, args.num_workers, label_ids)

    # The eval set is fixed: its features are computed once either way.
    eval_features, eval_labels = extract_features(
        model, batches(eval_rows, eval_image_column, eval_label_column, transform), device, feature_fn
    )
    if args.cache_features:
        train_features, train_labels = extract_features(
            model, batches(train_rows, image_column, label_column, transform), device, feature_fn
        )
        train_batches = cached_batches(train_features, train_labels, args.batch_size, seed=args.seed)
        num_labels = args.num_labels or int(max(train_labels.max(), eval_labels.max())) + 1
    else:
        augment = train_transform(model.image_size, model.normalization)

        def train_batches(epoch):
            rows = epoch_rows(train_rows, args, epoch)
            for pixel_values, labels in batches(rows, image_column, label_column, augment):
                with torch.no_grad():  # not around the yield: the probe's step needs gradients
                    features = feature_fn(model, pixel_values.to(device))
                yield features, labels

        label_feature = (train_rows.features or {}).get(label_column)
        class_count = label_feature.num_classes if isinstance(label_feature, datasets.ClassLabel) else None
        num_labels = args.num_labels or class_count or int(eval_labels.max()) + 1
    probe = train_linear_probe(
        train_batches,
        probe_feature_size(model, args.n_last_blocks, args.avgpool_patchtokens),
        num_labels,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        device=device,
        log=lambda epoch, loss: print(f"epoch {epoch}: train loss {loss:.4f}"),
    )
    metrics = evaluate_linear_probe(
        probe, cached_batches(eval_features, eval_labels, args.batch_size, shuffle=False)(0)
    )
    print(f"Linear probe on {len(eval_labels)} test images: Top1: {metrics['top1']:.2f}, Top5: {metrics['top5']:.2f}")
    if args.output_dir:
        save_probe(args.output_dir, probe, "linear_probe.pth", metrics)
    return metrics


if __name__ == "__main__":
    sys.exit(run_script(main, "eval_linear.py"))
