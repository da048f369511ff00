"""Distillation from several frozen models through scripts/pretrain.py: a tiny Dinov2 and a tiny CLIP distil
together into a timm CNN and into a transformers ViT; the student loads without dino_hf as its own class, its
zero-shot export runs in `pipeline("zero-shot-image-classification")` without dino_hf and scores as the student's
summary head against the CLIP teacher's own text tower, its heads stand in for each teacher
(`load_feature_model(..., teacher=NAME)`); a resume with the teachers reordered or reweighted is refused; and
the settings that cannot work are refused in one line before anything is trained."""

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers as tf
from clip_teacher import save_clip_teacher
from PIL import Image
from processes import accelerate_launch
from runs import ENV, SCRIPT, pretrain_main, reset_accelerate, run_cli, saved

from dino_hf.evaluation.feature_models import load_feature_model

# Two teachers, RADIO's terms, PHI-S, one view of 32 px, 8 steps of 4 images.
MULTI = {
    "dino_loss_weight": 0,
    "local_crops_number": 0,
    "global_crops_size": 32,
    "per_device_train_batch_size": 4,
    "samples_per_epoch": 16,
    "max_steps": 8,
    "dataloader_num_workers": 0,
    "shuffle_buffer_size": 8,
    "checkpointing_steps": "4",
    "logging_steps": 4,
    "learning_rate": 0.001,
    "warmup_epochs": 0,
    "distill_global_loss": "cosine",
    "distill_local_loss": "cosine",
    "distill_balancing": "phi_s",
    "distill_balancing_batches": 2,
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """A tiny Dinov2 (patch 8, 48 wide), a tiny CLIP (image and text towers, embeddings of 16, its tokenizer), and
    a transformers ViT student."""
    root = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(0)
    config = tf.Dinov2Config(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    tf.Dinov2Model(config).save_pretrained(root / "dinov2")
    save_clip_teacher(root / "clip")
    student = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    tf.ViTModel(student, add_pooling_layer=False).save_pretrained(root / "vit_student")
    return root


def arguments(data, output_dir, models: list, *extra, **settings) -> list[str]:
    argv = ["--train_dir", str(data / "images"), "--output_dir", str(output_dir), "--distill_from", *map(str, models)]
    for name, value in {**MULTI, **settings}.items():
        argv += [f"--{name}", str(value)]
    return [*argv, *extra]


# Run in a process without dino_hf (its import fails there): the student as its own class, and the zero-shot
# pipeline's scores of two images against two labels.
WITHOUT_DINO_HF = """
import builtins, json, sys
real_import = builtins.__import__
def no_dino_hf(name, *args, **kwargs):
    if name.split(".")[0] == "dino_hf":
        raise ImportError("dino_hf is not installed here")
    return real_import(name, *args, **kwargs)
builtins.__import__ = no_dino_hf
import timm, transformers
from PIL import Image
out, kind = sys.argv[1], sys.argv[2]
if kind == "timm":
    student = timm.create_model(f"local-dir:{out}/student_backbone", pretrained=True)
else:
    student = transformers.AutoModel.from_pretrained(f"{out}/student_backbone")
classify = transformers.pipeline("zero-shot-image-classification", model=f"{out}/student_zero_shot")
images = [Image.open(path).convert("RGB") for path in sys.argv[3:5]]
labels = ["red cat", "blue photo"]
scores = [{r["label"]: r["score"] for r in classify(image, candidate_labels=labels)} for image in images]
print(json.dumps({"student": type(student).__name__, "scores": scores, "dino_hf": "dino_hf" in sys.modules}))
"""


def expected_scores(out, teacher_folder, images) -> list[dict]:
    """softmax(exp(logit_scale) x cos(the student's CLIP summary head, the CLIP teacher's text embeddings)), on the
    pixels the export's processor makes."""
    stand_in, _ = load_feature_model(out / "student_backbone", teacher="clip")
    processor = tf.AutoProcessor.from_pretrained(out / "student_zero_shot")
    clip = tf.CLIPModel.from_pretrained(teacher_folder).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(teacher_folder)
    labels = ["red cat", "blue photo"]
    with torch.no_grad():
        pixels = processor(images=[Image.open(path).convert("RGB") for path in images], return_tensors="pt")
        image_embeds = stand_in(pixels["pixel_values"])
        texts = tokenizer([f"This is a photo of {label}." for label in labels], padding=True, return_tensors="pt")
        text_embeds = clip.get_text_features(**texts).pooler_output
        logits = (
            clip.logit_scale.exp()
            * torch.nn.functional.normalize(image_embeds, dim=-1)
            @ (torch.nn.functional.normalize(text_embeds, dim=-1).T)
        )
    return [dict(zip(labels, row.tolist())) for row in logits.softmax(-1)]


@pytest.mark.slow
@pytest.mark.parametrize("student", ["timm", "transformers"])
def test_two_teachers_distil_into_one_student_that_loads_and_classifies_without_dino_hf(
    data, teachers, tmp_path, student, capsys
):
    options = {"backbone": "timm:resnet10t"} if student == "timm" else {"model_name_or_path": teachers / "vit_student"}
    out = tmp_path / "run"
    try:
        status = pretrain_main()(
            arguments(data, out, [teachers / "dinov2", teachers / "clip"], "--distill_zero_shot", **options)
        )
    finally:
        reset_accelerate()
    printed = capsys.readouterr().out
    assert status == 0
    assert "distillation from 2 frozen models" in printed and "fitted on 2 batches" in printed
    line = next(line for line in printed.splitlines() if line.startswith("step 8 epoch"))
    for name in ("distill_global/dinov2", "distill_local/dinov2", "distill_global/clip", "distill_local/clip"):
        assert f" {name}=" in line
    # Each teacher's heads, with its widths and the inverse of its balancing.
    configs = {
        name: json.loads((out / "student_heads" / name / "config.json").read_text()) for name in ("dinov2", "clip")
    }
    assert (configs["dinov2"]["summary_dim"], configs["dinov2"]["patch_dim"]) == (48, 48)
    assert (configs["clip"]["summary_dim"], configs["clip"]["patch_dim"], configs["clip"]["text_aligned"]) == (
        16,
        32,
        True,
    )
    card = (out / "student_backbone" / "README.md").read_text()
    assert f"`{teachers / 'dinov2'}`" in card and f"`{teachers / 'clip'}`" in card and "out_dim" not in card
    images = sorted((data / "images").iterdir())[:2]
    completed = subprocess.run(
        [sys.executable, "-c", WITHOUT_DINO_HF, str(out), student, *map(str, images)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    loaded = json.loads(completed.stdout.strip().splitlines()[-1])
    assert not loaded["dino_hf"]
    assert loaded["student"] == ("ResNet" if student == "timm" else "ViTModel")
    for got, expected in zip(loaded["scores"], expected_scores(out, teachers / "clip", images)):
        assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_a_resume_with_the_teachers_reordered_or_reweighted_is_refused_and_the_same_ones_resume(
    data, teachers, tmp_path
):
    main = pretrain_main()
    models = [teachers / "dinov2", teachers / "clip"]
    try:
        assert main(arguments(data, tmp_path / "run", models, backbone="timm:resnet10t", max_steps=4)) == 0
    finally:
        reset_accelerate()
    resume = ("--resume_from_checkpoint", "latest")
    for changed, extra in (
        (models[::-1], ()),
        (models, ("--distill_weights", "1", "0.5")),
    ):
        completed = run_cli(*arguments(data, tmp_path / "run", changed, *resume, *extra, backbone="timm:resnet10t"))
        assert completed.returncode == 2, completed.stderr[-3000:]
        assert "the same order and with the same weights" in completed.stderr and "Traceback" not in completed.stderr
    try:
        assert main(arguments(data, tmp_path / "run", models, *resume, backbone="timm:resnet10t")) == 0
    finally:
        reset_accelerate()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-8").is_dir()


@pytest.mark.parametrize(
    "models, settings, says",
    [
        (["dinov2", "vit_student"], {"distill_zero_shot": ""}, "has one it can export"),
        (["dinov2", "bert"], {}, "'bert' model, not a vision backbone"),
        (["dinov2", "clip"], {"distill_teacher_size": "32 32 32"}, "one side in pixels for every frozen model, or 2"),
        (["dinov2"], {"distill_teacher_drop": "0.5"}, "0 with one frozen model"),
        (["dinov2", "dinov2"], {}, "is named twice"),
        (["dinov2", "clip"], {"distill_weights": "1"}, "2 weights >= 0, one per --distill_from model"),
        (["dinov2", "clip"], {"distill_teacher_size": "30"}, "is not a multiple of the patch size 8"),
    ],
    ids=["zero_shot_without_text", "text_only_model", "sizes", "dropping_one", "twice", "weights", "size"],
)
def test_what_cannot_work_is_refused_in_one_line(data, teachers, tmp_path, models, settings, says, capsys):
    if "bert" in models:
        bert = tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        tf.BertModel(bert).save_pretrained(teachers / "bert")
    named = [teachers / name if (teachers / name).exists() else name for name in models]
    argv = [
        "--train_dir",
        str(data / "images"),
        "--output_dir",
        str(tmp_path / "out"),
        "--distill_from",
        *map(str, named),
    ]
    for name, value in {**MULTI, "backbone": "timm:resnet10t", **settings}.items():
        argv += [f"--{name}", *str(value).split()] if value != "" else [f"--{name}"]
    try:
        status = pretrain_main()(argv)
    finally:
        reset_accelerate()
    stderr = capsys.readouterr().err
    assert status == 2 and says in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_with_an_evaluation_set_each_frozen_models_knn_is_printed_beside_the_students(
    data, teachers, labelled_images, tmp_path, capsys
):
    evaluation = ["--eval_train_dir", str(labelled_images), "--eval_steps", "4"]
    try:
        status = pretrain_main()(
            arguments(data, tmp_path / "run", [teachers / "dinov2", teachers / "clip"], *evaluation, max_steps=4)
        )
    finally:
        reset_accelerate()
    printed = capsys.readouterr().out
    assert status == 0
    lines = [line for line in printed.splitlines() if line.startswith("k-NN of the ")]
    assert [line.split(" at ")[0] for line in lines] == [
        "k-NN of the random-init student",
        f"k-NN of the frozen {teachers / 'dinov2'}",
        f"k-NN of the frozen {teachers / 'clip'}",
        "k-NN of the trained student",
    ]


@pytest.mark.slow
def test_two_processes_fit_one_balancing_on_both_processes_batches(data, teachers, tmp_path):
    """DDP on two CPU processes: the balancing statistics are summed over both processes' batches before the fit,
    so the checkpoint's, written by the main process, count every patch of both (2 x 2 batches of 4 images x 16
    patches of the 32 px view)."""
    output_dir = tmp_path / "out"
    argv = arguments(
        data, output_dir, [teachers / "dinov2", teachers / "clip"], backbone="timm:resnet10t", max_steps=2
    )
    argv += ["--checkpointing_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(
        [*accelerate_launch(2), str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    state = saved(output_dir / "checkpoints" / "checkpoint-2", "distillation")
    for name in ("dinov2", "clip"):
        assert state[f"{name}.balancing.count"].item() == 2 * 2 * 4 * 16
        assert state[f"{name}.balancing.fitted"].item()
    assert (output_dir / "student_heads" / "clip" / "heads.safetensors").is_file()
