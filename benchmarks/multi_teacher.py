"""The several-teacher part of the distillation benchmark (`python benchmarks/distillation.py --multi`).

Two "released" teachers of one generated set (`--domain`, seed 1 for the teachers' images, seed 0 for the
students'), offline, on the CPU:

- a `Dinov2Model` ViT (4 blocks, width 192, patch 8) trained with the set's labels;
- a small `CLIPModel` (image tower: 4 blocks, width 128, patch 8; text tower: 2 blocks, width 64, embeddings
  of 64) trained contrastively on captions of the labels ("a photo of stripes.", ...), every pair of the same
  class counted as a match, with a word-level tokenizer made here. Its zero-shot top-1 is the text side's
  strength, which the Dinov2 teacher lacks.

A timm ResNet-10-T learns from scratch, on the students' images, from both teachers (`configs/distill_multi.yaml`
with the settings measured for such short runs, `SHORT`), from the Dinov2 teacher alone and from the CLIP teacher
alone, for `--max_steps` (1116: 36 epochs of the 992 images a step's batches cover). The table
gives each model's weighted k-NN top-1 (k = 20) on the validation split and the zero-shot top-1 of the CLIP
teacher and of each student that has its head (`student_zero_shot`, prompts "a photo of {}.").
"""

import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from continued_pretraining import _data_flags, knn
from small_data import (
    DISTILLATION_BUDGET,
    IMAGE_SIZE,
    METRIC,
    _load_split,
    hardware,
    make_labelled_dinov2,
    make_set,
)
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torchvision.transforms import v2

from dino_hf.models.backbones import build_backbone
from dino_hf.training.arguments import parse_training_args
from dino_hf.training.trainer import backbone_knn, train

REPO = Path(__file__).resolve().parent.parent
DINOV2 = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, mlp_ratio=4, patch_size=8)
CLIP_VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, patch_size=8)
CLIP_TEXT = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2)
EMBEDDING, TEXT_LENGTH = 64, 16
CAPTIONS = ("a photo of {}.", "this is {}.", "an image of {}.", "{}.")
ZERO_SHOT_TEMPLATE = "a photo of {}."
STUDENT = ["--backbone", "timm:resnet10t"]  # a BatchNorm CNN: the configs' --weight_decay_batchnorm 1e-6
MULTI = ["--config", str(REPO / "configs" / "distill_multi.yaml")]
# The settings measured for these short runs (docs/distillation.md#benchmark): per teacher, the single-teacher
# objective's terms (queue KL, patch-similarity KL) through linear heads, crops of 0.4-1 of the 64 px images, and
# the short-run lr of configs/distill_short.yaml.
SHORT = [
    "--learning_rate", "0.009",
    "--distill_global_loss", "queue_kl",
    "--distill_local_loss", "similarity",
    "--distill_projector", "linear",
    "--global_crops_scale", "0.4", "1.0",
]  # fmt: skip
# The single-teacher benchmark's budget; both teachers see the 64 px view as it is.
BUDGET = DISTILLATION_BUDGET + ["--distill_teacher_size", str(IMAGE_SIZE)]


def class_names(split: Path) -> list[str]:
    """The class names of a split, in its folders' order, as `eval_zero_shot` reads them (`07_dots` -> `07 dots`)."""
    return [folder.name.replace("_", " ") for folder in sorted(path for path in split.iterdir() if path.is_dir())]


def word_tokenizer(words: list[str]) -> transformers.PreTrainedTokenizerFast:
    """Lower-cased words and full stops, `<bos> ... <eos>`, padded to `TEXT_LENGTH`."""
    vocabulary = ["<pad>", "<unk>", "<bos>", "<eos>", *sorted(set(words))]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=TEXT_LENGTH,
    )


def make_dinov2(release: Path, root: Path, epochs: int) -> Path:
    """The Dinov2 teacher trained with the labels of `release` (made once, reused)."""
    return make_labelled_dinov2(release, root / f"dinov2_4x192_{release.name}_labels{epochs}", DINOV2, epochs)


