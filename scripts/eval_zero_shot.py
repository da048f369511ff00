"""Zero-shot classification accuracy of a CLIP-like model on a labelled image folder
(docs/evaluation.md#zero-shot-classification).

    python scripts/eval_zero_shot.py --model outputs/distill/student_zero_shot --eval_dir imagenette/val

The classes are the sub-folders of --eval_dir (underscores read as spaces); each is embedded as the
normalised mean of the text embeddings of its prompts (--templates), and an image goes to the class of
highest cosine similarity. The model is a CLIPModel, SiglipModel, VisionTextDualEncoderModel (the zero-shot
export of a distilled student), ... folder or Hub id with its tokenizer and image processor.
"""

import argparse
import json
import sys

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.evaluation.cli import default_num_workers
from dino_hf.evaluation.features import ImageBatches
from dino_hf.evaluation.zero_shot import (
    DEFAULT_TEMPLATES,
    labelled_folder,
    load_zero_shot_model,
    topk_accuracies,
    zero_shot_logits,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="CLIP-like model folder or Hub id.")
    parser.add_argument("--eval_dir", required=True, help="Image folder with one sub-folder per class.")
    parser.add_argument(
        "--templates",
        nargs="+",
        default=list(DEFAULT_TEMPLATES),
        help="Prompt templates, each with {} for the class name. Default: the 7 ImageNet templates of CLIP's "
        "prompt ensemble.",
    )
    parser.add_argument("--batch_size", type=int, default=64, help="Images per forward pass.")
    parser.add_argument(
        "--image_size",
        type=int,
        default=None,
        help="Resize and crop to this size with the model's own processor. Default: the processor's own size.",
    )
    parser.add_argument(
        "--num_workers", type=int, default=default_num_workers(), help="DataLoader processes decoding images."
    )
    parser.add_argument("--output_file", help="Also write the metrics to this JSON file.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    without_slot = [template for template in args.templates if "{}" not in template]
    if without_slot:
        raise ValueError(f"--templates {without_slot[0]!r} has no {{}} for the class name")
    rows, image_column, class_names = labelled_folder(args.eval_dir)
    zero_shot = load_zero_shot_model(args.model, args.image_size)
    print(
        f"{type(zero_shot.model).__name__}: {len(class_names)} classes, {len(args.templates)} prompt templates, "
        f"images through {type(zero_shot.image_processor).__name__}"
    )
    batches = ImageBatches(rows, image_column, zero_shot.transform, args.batch_size, "label", args.num_workers)
    logits, labels = zero_shot_logits(zero_shot, batches, class_names, args.templates)
    metrics = topk_accuracies(logits, labels)
    print(f"{len(labels)} images, {batches.skipped} skipped (unreadable)")
    print("Zero-shot classification: " + ", ".join(f"{k.replace('top', 'Top')}: {v:.2f}" for k, v in metrics.items()))
    if args.output_file:
        with open(args.output_file, "w") as file:
            json.dump(metrics, file, indent=2)
    return metrics


if __name__ == "__main__":
    sys.exit(run_script(main, "eval_zero_shot.py"))
