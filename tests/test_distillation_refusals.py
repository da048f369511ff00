"""What a new user gets wrong when distilling, each said in one line with exit status 2 and no traceback: a
frozen model at an input size it cannot take, a DinoModel preset (random weights) as the frozen model, a
local path that is not there, a Hub id or timm weights that cannot be read, and a resume of a distillation
checkpoint without `--distill_from`."""

import re
import subprocess
import sys

import pytest
import timm
import torch
import transformers as tf
from runs import ENV, SCRIPT, pretrain_main, reset_accelerate, run_cli
from safetensors.torch import load_file

VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
# Distillation alone into a timm CNN, one view, 4 steps of 4 images.
DISTIL = {
    "backbone": "timm:resnet10t",
    "dino_loss_weight": 0,
    "local_crops_number": 0,
    "global_crops_size": 32,
    "per_device_train_batch_size": 4,
    "samples_per_epoch": 16,
    "max_steps": 4,
    "dataloader_num_workers": 0,
    "shuffle_buffer_size": 8,
    "checkpointing_steps": "4",
    "logging_steps": 2,
    "warmup_epochs": 0,
}


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """Tiny frozen models: a transformers ViT of patch 8, a Dinov2 of patch 14, a timm ViT of patch 8."""
    root = tmp_path_factory.mktemp("frozen")
    torch.manual_seed(0)
    tf.ViTModel(tf.ViTConfig(**VIT, patch_size=8)).save_pretrained(root / "vit8")
    tf.Dinov2Model(tf.Dinov2Config(**{**VIT, "image_size": 28}, patch_size=14)).save_pretrained(root / "dinov2_14")
    timm_vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    timm.models.save_for_hf(timm_vit, root / "timm_vit8", safe_serialization=True)
    return root


def arguments(data, output_dir, frozen_model, **settings) -> list[str]:
    """The command line of a distillation run (`frozen_model` None: without --distill_from; a setting None: left
    out)."""
    argv = ["--train_dir", str(data / "images"), "--output_dir", str(output_dir)]
    if frozen_model is not None:
        argv += ["--distill_from", str(frozen_model)]
    for name, value in {**DISTIL, **settings}.items():
        if value is not None:
            argv += [f"--{name}", str(value)]
    return argv


# id -> (frozen model under the fixture's folder or as named, settings, what the one line says)
CASES = {
    "vit_patch_8_at_60_px": ("vit8", {"global_crops_size": 60}, "set --distill_teacher_size) 60 is not a multiple"),
    "dinov2_patch_14_at_64_px": ("dinov2_14", {"global_crops_size": 64}, "use a multiple such as 56"),
    "timm_vit_patch_8_at_60_px": ("timm_vit8", {"global_crops_size": 60}, "use --distill_teacher_size 56 or 64"),
    "a_teacher_size_of_4": ("vit8", {"distill_teacher_size": 4}, "--distill_teacher_size 4 is not a multiple"),
    "a_preset_as_frozen_model": ("=vit_small_patch16", {}, "a DinoModel preset has random weights"),
    "a_missing_local_folder": ("=models/does_not_exist", {}, "nothing is at that path"),
    "a_missing_student_folder": ("vit8", {"model_name_or_path": "models/nope", "backbone": None}, "nothing is at"),
}


def case_arguments(case, data, frozen, tmp_path) -> list[str]:
    model, settings, _ = CASES[case]
    return arguments(data, tmp_path / "out", model[1:] if model.startswith("=") else frozen / model, **settings)


@pytest.mark.parametrize("case", list(CASES))
def test_refused_in_one_line(case, data, frozen, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # `models/...` reads as a local path here
    try:
        status = pretrain_main()(case_arguments(case, data, frozen, tmp_path))
    finally:
        reset_accelerate()
    stderr = capsys.readouterr().err
    assert status == 2, stderr
    assert CASES[case][2] in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_refused_through_the_cli(case, data, frozen, tmp_path):
    (tmp_path / "models").mkdir()
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *case_arguments(case, data, frozen, tmp_path)],
        env=ENV,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert CASES[case][2] in completed.stderr and "Traceback" not in completed.stderr


@pytest.mark.parametrize(
    "name, settings",
    [
        ("someorg/not-a-model", {}),
        ("timm:resnet18", {}),
        ("vit8", {"model_name_or_path": "org/nope", "backbone": None}),
    ],
    ids=["hub_id", "timm_weights", "student_hub_id"],
)
def test_a_model_that_cannot_be_read_from_the_hub_is_one_line(name, settings, data, frozen, tmp_path):
    argv = arguments(data, tmp_path / "out", frozen / name if (frozen / name).exists() else name, **settings)
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        env={**ENV, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    lines = [line for line in completed.stderr.splitlines() if line.startswith("pretrain.py: error:")]
    assert len(lines) == 1 and "Traceback" not in completed.stderr, completed.stderr[-3000:]
    flag = "--model_name_or_path" if "model_name_or_path" in settings else "--distill_from"
    assert f"{flag} " in lines[0] and "HF_HUB_OFFLINE is set" in lines[0] and "hf download" in lines[0]


@pytest.mark.slow
def test_resuming_a_distillation_checkpoint_without_its_frozen_model_says_what_it_was(data, frozen, tmp_path, capsys):
    main = pretrain_main()
    try:
        assert main(arguments(data, tmp_path / "run", frozen / "vit8")) == 0
    finally:
        reset_accelerate()
    # The checkpoint holds the student with its projectors, the optimiser, the queue and the run's state: no EMA
    # copy of the student, no DINO center.
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    sizes = {path.name: path.stat().st_size for path in checkpoint.iterdir() if path.is_file()}
    assert set(sizes) == {
        "student.safetensors",
        "optimizer.pt",
        "distillation.safetensors",
        "trainer_state.json",
        "training_args.json",
        "rng_state_0.pt",
        "data_state_0.pt",
        "manifest.json",
    }
    student = load_file(checkpoint / "student.safetensors")
    assert {key.split(".")[0] for key in student} == {"backbone", "distill_projector"}
    student_bytes = sum(t.numel() * t.element_size() for t in student.values())
    assert student_bytes < sizes["student.safetensors"] < student_bytes + 64 * 1024  # the tensors and a header
    queue = load_file(checkpoint / "distillation.safetensors")
    assert set(queue) == {"features", "position"} and queue["features"].shape == (16, 32)
    assert [path.name for path in checkpoint.iterdir() if path.is_dir()] == ["student_backbone"]
    out = capsys.readouterr().out
    assert (
        f"distillation: the frozen {frozen / 'vit8'} sees the view at 32 px in no precision; distill_global (queue "
        "KL over 16 features, weight 1), distill_local (patch-similarity KL, weight 1); mixup off; exports the "
        "student as student_backbone"
    ) in out
    assert "frozen for the whole run" not in out
    # The console line of a distillation step shows its two terms, and no EMA teacher's momentum or temperature.
    lines = [line for line in out.splitlines() if line.startswith("step 2 epoch")]
    assert len(lines) == 1 and re.search(r" loss=\S+ distill_global=\S+ distill_local=\S+ lr=", lines[0]), lines
    assert "momentum" not in lines[0] and "teacher_temp" not in lines[0]
    # The same command without the distillation settings (a forgotten config): a DINO run on the checkpoint.
    forgotten = arguments(data, tmp_path / "run", None, dino_loss_weight=None, resume_from_checkpoint="latest")
    completed = run_cli(*forgotten)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "was trained distilling" in completed.stderr and "Traceback" not in completed.stderr
    assert str(frozen / "vit8") in completed.stderr
