import json
import math
from pathlib import Path

import pytest

from dino_hf import DinoConfig, DinoModel
from dino_hf.training.arguments import DinoTrainingArguments, check_crop_sizes, parse_training_args


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    (folder / "a.png").write_bytes(b"")  # validation only checks that the folder exists
    return str(folder)


def make(image_dir, **overrides):
    return DinoTrainingArguments(train_dir=image_dir, **overrides)


def test_defaults_are_the_reference_recipe(image_dir):
    args = make(image_dir)
    assert (args.out_dim, args.momentum_teacher, args.teacher_temp, args.warmup_teacher_temp) == (
        65536,
        0.996,
        0.04,
        0.04,
    )
    assert (args.learning_rate, args.min_lr, args.warmup_epochs, args.weight_decay, args.weight_decay_end) == (
        0.0005,
        1e-6,
        10,
        0.04,
        0.4,
    )
    assert (args.clip_grad, args.freeze_last_layer, args.drop_path_rate, args.local_crops_number) == (3.0, 1, 0.1, 8)
    assert (args.global_crops_scale, args.local_crops_scale) == ([0.4, 1.0], [0.05, 0.4])
    assert (args.global_crops_size, args.local_crops_size, args.per_device_train_batch_size) == (224, 96, 64)
    assert (args.student_temp, args.center_momentum, args.optimizer, args.norm_last_layer) == (0.1, 0.9, "adamw", True)
    # DINOv2's stabilisers are off: the paper's running center, no KoLeo.
    assert (args.centering, args.sinkhorn_iterations, args.koleo_weight) == ("center", 3, 0.0)


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        ({"out_dim": 0}, "out_dim", "an integer >= 1"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size", "an integer >= 1"),
        ({"learning_rate": -1e-3}, "learning_rate", "a number >= 0"),
        ({"weight_decay": -0.1}, "weight_decay", "a number >= 0"),
        ({"clip_grad": -1.0}, "clip_grad", "a number >= 0"),
        ({"teacher_temp": 0.0}, "teacher_temp", "a temperature in (0, 1]"),
        ({"student_temp": 2.0}, "student_temp", "a temperature in (0, 1]"),
        ({"momentum_teacher": 1.5}, "momentum_teacher", "a momentum in [0, 1]"),
        ({"drop_path_rate": 1.0}, "drop_path_rate", "a rate in [0, 1)"),
        ({"num_train_epochs": 0}, "num_train_epochs", "a number > 0"),
        ({"max_train_steps": 0}, "max_train_steps", "an integer >= 1, or leave it unset"),
        ({"max_steps": 0}, "max_steps", "an integer >= 1, or leave it unset"),
        ({"blur_sigma": [1.0, 0.5]}, "blur_sigma", "two numbers 0 < low <= high"),
        ({"blur_p": [1.0, 0.1]}, "blur_p", "three probabilities (global crop 1, global crop 2, local crops)"),
        ({"solarize_p": 1.5}, "solarize_p", "a probability in [0, 1]"),
        ({"color_jitter": [0.4, 0.4, 0.2]}, "color_jitter", "four strengths: brightness, contrast, saturation"),
        ({"color_jitter": [0.4, 0.4, 0.2, 0.6]}, "color_jitter", "hue in [0, 0.5]"),
        ({"color_jitter": [1.5, 0.4, 0.2, 0.1]}, "color_jitter", "saturation in [0, 1]"),
        ({"color_jitter_p": -0.1}, "color_jitter_p", "a probability in [0, 1]"),
        ({"grayscale_p": 2.0}, "grayscale_p", "a probability in [0, 1]"),
        ({"global_crops_scale": [0.5, 0.2]}, "global_crops_scale", "two numbers 0 < low <= high <= 1"),
        ({"local_crops_scale": [0.05]}, "local_crops_scale", "two numbers 0 < low <= high <= 1"),
        ({"checkpointing_steps": "often"}, "checkpointing_steps", "a number of steps >= 1, or 'epoch'"),
        ({"optimizer": "adam"}, "optimizer", "one of adamw, sgd, lars"),
        ({"mixed_precision": "fp8"}, "mixed_precision", "no, fp16 or bf16"),
        ({"centering": "sinkhorn"}, "centering", "center (the paper's running center) or sinkhorn_knopp"),
        ({"sinkhorn_iterations": 0}, "sinkhorn_iterations", "an integer >= 1"),
        ({"koleo_weight": -0.1}, "koleo_weight", "a number >= 0"),
        (
            {"koleo_weight": 0.1, "per_device_train_batch_size": 1},
            "per_device_train_batch_size",
            "at least 2 with --koleo_weight",
        ),
        ({"report_to": "tensorbord"}, "report_to", "none, or a comma-separated list of"),
        ({"backbone": "resnet50"}, "backbone", "a timm model as timm:NAME"),
        ({"backbone": "timm:resnet_50"}, "backbone", "a model name that timm knows"),
        ({"model_name_or_path": "vit_smal_patch16"}, "model_name_or_path", "a DinoModel preset (vit_tiny_patch16"),
        (
            {"model_name_or_path": "vit_small_patch16", "backbone": "timm:resnet50"},
            "backbone",
            "they are alternatives",
        ),
        ({"local_crops_size": 90}, "local_crops_size", "a multiple of the backbone's patch size 16, e.g. 80"),
        (
            {"model_name_or_path": "vit_small_patch8", "global_crops_size": 100},
            "global_crops_size",
            "patch size 8, e.g. 96",
        ),
        ({"push_to_hub": True}, "hub_model_id", "a repository id such as org/dino-vits16"),
        ({"resume_from_checkpoint": "/no/such/checkpoint-3"}, "resume_from_checkpoint", "'latest'"),
        ({"eval_steps": 10}, "eval_steps", "--eval_dataset_name or --eval_train_dir"),
        ({"eval_train_dir": "/no/such/folder"}, "eval_train_dir", "sub-folders train/ and validation/"),
    ],
)
def test_each_wrong_value_is_named_with_what_is_allowed(image_dir, overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        make(image_dir, **overrides)
    message = str(error.value)
    assert message.startswith(f"--{field}=")
    assert allowed in message


def test_data_sources_are_checked(image_dir, tmp_path):
    with pytest.raises(ValueError, match="no training data: pass --dataset_name"):
        DinoTrainingArguments()
    with pytest.raises(ValueError, match="--train_dir='/no/such/images' is not valid: an existing folder"):
        DinoTrainingArguments(train_dir="/no/such/images")
    with pytest.raises(ValueError, match="--data_files='/no/\\*.parquet' is not valid: paths or globs"):
        DinoTrainingArguments(data_files=["/no/*.parquet"])
    with pytest.raises(ValueError, match="--demo=True is not valid: train on the demo dataset or on --train_dir"):
        DinoTrainingArguments(demo=True, train_dir=image_dir)
    with pytest.raises(ValueError, match="--train_dir=.*leave it unset when --dataset_name is given"):
        DinoTrainingArguments(train_dir=image_dir, dataset_name="org/images")


def test_saved_model_folder_is_checked_against_its_patch_size(image_dir, tmp_path):
    config = DinoConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    DinoModel(config).save_pretrained(tmp_path / "model")
    make(image_dir, model_name_or_path=str(tmp_path / "model"), global_crops_size=32, local_crops_size=16)
    with pytest.raises(ValueError, match="--local_crops_size=12 .* patch size 8, e.g. 8"):
        make(image_dir, model_name_or_path=str(tmp_path / "model"), global_crops_size=32, local_crops_size=12)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--model_name_or_path=.*has no config.json"):
        make(image_dir, model_name_or_path=str(tmp_path / "empty"))


def test_check_crop_sizes():
    args = DinoTrainingArguments(demo=True, global_crops_size=32, local_crops_size=12, local_crops_number=0)
    check_crop_sizes(args, 8)  # no local crops: their size does not matter
    check_crop_sizes(args, None)  # a CNN takes any size
    args.local_crops_number = 2
    with pytest.raises(ValueError, match="--local_crops_size=12"):
        check_crop_sizes(args, 8)


def test_yaml_sets_defaults_and_flags_override(tmp_path, image_dir):
    config = tmp_path / "recipe.yaml"
    config.write_text(f"train_dir: {image_dir}\nout_dim: 1024\nteacher_temp: 0.07\nglobal_crops_scale: [0.3, 1.0]\n")
    args = parse_training_args(["--config", str(config), "--out_dim", "2048"])
    assert (args.out_dim, args.teacher_temp, args.global_crops_scale) == (2048, 0.07, [0.3, 1.0])


def test_yaml_unknown_key_and_bad_value_are_refused(tmp_path, image_dir):
    config = tmp_path / "recipe.yaml"
    config.write_text(f"train_dir: {image_dir}\nout_dims: 1024\n")
    with pytest.raises(ValueError, match="unknown field\\(s\\) out_dims"):
        parse_training_args(["--config", str(config)])
    config.write_text(f"train_dir: {image_dir}\nout_dim: 0\n")
    with pytest.raises(ValueError, match="--out_dim=0 is not valid"):
        parse_training_args(["--config", str(config)])


def test_every_shipped_recipe_parses(image_dir):
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))
    assert recipes
    for recipe in recipes:
        data = [] if "demo: true" in recipe.read_text() else ["--train_dir", image_dir]
        args = parse_training_args(["--config", str(recipe), *data])
        assert args.to_dict()["out_dim"] >= 1, recipe


