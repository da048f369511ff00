"""The first three PCA components of the foreground patch tokens as RGB, for a few images (DINOv2 Fig. 1;
docs/evaluation.md#pca-of-patch-features).

    python scripts/visualize_pca.py --model outputs/dino/teacher_backbone --images cat.jpg dog.jpg \
        --output_dir pca/

One PCA over the patches of all the images together: foreground where the first component is above
--threshold, then the RGB of a second PCA over the foreground patches. Writes `pca-<image name>.png`:
the image, and beside it its map upsampled by nearest neighbour to the image's size.
"""

import argparse
import sys
from pathlib import Path

from dino_hf.command_line import ScriptArgumentParser, run_script
from dino_hf.data.decoding import decode_image
from dino_hf.data.sources import IMAGE_EXTENSIONS
from dino_hf.evaluation.cli import add_model_argument, image_size_line
from dino_hf.evaluation.dense import require_patch_tokens
from dino_hf.evaluation.feature_models import load_feature_model
from dino_hf.evaluation.pca import FOREGROUND_THRESHOLD, save_pca_maps


def parse_args(argv=None) -> argparse.Namespace:
    parser = ScriptArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_argument(parser, image_size_help="Short side the images are resized to.")
    parser.add_argument("--images", nargs="+", required=True, help="Image files, or folders of them.")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--threshold",
        type=float,
        default=FOREGROUND_THRESHOLD,
        help="Foreground: first component above this many standard deviations (0: the positive side, as DINOv2).",
    )
    return parser.parse_args(argv)


def image_files(paths: list[str]) -> list[Path]:
    """The files named, and the image files of the folders named (sorted)."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            files.append(path)
    if not files:
        raise ValueError(f"no image files in {paths}")
    return files


def main(argv=None) -> list:
    args = parse_args(argv)
    model, _ = load_feature_model(args.model, args.image_size)
    require_patch_tokens(model, "the PCA of patch features")
    print(image_size_line(model))
    images = []
    for file in image_files(args.images):
        image = decode_image(str(file))  # RGB, EXIF orientation applied
        if image is None:
            raise ValueError(f"{file} could not be read as an image")
        images.append((file.stem, image))
    written = save_pca_maps(model, images, args.output_dir, model.image_size, args.threshold)
    print(f"wrote {len(written)} images to {args.output_dir}")
    return written


if __name__ == "__main__":
    sys.exit(run_script(main, "visualize_pca.py"))
