"""Continued-pretraining benchmark: a "released" checkpoint continued with DINO on a new domain, with and
without the safeguards of `configs/continue_pretraining.yaml`. Offline, on the CPU.

1. The released checkpoints: a small ViT saved as a transformers `Dinov2Model` folder, and a timm
   ResNet-10-T saved as a timm folder, each trained with the labels of one generated set (`--release`,
   the small-data benchmark's textures by default; `benchmarks/small_data.py`). They are made once and
   reused (`--root`).
2. Each is continued with DINO on another generated set, the "domain" (`--domain`: by default the demo's
   set of shape-and-texture classes, `dino_hf.data.demo`, where DINO learns in CPU minutes, with 150
   validation images per class, `--domain_eval_per_class`: 1200 images, a standard error of about 1.2
   points on a k-NN near 20 %), for the same number of steps, once per `--seeds`, under:
   - (a) the paper's recipe without safeguards: the fresh DINO head and the backbone train together
     from the first step, one learning rate for every layer, nothing to hold the student near its start;
   - (b) `configs/continue_pretraining.yaml`: head warm-up with the backbone frozen, then the backbone's
     own learning-rate warm-up (each 20 % of the run), layer-wise decay, a lower patch-embedding rate,
     Gram anchoring to the start and the k-NN guard (the best export kept, the run stopped when the k-NN
     falls; `--stop_if_knn_drops 100` measures the run as it would go without an evaluation set);
   - (c) the frozen start: the released checkpoint itself, no training;
   - (d) `configs/continue_pretraining_lora.yaml` (ViT starts only): (b) trained through LoRA, ExPLoRA's
     recipe (rank 64 on Q and V, the last block and the norms unfrozen, the frozen weights held once).
3. It prints, side by side, the weighted k-NN top-1 (k = 20) on the domain's and the release set's
   validation splits at the start, at the best step (by the domain k-NN that the run measures every
   `--eval_steps`) and at the end, the backbone parameters each run trains, and how far each part of the
   backbone moved from the start (||W - W0|| / ||W0||). With several seeds, a summary of each recipe's
   change from the start, seed by seed.

    python benchmarks/continued_pretraining.py
    python benchmarks/continued_pretraining.py --starts vit --max_steps 280 --eval_steps 40 \
        --stop_if_knn_drops 100 --recipes a,b,d --seeds 0,1

Flags it does not know go to both recipes' training arguments, after its own, so they override them
(e.g. `--learning_rate`). Run it with `OMP_NUM_THREADS=1` on a shared machine.
"""

import argparse
import math
import os
import time
from pathlib import Path

import timm
import torch
import transformers
from small_data import IMAGE_SIZE, METRIC, fit_labels, hardware, make_set

from dino_hf.data.demo import default_demo_root, make_demo_dataset
from dino_hf.models.backbones import TimmBackbone, TransformersBackbone, build_backbone
from dino_hf.models.layout import backbone_layout
from dino_hf.models.transformers_backbone import FAMILIES
from dino_hf.training.arguments import parse_training_args
from dino_hf.training.layer_decay import freeze_blocks_
from dino_hf.training.networks import build_student_teacher
from dino_hf.training.trainer import backbone_knn, train

# The released models: built here, trained with the labels of the release set for LABEL_EPOCHS.
LABEL_EPOCHS = 12
STARTS = {
    "vit": "Dinov2Model ViT (4 blocks, width 192, patch 8)",
    "resnet": "timm ResNet-10-T",
}