def test_token_is_never_in_the_saved_configuration(tmp_path, image_dir):
    args = make(image_dir, hub_token="hf_secretTOKEN123", push_to_hub=True, hub_model_id="org/dino")
    assert "hub_token" not in args.to_dict()
    args.save(tmp_path / "args.json")
    text = (tmp_path / "args.json").read_text()
    assert "hf_secretTOKEN123" not in text
    assert json.loads(text)["hub_model_id"] == "org/dino"
    assert args.hub_token == "hf_secretTOKEN123"  # still usable by the run itself


def test_a_data_source_replaces_the_demo_data_of_a_config(tmp_path, image_dir):
    demo = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
    args = parse_training_args(["--config", str(demo), "--train_dir", image_dir])
    assert (args.demo, args.train_dir, args.out_dim) == (False, image_dir, 1024)  # the demo recipe, the user's data
    args = parse_training_args(["--config", str(demo), "--dataset_name=org/images"])
    assert (args.demo, args.dataset_name) == (False, "org/images")
    own = tmp_path / "own.yaml"
    own.write_text(demo.read_text() + f"train_dir: {image_dir}\n")
    assert parse_training_args(["--config", str(own)]).demo is False
    assert parse_training_args(["--config", str(demo)]).demo is True
    with pytest.raises(ValueError, match="--demo=True is not valid: train on the demo dataset or on --train_dir"):
        parse_training_args(["--config", str(demo), "--demo", "--train_dir", image_dir])


