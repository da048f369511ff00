"""Linear semantic segmentation probe on a frozen backbone's patch tokens (docs/evaluation.md#dense-evaluation;
the "linear" setting of DINOv2's segmentation evaluation).

    python scripts/eval_dense.py --model outputs/dino/teacher_backbone \
        --train_dir SET/train --eval_dir SET/validation        # folders: images/ and masks/
    python scripts/eval_dense.py --model facebook/dinov2-small --dataset_name ORG/NAME \
        --mask_column_name annotation --num_labels 151    # a Hub dataset with an image and a mask column
    python scripts/eval_dense.py --model outputs/dino/teacher_backbone --demo   # the generated shapes set, offline

BatchNorm + 1 x 1 convolution on the last block's patch tokens (after the final norm), logits upsampled
bilinearly to the mask, cross-entropy with 255 ignored, AdamW lr 1e-3 decayed linearly over the epochs.
Masks hold class ids per pixel, 255 for "ignore". Prints and writes (--output_dir) the mIoU and pixel
accuracy of the eval split.
"""

import argparse
import sys

import torch
from accelerate import PartialState

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.data.segmentation import num_mask_classes
from dino_hf.evaluation.cli import (
    add_model_argument,
    add_probe_run_arguments,
    add_segmentation_arguments,
    epoch_rows,
    image_size_line,
    load_segmentation_split,
    save_probe,
)
from dino_hf.evaluation.dense import (
    DENSE_LR,
    SegmentationBatches,
    evaluate_segmentation_probe,
    feature_batches,
    patch_features,
    require_patch_tokens,
    segmentation_transform,
    train_segmentation_probe,
)
from dino_hf.evaluation.feature_models import load_feature_model
from dino_hf.evaluation.features import extract_features
from dino_hf.evaluation.linear_probe import cached_batches


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser, image_size_help="Side S of the square crops (short side resized to S, centre crop).")
    add_segmentation_arguments(parser)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=DENSE_LR, help="Peak learning rate, decayed linearly to 0.")
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="AdamW (DINOv2's) or SGD.")
    parser.add_argument("--batch_size", type=int, default=16, help="Images per step (DINOv2: 16).")
    parser.add_argument(
        "--no_batch_norm", dest="batch_norm", action="store_false", help="A 1 x 1 convolution without BatchNorm."
    )
    parser.add_argument(
        "--num_labels", type=int, help="Classes (default: the largest class id in the masks of both splits + 1)."
    )
    add_probe_run_arguments(
        parser,
        cache_features_help="Compute the train features once (no flips) and train on them.",
        num_workers_help="DataLoader processes decoding images.",
    )
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = PartialState().device
    model, _ = load_feature_model(args.model, args.image_size)
    require_patch_tokens(model)
    print(image_size_line(model))
    if model.image_size % model.patch_size:
        size, patch = model.image_size, model.patch_size
        raise ValueError(f"image size {size} is not a multiple of the patch size {patch}; use {size - size % patch}")
    model.to(device)
    train_rows, image_column, mask_column = load_segmentation_split(args, "train")
    eval_rows, eval_image_column, eval_mask_column = load_segmentation_split(args, "eval")
    num_labels = args.num_labels or max(
        num_mask_classes(train_rows, mask_column), num_mask_classes(eval_rows, eval_mask_column)
    )
    print(f"{num_labels} classes; image column {image_column!r}, mask column {mask_column!r}")

    def batches(rows, image, mask, flip=False):
        transform = segmentation_transform(model.image_size, flip, model.normalization)
        return SegmentationBatches(rows, image, mask, transform, args.batch_size, args.num_workers)

    if args.cache_features:
        train_features, train_masks = extract_features(
            model, batches(train_rows, image_column, mask_column), device, patch_features
        )
        train_batches = cached_batches(train_features, train_masks, args.batch_size, seed=args.seed)
    else:

        def train_batches(epoch):
            rows = epoch_rows(train_rows, args, epoch)
            yield from feature_batches(model, batches(rows, image_column, mask_column, flip=True), device)

    probe = train_segmentation_probe(
        train_batches,
        model.num_features,
        num_labels,
        epochs=args.epochs,
        lr=args.lr,
        optimizer_name=args.optimizer,
        batch_norm=args.batch_norm,
        device=device,
        log=lambda epoch, loss: print(f"epoch {epoch}: train loss {loss:.4f}"),
    )
    eval_batches = batches(eval_rows, eval_image_column, eval_mask_column)
    metrics = evaluate_segmentation_probe(probe, feature_batches(model, eval_batches, device), num_labels, device)
    print(
        f"Linear segmentation probe on {metrics['images']} test images: mIoU {metrics['miou']:.2f}, "
        f"pixel accuracy {metrics['pixel_accuracy']:.2f} ({eval_batches.skipped} skipped: unreadable, or sizes differ)"
    )
    if args.output_dir:
        saved = metrics | {"num_labels": num_labels, "image_size": model.image_size}
        save_probe(args.output_dir, probe, "segmentation_probe.pth", saved)
    return metrics


if __name__ == "__main__":
    sys.exit(run_script(main, "eval_dense.py"))
