"""configs/dinov2_vit_small_16.yaml: DINOv2's numbers (dinov2/configs/ssl_default_config.yaml, with 4
registers and Sinkhorn-Knopp centering) reach the run, and the recipe trains."""

from pathlib import Path

import pytest
import torch

from dino_hf.training.arguments import parse_training_args
from dino_hf.training.networks import build_student_teacher
from dino_hf.training.plan import TrainingPlan
from dino_hf.training.trainer import train

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "dinov2_vit_small_16.yaml"
IMAGENET = 1_281_167  # ImageNet-1k's training images


def recipe(*flags: str):
    return parse_training_args(["--config", str(RECIPE), *flags])


def test_the_recipe_holds_dinov2s_numbers(data):
    args = recipe("--train_dir", str(data / "images"))
    expected = {
        "model_name_or_path": "vit_small_patch16",
        "drop_path_rate": 0.3,
        "out_dim": 65536,
        "head_hidden_dim": 2048,
        "head_bottleneck_dim": 256,
        "head_nlayers": 3,
        "norm_last_layer": False,
        "koleo_weight": 0.1,
        "centering": "sinkhorn_knopp",
        "sinkhorn_iterations": 3,
        "ibot_loss_weight": 1.0,
        "mask_ratio_min_max": [0.1, 0.5],
        "mask_sample_probability": 0.5,
        "ibot_separate_head": False,
        "momentum_teacher": 0.992,
        "teacher_temp": 0.07,
        "warmup_teacher_temp": 0.04,
        "warmup_teacher_temp_epochs": 30,
        "learning_rate": 0.004,
        "lr_scaling": "sqrt_wrt_1024",
        "min_lr": 1e-6,
        "warmup_epochs": 10,
        "weight_decay": 0.04,
        "weight_decay_end": 0.4,
        "clip_grad": 3.0,
        "freeze_last_layer": 1,
        "layer_decay": 0.9,
        "patch_embed_lr_mult": 0.2,
        "num_train_epochs": 100,
        "per_device_train_batch_size": 64,
        "global_crops_size": 224,
        "local_crops_size": 96,
        "local_crops_number": 8,
        "global_crops_scale": [0.32, 1.0],
        "local_crops_scale": [0.05, 0.32],
        "student_temp": 0.1,
    }
    values = args.to_dict()
    assert {key: values[key] for key in expected} == expected
    # 16 processes of 64: base_lr 0.004 at a batch of 1024 (sqrt_wrt_1024); 1251 steps an epoch.
    plan = TrainingPlan.from_args(args, samples_per_epoch=IMAGENET, num_processes=16, fresh_head=False)
    assert plan.peak_lr == pytest.approx(0.004) and plan.iterations_per_epoch == 1251
    assert plan.lr_warmup_steps == 12510 and plan.temp_warmup_steps == 30 * 1251
    one = TrainingPlan.from_args(args, samples_per_epoch=IMAGENET, num_processes=1, fresh_head=False)
    assert one.peak_lr == pytest.approx(0.004 * (64 / 1024) ** 0.5)


def test_the_recipe_builds_dinov2s_vit_small(data):
    args = recipe("--train_dir", str(data / "images"), "--out_dim", "64")
    student, teacher, fresh_head = build_student_teacher(args)
    model = student.backbone.model
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.patch_size) == (
        384,
        12,
        6,
        16,
    )
    assert (config.num_register_tokens, config.layerscale_value, config.drop_path_uniform) == (4, 1e-5, True)
    assert config.use_mask_token and not fresh_head  # iBOT's mask token; from scratch
    assert model.embeddings.register_tokens.shape == (1, 4, 384)
    for layer in model.encoder.layer:
        assert layer.drop_path.drop_prob == pytest.approx(0.3)  # uniform, not 0 -> 0.3
        torch.testing.assert_close(layer.layer_scale1.lambda1.detach(), torch.full((384,), 1e-5))
    assert all(layer.drop_path.drop_prob == 0 for layer in teacher.backbone.model.encoder.layer)


@pytest.mark.slow
def test_the_recipe_trains_two_steps(data, tmp_path, capsys):
    """The whole recipe at CPU size: iBOT, KoLeo and Sinkhorn-Knopp terms logged, the export written."""
    small = ["--global_crops_size", "64", "--local_crops_size", "32", "--local_crops_number", "2"]
    small += ["--out_dim", "64", "--head_hidden_dim", "32", "--head_bottleneck_dim", "16"]
    small += ["--per_device_train_batch_size", "4", "--max_steps", "2", "--logging_steps", "1"]
    small += ["--mixed_precision", "no", "--dataloader_num_workers", "0", "--samples_per_epoch", "8"]
    args = recipe("--train_dir", str(data / "images"), "--output_dir", str(tmp_path / "out"), *small)
    result = train(args)
    assert result.global_step == 2
    log = capsys.readouterr().out
    assert "ibot=" in log and "koleo=" in log and "total_loss=" in log
    assert (result.export_dir / "config.json").is_file()