def test_dinov2_stabilisers_parse_from_the_command_line(image_dir):
    args = parse_training_args(
        [
            "--train_dir",
            image_dir,
            "--centering",
            "sinkhorn_knopp",
            "--sinkhorn_iterations",
            "5",
            "--koleo_weight",
            "0.1",
        ]
    )
    assert (args.centering, args.sinkhorn_iterations, args.koleo_weight) == ("sinkhorn_knopp", 5, 0.1)
    assert args.to_dict()["centering"] == "sinkhorn_knopp"


def test_augmentation_strengths_parse_and_default_to_the_paper(image_dir):
    default = make(image_dir)
    assert (default.color_jitter, default.color_jitter_p, default.grayscale_p) == ([0.4, 0.4, 0.2, 0.1], 0.8, 0.2)
    assert (default.blur_sigma, default.blur_p, default.solarize_p) == ([0.1, 2.0], [1.0, 0.1, 0.5], 0.2)
    args = parse_training_args(
        ["--train_dir", image_dir, "--blur_sigma", "0.1", "0.5", "--blur_p", "0.5", "0", "0", "--solarize_p", "0"]
        + ["--color_jitter", "0.3", "0.2", "0.8", "0.5", "--color_jitter_p", "1", "--grayscale_p", "0.5"]
    )
    assert (args.blur_sigma, args.blur_p, args.solarize_p) == ([0.1, 0.5], [0.5, 0.0, 0.0], 0.0)
    assert (args.color_jitter, args.color_jitter_p, args.grayscale_p) == ([0.3, 0.2, 0.8, 0.5], 1.0, 0.5)


