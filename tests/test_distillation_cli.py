"""Distillation through scripts/pretrain.py: a tiny frozen model of each kind (transformers ViT, Dinov2,
ConvNeXt, a timm folder) into a timm CNN or a transformers student; each export loads without dino_hf
as its own class; the checkpoint holds no frozen weight; a resume with another frozen model and a
frozen model that is not a vision backbone are refused."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
import transformers as tf
from processes import accelerate_launch
from runs import SCRIPT, pretrain_main, reset_accelerate, run_cli, saved
from safetensors import safe_open

VIT_SIZES = dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
# Distillation alone, one view of 32 px, 8 steps of 4 images.
DISTIL = {
    "dino_loss_weight": 0,
    "local_crops_number": 0,
    "global_crops_size": 32,
    "per_device_train_batch_size": 4,
    "samples_per_epoch": 16,
    "num_train_epochs": 2,
    "dataloader_num_workers": 0,
    "shuffle_buffer_size": 8,
    "checkpointing_steps": "4",
    "logging_steps": 4,
    "learning_rate": 0.001,
    "warmup_epochs": 0,
}


def _arguments(data, output_dir, frozen, *extra, **settings) -> list[str]:
    argv = ["--train_dir", str(data / "images"), "--distill_from", str(frozen), "--output_dir", str(output_dir)]
    for name, value in {**DISTIL, **settings}.items():
        argv += [f"--{name}", str(value)]
    return [*argv, *extra]


@pytest.fixture(scope="module")
def frozen_models(tmp_path_factory):
    """Tiny trained-looking frozen models (random weights) of each kind, and a transformers ViT student."""
    root = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(**VIT_SIZES, intermediate_size=64)).save_pretrained(root / "vit")
    tf.Dinov2Model(tf.Dinov2Config(**VIT_SIZES, mlp_ratio=2)).save_pretrained(root / "dinov2")
    tf.ConvNextModel(tf.ConvNextConfig(hidden_sizes=[8, 16, 24, 40], depths=[1, 1, 1, 1])).save_pretrained(
        root / "convnext"
    )
    timm_vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=40, depth=1, num_heads=2
    )
    timm.models.save_for_hf(timm_vit, root / "timm_vit", safe_serialization=True)
    student = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8)
    tf.ViTModel(student, add_pooling_layer=False).save_pretrained(root / "vit_student")
    return root


# (frozen model, student options): each kind of frozen model, into a timm CNN or a transformers ViT.
RUNS = {
    "vit_into_resnet": ("vit", {"backbone": "timm:resnet10t"}),
    "dinov2_into_vit": ("dinov2", {"model_name_or_path": "STUDENT"}),
    "convnext_into_resnet": ("convnext", {"backbone": "timm:resnet10t", "distill_local_loss": "cosine"}),
    "timm_into_vit": ("timm_vit", {"model_name_or_path": "STUDENT", "distill_projector": "mlp"}),
}


@pytest.mark.slow
def test_each_kind_of_frozen_model_distils_into_a_cnn_and_a_transformers_student(data, frozen_models, tmp_path):
    main = pretrain_main()
    exports = {}
    for name, (frozen, student) in RUNS.items():
        options = {k: str(frozen_models / "vit_student") if v == "STUDENT" else v for k, v in student.items()}
        try:
            status = main(_arguments(data, tmp_path / name, frozen_models / frozen, **options))
        finally:
            reset_accelerate()
        assert status == 0, name
        export = tmp_path / name / "student_backbone"
        assert not (tmp_path / name / "teacher_backbone").exists()
        exports[name] = export
        card = (export / "README.md").read_text()
        assert f"distilled from the frozen `{frozen_models / frozen}`" in card
        checkpoint = tmp_path / name / "checkpoints" / "checkpoint-8"
        # The student's backbone and projectors; no DINO head, no frozen weight, no EMA copy.
        assert {key.split(".")[0] for key in saved(checkpoint, "student")} == {"backbone", "distill_projector"}
        with safe_open(checkpoint / "distillation.safetensors", framework="pt") as file:
            assert set(file.keys()) == {"features", "position"}
            assert file.metadata()["distill_from"] == str(frozen_models / frozen)
        weight_files = {path.name for path in checkpoint.glob("*.safetensors")}
        assert weight_files == {"student.safetensors", "distillation.safetensors"}
    # Loaded without dino_hf, each as its own class: timm for the CNN, transformers ViTModel for the ViT.
    script = (
        "import sys, json, timm, torch\n"
        "from transformers import AutoModel\n"
        f"exports = {json.dumps({k: str(v) for k, v in exports.items()})}\n"
        "for name, folder in exports.items():\n"
        "    if name.endswith('resnet'):\n"
        "        model = timm.create_model('local-dir:' + folder, pretrained=True)\n"
        "        assert type(model).__name__ == 'ResNet', type(model)\n"
        "    else:\n"
        "        model = AutoModel.from_pretrained(folder)\n"
        "        assert type(model).__name__ == 'ViTModel', type(model)\n"
        "    model.eval()(torch.randn(1, 3, 32, 32))\n"
        "assert 'dino_hf' not in sys.modules\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr


@pytest.mark.slow
def test_a_resume_with_another_frozen_model_is_refused_and_the_same_one_resumes(data, frozen_models, tmp_path):
    main = pretrain_main()
    frozen = tmp_path / "frozen"
    tf.Dinov2Model.from_pretrained(frozen_models / "dinov2").save_pretrained(frozen)
    first = _arguments(data, tmp_path / "run", frozen, backbone="timm:resnet10t", max_steps=4)
    try:
        assert main(first) == 0
    finally:
        reset_accelerate()
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    queue = saved(checkpoint, "distillation")["features"]
    assert queue.abs().sum(-1).gt(0).sum() == 16  # 4 steps x 4 images in a queue of 16 (16 images)
    # The same path, other weights: refused with exit 2, nothing trained.
    other = tf.Dinov2Model.from_pretrained(frozen)
    with torch.no_grad():
        other.layernorm.weight.add_(1.0)
    other.save_pretrained(frozen)
    resume = _arguments(
        data, tmp_path / "run", frozen, "--resume_from_checkpoint", "latest", backbone="timm:resnet10t"
    )
    completed = run_cli(*resume)
    assert completed.returncode == 2, completed.stderr
    assert "has other weights" in completed.stderr and "Traceback" not in completed.stderr
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["checkpoint-4"]
    # The model the run started with resumes it, from its queue.
    tf.Dinov2Model.from_pretrained(frozen_models / "dinov2").save_pretrained(frozen)
    try:
        assert main(resume) == 0
    finally:
        reset_accelerate()
    assert (tmp_path / "run" / "checkpoints" / "checkpoint-8").is_dir()


def test_a_frozen_model_that_is_not_a_vision_backbone_is_refused(data, tmp_path):
    tf.BertModel(
        tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    ).save_pretrained(tmp_path / "bert")
    main = pretrain_main()
    try:
        status = main(_arguments(data, tmp_path / "out", tmp_path / "bert", backbone="timm:resnet10t"))
    finally:
        reset_accelerate()
    assert status == 2
    assert not (tmp_path / "out").exists()


def test_distillation_options_need_a_frozen_model_and_fit_together(data, tmp_path, capsys):
    main = pretrain_main()
    cases = {
        ("--distill_local_weight", "0.5"): "name the model to distil with --distill_from",
        ("--distill_from", "timm:resnet10t", "--dino_loss_weight", "0"): "--local_crops_number",
        ("--distill_from", "timm:resnet10t", "--distill_mixup"): "use it with --dino_loss_weight 0",
    }
    for argv, message in cases.items():
        status = main(["--train_dir", str(data / "images"), "--output_dir", str(tmp_path / "o"), *argv])
        assert status == 2, argv
        assert message in capsys.readouterr().err, argv


@pytest.mark.slow
def test_two_processes_distil_with_one_queue_of_both_batches(data, frozen_models, tmp_path):
    """DDP on two CPU processes: each queue receives the global features of both processes' images (a gather),
    so the checkpoint's queue, written by the main process, holds the whole batches."""
    output_dir = tmp_path / "out"
    # 2 steps of 2 x 4 images: 16 features, the queue of a 16-image epoch (16) filled exactly once.
    argv = _arguments(data, output_dir, frozen_models / "dinov2", backbone="timm:resnet10t", num_train_epochs=1)
    argv += ["--checkpointing_steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(
        [*accelerate_launch(2), str(SCRIPT), *argv], env=env, capture_output=True, text=True, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    queue = saved(output_dir / "checkpoints" / "checkpoint-2", "distillation")
    assert queue["features"].shape == (16, 48) and queue["features"].abs().sum(-1).gt(0).all()
    assert int(queue["position"]) == 0
    assert (output_dir / "student_backbone" / "config.json").is_file()
