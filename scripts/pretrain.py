"""DINO pretraining: `accelerate launch scripts/pretrain.py [--config configs/NAME.yaml] [--flag value ...]`.

With no arguments it trains the tiny demo recipe (configs/demo.yaml) on a generated image dataset,
on the CPU in a few minutes, and prints the k-NN accuracy of the random-init and the trained teacher.
"""

import sys
from pathlib import Path

from dino_hf.trainer import train
from dino_hf.training_args import parse_training_args

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"


def main(argv: list[str]) -> None:
    if not argv:
        argv = ["--config", str(DEMO_CONFIG)]
    args = parse_training_args(argv)
    result = train(args)
    if result.knn_random_init and result.knn:
        print(f"k-NN top-1 (k=20): random-init teacher {result.knn_random_init.get('knn_top1@20', float('nan')):.1f}% "
              f"-> trained teacher {result.knn.get('knn_top1@20', float('nan')):.1f}%")
    print(f"The trained teacher backbone is in {result.export_dir}. Load it with:")
    print(f'    import dino_hf; from transformers import AutoModel; model = AutoModel.from_pretrained("{result.export_dir}")')


if __name__ == "__main__":
    main(sys.argv[1:])