def test_max_steps_lays_the_schedules_over_those_steps_whatever_the_dataset_size(image_dir):
    from dino_hf.training.plan import TrainingPlan
    from dino_hf.training.schedules import cosine_schedule_value

    for images in (100, 3000):
        args = make(image_dir, max_steps=25, per_device_train_batch_size=10, warmup_epochs=1, learning_rate=0.256)
        plan = TrainingPlan.from_args(args, samples_per_epoch=images, num_processes=1, fresh_head=False)
        warmup = min(images // 10, 24)
        assert (plan.total_steps, plan.last_step, plan.lr_warmup_steps) == (25, 25, warmup)
        expected = [cosine_schedule_value(step, 25, 0.01, 1e-6, warmup) for step in range(25)]
        assert [plan.schedule(step)["lr"] for step in range(25)] == pytest.approx(expected, rel=1e-12)
        assert plan.schedule(24)["momentum"] == pytest.approx(1 - 0.004 * 0.5 * (1 + math.cos(math.pi * 24 / 25)))
    # --max_train_steps still only stops early: the schedules keep the epochs' length.
    args = make(image_dir, max_steps=25, max_train_steps=5, per_device_train_batch_size=10)
    plan = TrainingPlan.from_args(args, samples_per_epoch=100, num_processes=1, fresh_head=False)
    assert (plan.total_steps, plan.last_step) == (25, 5)


def test_the_run_builds_its_crops_with_the_augmentation_arguments(image_dir):
    from dino_hf.augment.multicrop import MultiCropTransform
    from dino_hf.training.trainer import multicrop_options

    crops = dict(global_crops_size=64, local_crops_size=32, blur_sigma=[0.1, 0.6], blur_p=[0.5, 0, 0], solarize_p=0)
    args = make(image_dir, **crops, color_jitter=[0.3, 0.2, 0.8, 0.5], color_jitter_p=1.0, grayscale_p=0.5)
    transform = MultiCropTransform(**multicrop_options(args))
    assert (transform.global_crops_size, transform.local_crops_size, transform.local_crops_number) == (64, 32, 8)
    assert (transform.blur_sigma, transform.blur_p, transform.solarize_p) == ((0.1, 0.6), (0.5, 0.0, 0.0), 0.0)
    jitter = (transform.brightness, transform.contrast, transform.saturation, transform.hue)
    assert (jitter, transform.jitter_p, transform.grayscale_p) == ((0.3, 0.2, 0.8, 0.5), 1.0, 0.5)
    paper = MultiCropTransform(**multicrop_options(make(image_dir)))
    assert (paper.blur_sigma, paper.hue, paper.saturation, paper.grayscale_p) == ((0.1, 2.0), 0.1, 0.2, 0.2)


def test_config_overrides_change_the_preset_trained_from_scratch(image_dir):
    from dino_hf.training.networks import build_student_teacher

    args = make(
        image_dir,
        model_name_or_path="vit_tiny_patch8",
        config_overrides="num_hidden_layers=2,qkv_bias=false,layer_norm_eps=1e-5",
        global_crops_size=32,
        local_crops_size=16,
        out_dim=16,
        head_hidden_dim=32,
        head_bottleneck_dim=8,
    )
    student, teacher, fresh_head = build_student_teacher(args)
    config = student.backbone.model.config
    assert (config.num_hidden_layers, config.qkv_bias, config.layer_norm_eps) == (2, False, 1e-5)
    assert (config.hidden_size, config.patch_size, config.image_size) == (192, 8, 32)  # the rest of the preset
    assert len(student.backbone.model.encoder.layer) == 2 and teacher.backbone.model.config.num_hidden_layers == 2
    assert not fresh_head  # from scratch: no head warm-up


def test_config_overrides_set_dinov2_fields_that_are_unset_in_the_preset(image_dir):
    from dino_hf.training.arguments import preset_overrides

    args = make(
        image_dir,
        model_name_or_path="vit_small_patch16",
        config_overrides="num_register_tokens=4, layerscale_value=1e-5,drop_path_uniform=true",
    )
    assert preset_overrides(args) == {"num_register_tokens": 4, "layerscale_value": 1e-5, "drop_path_uniform": True}


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"config_overrides": "num_layers=6"}, "key num_layers isn't in the original config dict"),
        ({"config_overrides": "num_hidden_layers=six"}, "invalid literal for int"),
        ({"config_overrides": "num_hidden_layers"}, "comma-separated key=value fields of DinoConfig"),
        ({"config_overrides": "drop_path_rate=0.2"}, "set drop_path_rate with --drop_path_rate instead"),
        ({"config_overrides": "image_size=96"}, "set image_size with --global_crops_size instead"),
        ({"config_overrides": "num_attention_heads=5"}, "hidden_size 192 must be a multiple of num_attention_heads 5"),
        ({"config_overrides": "patch_size=14"}, "a multiple of the backbone's patch size 14"),
        ({"config_overrides": "layerscale_value=-1"}, "layerscale_value must be None"),
        ({"config_overrides": "layerscale_value=small"}, "could not convert string to float"),
        (
            {"config_overrides": "num_hidden_layers=6", "model_name_or_path": None, "backbone": "timm:resnet18"},
            "it changes a DinoModel preset trained from scratch",
        ),
    ],
)
def test_config_overrides_refuse_what_they_cannot_change(image_dir, overrides, message):
    fields = {"model_name_or_path": "vit_tiny_patch8", "global_crops_size": 64, "local_crops_size": 32, **overrides}
    with pytest.raises(ValueError, match=message):
        make(image_dir, **fields)


def test_config_overrides_of_the_default_preset_parse_from_the_command_line(image_dir):
    args = parse_training_args(["--train_dir", image_dir, "--config_overrides", "num_hidden_layers=4"])
    assert (args.model_name_or_path, args.config_overrides) == (None, "num_hidden_layers=4")  # vit_small_patch16


def test_a_configs_knn_guard_gives_way_without_an_evaluation_set(tmp_path, image_dir):
    config = tmp_path / "guarded.yaml"
    config.write_text("eval_steps: 50\nstop_if_knn_drops: 5.0\n")
    args = parse_training_args(["--config", str(config), "--train_dir", image_dir])
    assert args.eval_steps is None and args.stop_if_knn_drops is None
    with pytest.raises(ValueError, match="--eval_steps=50 is not valid"):
        parse_training_args(["--config", str(config), "--train_dir", image_dir, "--eval_steps", "50"])
