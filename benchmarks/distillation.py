"""Distillation benchmark: a frozen "released" ViT distilled into small students on a new domain, images
only, beside DINO from scratch on the same images and steps. Offline, on the CPU.

1. The released model: a ViT saved as a transformers `Dinov2Model` folder (6 blocks, width 256, patch 8:
   larger than the students), trained with the labels of one generated set (`--release`, seed 1: other
   images than the domain's when both are the same kind). It is made once and reused (`--root`).
2. It is distilled with `configs/distill_short.yaml` (at the benchmark's budget: 64 px, batch 32, `--max_steps`)
   on the domain's training images (`--domain`, seed 0) into
   - a timm ResNet-10-T from scratch (`--backbone timm:resnet10t`),
   - a DinoModel ViT-Ti/8 with 4 blocks from scratch,
   and DINO trains the ResNet-10-T from scratch on the same images for the same steps with
   `configs/small_data.yaml`.
3. It prints, side by side, the weighted k-NN top-1 (k = 20) on the domain's validation split (memory
   bank: its training split) and on the release set's, of the released model, each student, and DINO.

    python benchmarks/distillation.py
    python benchmarks/distillation.py --students resnet --skip_dino --learning_rate 0.005

With `--multi`, two released teachers of one set (a Dinov2Model trained with labels and a small CLIPModel
trained on captions of them) distil into a ResNet-10-T together and each alone, with the zero-shot top-1 of
every model that has the CLIP teacher's text tower (`benchmarks/multi_teacher.py`):

    python benchmarks/distillation.py --multi

Flags it does not know go to the distillation runs' training arguments, after their own, so they override
them (e.g. `--learning_rate`). Run it with `OMP_NUM_THREADS=1` on a shared machine.
"""

import argparse
import os
import time
from pathlib import Path

import multi_teacher
from continued_pretraining import _data_flags, knn
from continued_pretraining import table as continued_table
from small_data import DISTILLATION_BUDGET, METRIC, hardware, make_labelled_dinov2, make_set

from dino_hf.data.demo import default_demo_root
from dino_hf.training.arguments import parse_training_args
from dino_hf.training.trainer import train

REPO = Path(__file__).resolve().parent.parent
STUDENTS = {
    "resnet": ("timm ResNet-10-T", ["--backbone", "timm:resnet10t"]),
    "vit": (
        "DinoModel ViT-Ti/8, 4 blocks",
        ["--model_name_or_path", "vit_tiny_patch8", "--config_overrides", "num_hidden_layers=4"],
    ),
}
# The released model's shape and label training.
RELEASED = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=4, mlp_ratio=4, patch_size=8)
BUDGET = DISTILLATION_BUDGET
# The short-run recipe (its warm-up the first tenth of the run, its lr the one measured for such runs).
DISTIL = ["--config", str(REPO / "configs" / "distill_short.yaml")]


def make_released(release: Path, root: Path, epochs: int) -> Path:
    """The released ViT trained with the labels of `release` for `epochs`, as a Dinov2Model folder (reused
    when it exists)."""
    return make_labelled_dinov2(release, root / f"dinov2_vit_{release.name}_labels{epochs}", RELEASED, epochs)


def run(flags: list[str], domain: Path, release: Path, output_dir: Path) -> dict:
    """One training run: the domain k-NN at the start and the end, the release set's k-NN at the end."""
    args = parse_training_args(flags + BUDGET + _data_flags(domain) + ["--output_dir", str(output_dir)])
    began = time.perf_counter()
    result = train(args)
    return {
        "domain start": result.knn_start.get(METRIC),
        "domain end": result.knn.get(METRIC),
        "release end": knn(result.export_dir, release),
        "steps": result.global_step,
        "minutes": (time.perf_counter() - began) / 60,
    }


COLUMNS = ["domain start", "domain end", "of the released model", "release end"]


def table(rows: list[dict]) -> str:
    return continued_table(rows, COLUMNS, first="model")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", default="textures", help="the set the released model learnt with labels")
    parser.add_argument("--domain", default="textures", help="the set it is distilled on (images only)")
    parser.add_argument("--students", default="resnet,vit", help=f"comma-separated: {', '.join(STUDENTS)}")
    parser.add_argument("--max_steps", type=int, default=None, help="steps of each run (372; --multi: 1116)")
    parser.add_argument("--label_epochs", type=int, default=20, help="epochs of the released model's labels")
    parser.add_argument("--skip_dino", action="store_true", help="leave out DINO from scratch")
    parser.add_argument("--multi", action="store_true", help="the several-teacher benchmark (multi_teacher.py)")
    parser.add_argument("--root", default=os.path.join(default_demo_root(), "small_data"), help="where sets are made")
    parser.add_argument("--output_dir", default="outputs/distillation", help="one folder per run")
    args, extra = parser.parse_known_args()
    if args.multi:
        began = time.perf_counter()
        print(f"# several-teacher distillation benchmark on {args.domain} {' '.join(extra)}\n{hardware()}")
        rows = multi_teacher.run(args, extra)
        print(f"\n{multi_teacher.describe()}\n{(time.perf_counter() - began) / 60:.1f} min in all\n")
        print(continued_table(rows, multi_teacher.COLUMNS, first="model"))
        return
    steps = ["--max_steps", str(args.max_steps or 372)]
    print(
        f"# distillation benchmark: release {args.release} (seed 1), domain {args.domain} (seed 0) {' '.join(extra)}"
    )
    print(hardware())
    began = time.perf_counter()
    release, domain = make_set(args.release, args.root, seed=1), make_set(args.domain, args.root, seed=0)
    made = time.perf_counter()
    released = make_released(release, Path(args.root) / "released", args.label_epochs)
    frozen = {"domain end": knn(released, domain), "release end": knn(released, release)}
    print(f"released model {released} ready in {(time.perf_counter() - made) / 60:.1f} min: {frozen}")
    rows = [{"model": "Dinov2Model ViT (6 x 256)", "recipe": "released (frozen)", **frozen}]
    for name in [name.strip() for name in args.students.split(",") if name.strip()]:
        title, student = STUDENTS[name]
        flags = DISTIL + student + ["--distill_from", str(released)] + steps + extra
        row = run(flags, domain, release, Path(args.output_dir) / f"distil_{name}")
        row["of the released model"] = 100 * row["domain end"] / frozen["domain end"]
        rows.append({"model": title, "recipe": "distilled (distill_short.yaml)", **row})
        print(table(rows[-1:]))
    if not args.skip_dino:
        flags = ["--config", str(REPO / "configs" / "small_data.yaml")] + steps
        row = run(flags, domain, release, Path(args.output_dir) / "dino_resnet")
        row["of the released model"] = 100 * row["domain end"] / frozen["domain end"]
        rows.append({"model": STUDENTS["resnet"][0], "recipe": "DINO from scratch (small_data.yaml)", **row})
    print(f"\nk-NN top-1 (%) at k = 20 on the validation splits; {hardware()}")
    print(f"{(time.perf_counter() - began) / 60:.1f} min in all\n")
    print(table(rows))


if __name__ == "__main__":
    main()