# What both runs share: the budget (crops, batch, steps, evaluation) and the demo's optimisation; they
# differ only by the safeguards of configs/continue_pretraining.yaml.
def cpu_budget(local_crops_number: int, logging_steps: int) -> list[str]:
    """The training flags of a benchmark run on the small sets: 64 / 32 px crops, K = 1024 with a 512-wide
    head and a 128-wide bottleneck, batch 32, one loader worker, fp32, no checkpoint until the end."""
    return [
        "--global_crops_size", str(IMAGE_SIZE),
        "--local_crops_size", str(IMAGE_SIZE // 2),
        "--local_crops_number", str(local_crops_number),
        "--out_dim", "1024",
        "--head_hidden_dim", "512",
        "--head_bottleneck_dim", "128",
        "--per_device_train_batch_size", "32",
        "--dataloader_num_workers", "1",
        "--shuffle_buffer_size", "1000",
        "--logging_steps", str(logging_steps),
        "--checkpointing_steps", "100000",
        "--mixed_precision", "no",
    ]  # fmt: skip


BUDGET = cpu_budget(local_crops_number=2, logging_steps=10) + [
    "--warmup_epochs", "1",
    # The demo's learning rate and teacher momentum, at which DINO learns on these sets in CPU minutes.
    "--learning_rate", "0.002",
    "--momentum_teacher", "0.99",
]  # fmt: skip
RECIPES = {
    "(a) DINO, no safeguards": [],
    # The configs' warm-ups are scaled to the benchmark's runs (`warmups`).
    "(b) continue_pretraining.yaml": ["--config", "configs/continue_pretraining.yaml"],
    "(d) continue_pretraining_lora.yaml": ["--config", "configs/continue_pretraining_lora.yaml"],
}
WARMUP_SHARE = 0.2  # of the run, for the head's warm-up and again for the backbone's


def warmups(recipe: list[str], max_steps: int) -> list[str]:
    """The head's and the backbone's warm-ups of a config recipe, each WARMUP_SHARE of the run."""
    if "--config" not in recipe:
        return []
    steps = str(max(1, round(WARMUP_SHARE * max_steps)))
    return ["--head_warmup_steps", steps, "--backbone_warmup_steps", steps]


# LoRA adapts a ViT's attention: (d) runs for these starts only.
LORA_STARTS = ("vit",)

# With --anchor_variants: the recipe with each anchor, to choose the config's (the README's measurement).
ANCHOR_VARIANTS = {
    "(b) without an anchor": ["--gram_loss_weight", "0"],
    "(b) cosine anchor instead of Gram": ["--gram_loss_weight", "0", "--anchor_cosine_weight", "1"],
    "(b) Gram and cosine anchors": ["--anchor_cosine_weight", "1"],
}


def make_release(start: str, release: Path, root: Path) -> Path:
    """The released checkpoint `start` trained with the labels of `release`, as its own class's folder
    (reused when it exists)."""
    folder = root / f"{start}_{release.name}_labels{LABEL_EPOCHS}"
    if (folder / "config.json").is_file():
        return folder
    torch.manual_seed(0)
    if start == "vit":
        config = transformers.Dinov2Config(
            hidden_size=192,
            num_hidden_layers=4,
            num_attention_heads=3,
            mlp_ratio=4,
            image_size=IMAGE_SIZE,
            patch_size=8,
        )
        backbone = TransformersBackbone(transformers.Dinov2Model(config), FAMILIES["dinov2"])
    else:
        backbone = TimmBackbone(timm.create_model("resnet10t", pretrained=False, num_classes=0))
    fit_labels(backbone, release, epochs=LABEL_EPOCHS, crop_size=IMAGE_SIZE, crop_scale=(0.4, 1.0), batch_size=32)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    if start == "vit":
        backbone.model.save_pretrained(staging)
    else:
        timm.models.save_for_hf(backbone.model, staging, safe_serialization=True)
    staging.rename(folder)
    return folder


def knn(spec: str | Path, data: Path) -> float:
    """k-NN top-1 (%) at k = 20 of a saved backbone on `<data>/validation` (memory bank `<data>/train`)."""
    args = parse_training_args(_data_flags(data) + ["--model_name_or_path", str(spec)])
    backbone = build_backbone(str(spec), drop_path_rate=0.0)
    sources = ({"train_dir": str(data / "train")}, {"train_dir": str(data / "validation")})
    return backbone_knn(backbone, args, sources)[METRIC]


def _data_flags(domain: Path) -> list[str]:
    return [
        "--train_dir", str(domain / "train"),
        "--eval_train_dir", str(domain),
        "--eval_train_split", "train",
        "--eval_split", "validation",
        "--samples_per_epoch", str(sum(1 for _ in (domain / "train").glob("*/*.png"))),
        "--global_crops_size", str(IMAGE_SIZE),
    ]  # fmt: skip


def continue_run(start: Path, recipe: list[str], domain: Path, release: Path, output_dir: Path, extra: list[str]):
    """One continued run: its domain k-NN at the start, best step and end, and the release set's k-NN
    of the best and the last export."""
    args = parse_training_args(
        recipe
        + BUDGET
        + _data_flags(domain)
        + ["--model_name_or_path", str(start), "--output_dir", str(output_dir)]
        + extra
    )
    student, _, _ = build_student_teacher(args)  # what the run trains: counted on a build of its own
    freeze_blocks_(student, args.freeze_blocks)
    named = dict(student.backbone.model.named_parameters())
    trained = sum(p.numel() for p in named.values() if p.requires_grad)
    weights = sum(p.numel() for name, p in named.items() if ".lora_" not in name)
    del student
    began = time.perf_counter()
    result = train(args)
    row = {
        "trainable": f"{trained / 1e6:.2f} M ({100 * trained / weights:.0f} %)",
        "domain start": result.knn_start.get(METRIC),
        "domain best": result.knn_best.get(METRIC),
        "best step": result.knn_best_step,
        "domain end": result.knn.get(METRIC),
        "release best": knn(result.best_export_dir, release) if result.best_export_dir else None,
        "release end": knn(result.export_dir, release),
        "steps": result.global_step,
        "minutes": (time.perf_counter() - began) / 60,
    }
    if result.knn_stop:
        print(f"stopped by the k-NN guard: {result.knn_stop}")
    moved = movement(start, result.export_dir)
    print("moved from the start (||W - W0|| / ||W0||, %): " + ", ".join(f"{k} {v:.2f}" for k, v in moved.items()))
    return row


def movement(start: Path, export: Path) -> dict[str, float]:
    """How far each part of the backbone moved from `start` to `export`: ||W - W0|| / ||W0|| over the
    part's parameters, in %. The parts are `--freeze_blocks`'s units (`backbone_layout`): the embeddings,
    each block (a CNN's stages), and what comes after them."""
    model = build_backbone(str(start), drop_path_rate=0.0).model
    after = dict(build_backbone(str(export), drop_path_rate=0.0).model.named_parameters())
    layout = backbone_layout(model)
    singular = layout.unit_name.rstrip("s")
    parts: dict[str, list[float]] = {}
    for name, weight in model.named_parameters():
        unit = layout.places[name].unit
        part = "embeddings" if unit == 0 else "rest" if unit > layout.num_units else f"{singular} {unit - 1}"
        total = parts.setdefault(part, [0.0, 0.0])
        total[0] += (after[name] - weight).detach().square().sum().item()
        total[1] += weight.detach().square().sum().item()
    return {part: 100 * math.sqrt(change / max(norm, 1e-12)) for part, (change, norm) in parts.items()}


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


COLUMNS = [
    "domain start",
    "domain best",
    "best step",
    "domain end",
    "release start",
    "release best",
    "release end",
    "trainable",
]


def table(rows: list[dict], columns: list[str] = COLUMNS, first: str = "start") -> str:
    """A markdown table of `rows`: the `first` column and the recipe, then `columns`, steps and minutes."""
    head = f"| {first} | recipe | " + " | ".join(columns) + " | steps | minutes |"
    lines = [head, "|---" * (len(columns) + 4) + "|"]
    for row in rows:
        cells = [row.get(column) for column in columns] + [row.get("steps"), row.get("minutes")]
        lines.append(f"| {row[first]} | {row['recipe']} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", default="vit,resnet", help=f"comma-separated: {', '.join(STARTS)}")
    parser.add_argument("--release", default="textures", help="the set the released checkpoints learned")
    parser.add_argument("--domain", default="demo", help="the set DINO continues on (demo: the demo's own set)")
    parser.add_argument("--max_steps", type=int, default=150, help="steps of each continued run")
    parser.add_argument("--eval_steps", type=int, default=25, help="k-NN of the teacher every this many steps")
    parser.add_argument("--root", default=os.path.join(default_demo_root(), "small_data"), help="where sets are made")
    parser.add_argument("--output_dir", default="outputs/continued_pretraining", help="one folder per run")
    parser.add_argument("--recipes", default="a,b,d", help="comma-separated letters of the recipes to run (c always)")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds: each recipe runs once per seed")
    parser.add_argument(
        "--domain_eval_per_class",
        type=int,
        default=150,
        help="validation images per class of the demo domain (150: a standard error of about 1.2 points on the k-NN)",
    )
    parser.add_argument(
        "--anchor_variants", action="store_true", help="also run the recipe without an anchor and with the cosine one"
    )
    args, extra = parser.parse_known_args()
    extra = ["--max_steps", str(args.max_steps), "--eval_steps", str(args.eval_steps), *extra]
    print(f"# continued-pretraining benchmark: release {args.release}, domain {args.domain} {' '.join(extra)}")
    print(hardware())
    began = time.perf_counter()
    names = (args.release, args.domain)
    release, domain = (
        Path(make_demo_dataset(eval_per_class=args.domain_eval_per_class))
        if name == "demo"
        else make_set(name, args.root)
        for name in names
    )
    seeds = [int(seed) for seed in args.seeds.split(",")]
    letters = args.recipes.split(",")
    rows = []
    for start in [name.strip() for name in args.starts.split(",") if name.strip()]:
        made = time.perf_counter()
        folder = make_release(start, release, Path(args.root) / "released")
        frozen = {"domain start": knn(folder, domain), "release start": knn(folder, release)}
        print(f"{STARTS[start]}: {folder} ready in {(time.perf_counter() - made) / 60:.1f} min; start {frozen}")
        rows.append(
            {"start": STARTS[start], "recipe": "(c) frozen start", **frozen, "domain end": frozen["domain start"]}
        )
        rows[-1]["release end"] = frozen["release start"]
        recipes = dict(RECIPES)
        if args.anchor_variants:
            base = RECIPES["(b) continue_pretraining.yaml"]
            recipes.update({name: base + flags for name, flags in ANCHOR_VARIANTS.items()})
        for recipe, flags in recipes.items():
            letter = recipe[1]
            if letter not in letters or (letter == "d" and start not in LORA_STARTS):
                continue
            for seed in seeds:
                output_dir = Path(args.output_dir) / f"{start}_{len(rows)}"
                run_flags = flags + warmups(flags, args.max_steps) + ["--seed", str(seed)]
                row = continue_run(folder, run_flags, domain, release, output_dir, extra)
                row.update({"start": STARTS[start], "recipe": recipe, "seed": seed})
                rows.append({**row, "release start": frozen["release start"]})
                print(table(rows[-1:]))
    print(f"\nk-NN top-1 (%) at k = 20 on the validation splits; {hardware()}")
    print(f"{(time.perf_counter() - began) / 60:.1f} min in all\n")
    print(table(rows))
    if len(seeds) > 1:
        print(f"\nOver the seeds {args.seeds}:\n")
        print(seed_summary(rows))


def seed_summary(rows: list[dict]) -> str:
    """Per start and recipe over its seeds: the mean domain k-NN at the end, the end minus the start of each
    seed, and the mean release-set k-NN at the end."""
    runs: dict[tuple, list[dict]] = {}
    for row in rows:
        if "seed" in row:
            runs.setdefault((row["start"], row["recipe"]), []).append(row)
    lines = [
        "| start | recipe | domain start | domain end (mean) | end - start, each seed | release end (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for (start, recipe), group in runs.items():
        ends = [row["domain end"] for row in group]
        changes = ", ".join(f"{row['domain end'] - row['domain start']:+.1f}" for row in group)
        releases = [row["release end"] for row in group]
        lines.append(
            f"| {start} | {recipe} | {group[0]['domain start']:.1f} | {sum(ends) / len(ends):.1f} | {changes} "
            f"| {sum(releases) / len(releases):.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