def make_clip(release: Path, root: Path, epochs: int) -> Path:
    """The CLIP teacher trained contrastively on captions of the labels of `release` (made once, reused)."""
    folder = root / f"clip_4x128_{release.name}_captions{epochs}"
    if (folder / "config.json").is_file():
        return folder
    names = class_names(release / "train")
    words = [word for caption in CAPTIONS for word in caption.replace(".", " .").split() if word != "{}"]
    tokenizer = word_tokenizer(words + [word for name in names for word in name.split()] + ["."])
    torch.manual_seed(0)
    text = dict(**CLIP_TEXT, vocab_size=len(tokenizer), max_position_embeddings=TEXT_LENGTH, pad_token_id=0)
    text.update(bos_token_id=2, eos_token_id=3)
    config = transformers.CLIPConfig(
        text_config=text, vision_config=dict(**CLIP_VISION, image_size=IMAGE_SIZE), projection_dim=EMBEDDING
    )
    model = transformers.CLIPModel(config)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    _fit_captions(model, tokenizer, processor, release, names, epochs)
    staging = folder.with_name(f".{folder.name}.{os.getpid()}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    processor.save_pretrained(staging)
    staging.rename(folder)
    return folder


def _fit_captions(model, tokenizer, processor, release: Path, names: list[str], epochs: int) -> None:
    """CLIP's symmetric contrastive loss on (image, caption of its class) pairs, the targets spread over every
    pair of the same class; AdamW at 1e-3 with a one-cycle schedule, random resized crops and flips."""
    images, labels = _load_split(release / "train")
    images = images.view(-1, IMAGE_SIZE, IMAGE_SIZE, 3).permute(0, 3, 1, 2)
    augment = v2.Compose(
        [
            v2.RandomResizedCrop(IMAGE_SIZE, scale=(0.4, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.Normalize(processor.image_mean, processor.image_std),
        ]
    )
    batch_size, steps = 64, len(labels) // 64
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=epochs * steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels))
        for step in range(steps):
            batch = order[step * batch_size : (step + 1) * batch_size]
            captions = [CAPTIONS[torch.randint(len(CAPTIONS), ()).item()].format(names[i]) for i in labels[batch]]
            text = tokenizer(captions, padding="max_length", max_length=TEXT_LENGTH, return_tensors="pt")
            pixels = torch.stack([augment(image) for image in images[batch]])
            image_embeds = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            text_embeds = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
            logits = model.logit_scale.exp() * image_embeds @ text_embeds.T  # (B, B)
            same = (labels[batch][:, None] == labels[batch][None, :]).float()
            targets = same / same.sum(1, keepdim=True)
            image_loss = -(targets * logits.log_softmax(1)).sum(1).mean()
            text_loss = -(targets * logits.log_softmax(0)).sum(0).mean()
            loss = (image_loss + text_loss) / 2
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()


def teacher_knn(folder: Path, domain: Path) -> float:
    """k-NN top-1 (%) at k = 20 of a frozen teacher's global feature on `<domain>/validation` (bank: `train`)."""
    args = parse_training_args(_data_flags(domain) + ["--backbone", "timm:resnet10t"])  # the evaluation's settings
    backbone = build_backbone(str(folder), drop_path_rate=0.0, frozen=True)
    sources = ({"train_dir": str(domain / "train")}, {"train_dir": str(domain / "validation")})
    return backbone_knn(backbone, args, sources)[METRIC]


def zero_shot(folder: Path, domain: Path) -> float:
    """Zero-shot top-1 (%) of a CLIP-like folder on `<domain>/validation` (`scripts/eval_zero_shot.py`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_zero_shot", REPO / "scripts" / "eval_zero_shot.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    metrics = script.main(
        ["--model", str(folder), "--eval_dir", str(domain / "validation"), "--templates", ZERO_SHOT_TEMPLATE]
    )
    return metrics["top1"]


def distil(teachers: list[Path], domain: Path, output_dir: Path, steps: list[str], extra: list[str]) -> dict:
    """One student from `teachers`: its k-NN at the start and the end, and its zero-shot top-1 when it has the CLIP
    teacher's head."""
    text = any("clip" in teacher.name for teacher in teachers)
    flags = MULTI + SHORT + STUDENT + ["--distill_from", *map(str, teachers)] + steps + BUDGET
    flags += ["--distill_zero_shot", "true" if text else "false"]
    args = parse_training_args(flags + _data_flags(domain) + ["--output_dir", str(output_dir)] + extra)
    began = time.perf_counter()
    result = train(args)
    row = {"k-NN start": result.knn_start.get(METRIC), "k-NN": result.knn.get(METRIC), "steps": result.global_step}
    if text:
        row["zero-shot"] = zero_shot(output_dir / "student_zero_shot", domain)
    row["minutes"] = (time.perf_counter() - began) / 60
    return row


def run(args, extra: list[str]) -> list[dict]:
    """The table's rows: the two teachers, then the students from both and from each."""
    release, domain = make_set(args.domain, args.root, seed=1), make_set(args.domain, args.root, seed=0)
    made = time.perf_counter()
    dinov2 = make_dinov2(release, Path(args.root) / "released", args.label_epochs)
    clip = make_clip(release, Path(args.root) / "released", args.label_epochs)
    print(f"teachers {dinov2.name}, {clip.name} ready in {(time.perf_counter() - made) / 60:.1f} min")
    rows = [
        {"model": "Dinov2Model ViT (4 x 192), labels", "recipe": "teacher (frozen)", "k-NN": knn(dinov2, domain)},
        {
            "model": "CLIPModel (4 x 128), captions",
            "recipe": "teacher (frozen)",
            "k-NN": teacher_knn(clip, domain),
            "zero-shot": zero_shot(clip, domain),
        },
    ]
    print(json.dumps(rows))
    steps = ["--max_steps", str(args.max_steps or 1116)]
    for recipe, teachers in (
        ("from both", [dinov2, clip]),
        ("from the Dinov2 teacher alone", [dinov2]),
        ("from the CLIP teacher alone", [clip]),
    ):
        name = "_".join(teacher.name.split("_")[0] for teacher in teachers)
        row = distil(teachers, domain, Path(args.output_dir) / f"multi_{name}", steps, extra)
        rows.append({"model": "timm ResNet-10-T", "recipe": recipe, **row})
        print(json.dumps(rows[-1]))
    best = max(row["k-NN"] for row in rows[:2])
    for row in rows:
        row["% of the best teacher's k-NN"] = 100 * row["k-NN"] / best
        if row.get("zero-shot") is not None:
            row["% of CLIP's zero-shot"] = 100 * row["zero-shot"] / rows[1]["zero-shot"]
    return rows


COLUMNS = ["k-NN start", "k-NN", "% of the best teacher's k-NN", "zero-shot", "% of CLIP's zero-shot"]


def describe() -> str:
    return f"k-NN top-1 (%) at k = 20 and zero-shot top-1 (%) on the validation split; {hardware()}"
