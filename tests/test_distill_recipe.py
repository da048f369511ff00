"""configs/distill.yaml is LightlyTrain's distillation (v3) recipe with the documented values, its peak
learning rate follows its rule, and benchmarks/distillation.py runs it on its budget for each student."""

import math
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distillation as benchmark  # noqa: E402

from dino_hf.training.arguments import parse_training_args
from dino_hf.training.plan import TrainingPlan

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "distill.yaml")


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frozen") / "dinov2"
    torch.manual_seed(0)
    config = tf.Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=64, patch_size=8)
    tf.Dinov2Model(config).save_pretrained(folder)
    return folder


def test_the_recipe_holds_lightlytrains_values(frozen, tmp_path):
    args = parse_training_args(["--config", CONFIG, "--distill_from", str(frozen), "--train_dir", str(tmp_path)])
    assert (args.dino_loss_weight, args.local_crops_number, args.solarize_p) == (0, 0, 0)
    assert (args.distill_global_weight, args.distill_local_weight, args.distill_local_loss) == (1.0, 1.0, "similarity")
    assert (args.distill_projector, args.global_crops_size, args.global_crops_scale) == ("linear", 224, [0.14, 1.0])
    assert (args.color_jitter, args.color_jitter_p, args.grayscale_p) == ([0.4, 0.4, 0.2, 0.1], 0.8, 0.2)
    assert max(args.blur_sigma) <= 0.1 and args.optimizer == "adamw" and args.clip_grad == 1.0
    assert (args.weight_decay, args.weight_decay_end, args.weight_decay_batchnorm, args.min_lr) == (
        0.04,
        0.04,
        1e-6,
        0,
    )
    assert (args.warmup_epochs, args.warmup_fraction) == (10, 0.1)  # the shorter of 10 epochs and 10 % of the run
    assert (args.num_train_epochs, args.per_device_train_batch_size) == (100, 128)
    assert (args.learning_rate, args.lr_scaling) == (0.0005, "sqrt_wrt_1536")


def test_the_several_teacher_recipe_holds_radios_objective(frozen, tmp_path):
    config = str(Path(CONFIG).with_name("distill_multi.yaml"))
    args = parse_training_args(["--config", config, "--train_dir", str(tmp_path), "--distill_from", str(frozen)])
    assert (args.distill_global_loss, args.distill_local_loss, args.distill_projector) == ("cosine", "cosine", "mlp")
    assert (args.distill_balancing, args.distill_teacher_drop, args.dino_loss_weight) == ("phi_s", 0.0, 0)
    assert (args.backbone, args.global_crops_size, args.distill_teacher_size) == ("timm:convnext_tiny", 224, [224])
    defaults = parse_training_args(["--config", config, "--train_dir", str(tmp_path)])
    assert defaults.distill_from == ["facebook/dinov3-vits16-pretrain-lvd1689m", "google/siglip2-base-patch16-224"]


@pytest.mark.parametrize("batch", [32, 128, 1536])
def test_the_peak_lr_follows_the_recipes_rule(frozen, tmp_path, batch):
    args = parse_training_args(
        ["--config", CONFIG, "--distill_from", str(frozen), "--train_dir", str(tmp_path)]
        + ["--per_device_train_batch_size", str(batch)]
    )
    plan = TrainingPlan.from_args(args, samples_per_epoch=10 * batch, num_processes=1, fresh_head=False)
    assert plan.peak_lr == pytest.approx(args.learning_rate * math.sqrt(batch / 1536))


@pytest.mark.parametrize("student", list(benchmark.STUDENTS))
def test_the_benchmark_runs_the_recipe_at_its_budget(frozen, tmp_path, student):
    domain = tmp_path / "domain"
    for split in ("train", "validation"):
        (domain / split / "a").mkdir(parents=True)
        (domain / split / "a" / "0.png").touch()  # the benchmark counts the images for samples_per_epoch
    flags = benchmark.DISTIL + benchmark.STUDENTS[student][1] + ["--distill_from", str(frozen), "--max_steps", "372"]
    args = parse_training_args(flags + benchmark.BUDGET + benchmark._data_flags(domain))
    assert args.distill_from == [str(frozen)] and args.dino_loss_weight == 0
    assert (args.learning_rate, args.warmup_fraction) == (0.009, 0.1)  # the short-run recipe
    assert (args.global_crops_size, args.per_device_train_batch_size, args.max_steps) == (64, 32, 372)
    assert args.mixed_precision == "no" and args.eval_train_dir == str(domain)
