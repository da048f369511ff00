"""The last block's CLS attention of every head, over one image (paper Fig. 1 and 3; reference
visualize_attention.py).

    python scripts/visualize_attention.py --model outputs/dino/checkpoints/checkpoint-1000 --image cat.jpg \
        --output_dir attention/

Writes `attn-head{j}.png` (heat map over the image) and `mask-head{j}.png` (the patches that hold
--threshold of the attention mass, white), both at the image's size.
"""

import argparse
import sys

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.data.decoding import decode_image
from dino_hf.evaluation.attention import MASK_THRESHOLD, save_attention_maps
from dino_hf.evaluation.cli import add_model_argument, image_size_line
from dino_hf.evaluation.feature_models import load_feature_model


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser, image_size_help="Short side the image is resized to.")
    parser.add_argument("--image", required=True, help="Image file.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--threshold", type=float, default=MASK_THRESHOLD, help="Attention mass the masks keep (0.6 in the paper)."
    )
    return parser.parse_args(argv)


def main(argv=None) -> list:
    args = parse_args(argv)
    model, _ = load_feature_model(args.model, args.image_size)
    print(image_size_line(model))
    image = decode_image(args.image)  # RGB, EXIF orientation applied
    if image is None:
        raise ValueError(f"{args.image} could not be read as an image")
    written = save_attention_maps(model, image, args.output_dir, model.image_size, args.threshold)
    print(f"wrote {len(written)} images to {args.output_dir}")
    return written


if __name__ == "__main__":
    sys.exit(run_script(main, "visualize_attention.py"))
