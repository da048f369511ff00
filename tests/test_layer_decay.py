"""Layer-wise lr decay, the patch embedding's multiplier and block freezing (dino_hf/training/layer_decay.py).

Each family's expected lr is written here by hand as prefix -> exponent e (lr x 0.9^e, x 0.2 for
the patch embedding): DINOv2's rule, block b of L at e = L - b, the embeddings at L + 1, the final
norm and the head at 0.
"""

import copy
import os
import subprocess

import pytest
import timm
import torch
import transformers
from processes import accelerate_launch
from runs import SCRIPT, pretrain_arguments
from safetensors.torch import load_file
from tiny import TINY_VIT
from torch import nn

from dino_hf import DinoConfig, DinoModel
from dino_hf.models.backbones import DinoModelBackbone, TimmBackbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.layout import RULES, backbone_layout
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.models.transformers_backbone import FAMILIES
from dino_hf.objectives.dino import DinoLoss
from dino_hf.run_files.whole_weights import load_whole_optimizer_state_dict, whole_optimizer_state_dict
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.layer_decay import freeze_blocks_
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.plan import TrainingPlan
from dino_hf.training.step import StepValues, _set_schedule, train_step
from dino_hf.training.teacher import build_teacher

LR, WD, DECAY, MULT = 0.01, 0.04, 0.9, 0.2
STEP = dict(lr=LR, weight_decay=WD, momentum=0.9, teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=False)
K = 16
HIERARCHICAL = dict(hidden_sizes=[8, 16], depths=[2, 1])


class Wrapped(nn.Module):
    """The simplest backbone wrapper: the model as `.model`, its `pooler_output` as the feature."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output.flatten(1)  # (B, D)


def tiny_dino():
    return DinoModelBackbone(DinoModel(DinoConfig(**TINY_VIT, drop_path_rate=0.0)))


def _timm(name: str, **options) -> TimmBackbone:
    return TimmBackbone(timm.create_model(name, pretrained=False, num_classes=0, **options))


# name -> (backbone builder, [(prefix, exponent, patch embedding)]): the first prefix that matches.
EXPECTED = {
    "dino": (
        tiny_dino,
        [
            ("embeddings.patch_embeddings.", 3, True),
            ("embeddings.", 3, False),  # CLS token, position embeddings
            ("encoder.layer.0.", 2, False),
            ("encoder.layer.1.", 1, False),
            ("layernorm.", 0, False),
        ],
    ),
    "timm_vit": (
        lambda: _timm(
            "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, reg_tokens=1
        ),
        [
            ("patch_embed.", 3, True),
            ("cls_token", 3, False),
            ("reg_token", 3, False),
            ("pos_embed", 3, False),
            ("blocks.0.", 2, False),
            ("blocks.1.", 1, False),
            ("norm.", 0, False),  # timm merges it into the last block's group; DINOv2 counts it after them
        ],
    ),
    "timm_resnet": (  # stages of 2, 1, 1, 1 blocks: L = 5
        lambda: _timm("resnet18", layers=(2, 1, 1, 1), channels=(8, 8, 16, 16), stem_width=8),
        [
            ("conv1.", 6, True),  # the stem: first conv and its norm
            ("bn1.", 6, True),
            ("layer1.0.", 5, False),
            ("layer1.1.", 4, False),
            ("layer2.0.", 3, False),
            ("layer3.0.", 2, False),
            ("layer4.0.", 1, False),
        ],
    ),
    "dinov2": (
        lambda: Wrapped(transformers.Dinov2Model(transformers.Dinov2Config(**TINY_VIT))),
        [
            ("embeddings.patch_embeddings.", 3, True),
            ("embeddings.", 3, False),  # CLS, mask token, position embeddings
            ("encoder.layer.0.", 2, False),
            ("encoder.layer.1.", 1, False),
            ("layernorm.", 0, False),
        ],
    ),
    "dinov3_vit": (
        lambda: Wrapped(transformers.DINOv3ViTModel(transformers.DINOv3ViTConfig(**TINY_VIT, num_register_tokens=2))),
        [
            ("embeddings.patch_embeddings.", 3, True),
            ("embeddings.", 3, False),  # CLS, mask and register tokens
            ("model.layer.0.", 2, False),
            ("model.layer.1.", 1, False),
            ("norm.", 0, False),
        ],
    ),
    "convnext": (  # stages of 2 and 1 blocks: L = 3
        lambda: Wrapped(transformers.ConvNextModel(transformers.ConvNextConfig(**HIERARCHICAL, num_stages=2))),
        [
            ("embeddings.", 4, True),  # the stem: patchify conv and its norm
            ("encoder.stages.0.layers.0.", 3, False),
            ("encoder.stages.0.layers.1.", 2, False),
            ("encoder.stages.1.downsampling_layer.", 1, False),  # with the stage it starts
            ("encoder.stages.1.layers.0.", 1, False),
            ("layernorm.", 0, False),
        ],
    ),
    "swin": (
        lambda: Wrapped(
            transformers.SwinModel(
                transformers.SwinConfig(
                    image_size=32, patch_size=2, embed_dim=8, depths=[2, 1], num_heads=[1, 2], window_size=4
                )
            )
        ),
        [
            ("embeddings.", 4, True),  # patch embedding and its norm
            ("encoder.layers.0.blocks.0.", 3, False),
            ("encoder.layers.0.blocks.1.", 2, False),
            ("encoder.layers.0.downsample.", 1, False),  # runs after stage 0, starts stage 1
            ("encoder.layers.1.blocks.0.", 1, False),
            ("layernorm.", 0, False),
        ],
    ),
}


def student_of(backbone: nn.Module, width: int) -> MultiCropWrapper:
    return MultiCropWrapper(backbone, DinoHead(width, out_dim=K, hidden_dim=16, bottleneck_dim=8))


def lr_by_parameter(optimizer) -> dict[int, float]:
    return {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}


def expected_exponent(table, name: str) -> tuple[int, bool]:
    for prefix, exponent, patch in table:
        if name.startswith(prefix):
            return exponent, patch
    raise AssertionError(f"{name} is in none of the test's prefixes")


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_each_parameter_trains_at_its_layers_rate(family):
    build, table = EXPECTED[family]
    torch.manual_seed(0)
    backbone = build()
    student = student_of(backbone, 8)
    optimizer = build_optimizer("adamw", get_param_groups(student, layer_decay=DECAY, patch_embed_lr_mult=MULT))
    _set_schedule(optimizer, LR, WD, backbone_lr_factor=1.0)
    lr = lr_by_parameter(optimizer)
    for name, param in backbone.model.named_parameters():
        exponent, patch = expected_exponent(table, name)
        assert lr[id(param)] == pytest.approx(LR * DECAY**exponent * (MULT if patch else 1.0), rel=1e-12), name
    assert all(lr[id(p)] == LR for p in student.head.parameters() if p.requires_grad)  # layer L + 1: x 1
    # One group per (regularised, layer) and two for the patch embedding, at most: a handful, not one per tensor.
    layers = len({exponent for _, exponent, _ in table})
    assert len(optimizer.param_groups) <= 2 * (layers + 2)
    in_backbone = {id(p) for p in backbone.parameters()}
    assert all(group["backbone"] == (id(group["params"][0]) in in_backbone) for group in optimizer.param_groups)


def test_the_layouts_cover_every_transformers_family_the_backbones_take():
    assert set(RULES) - {DinoConfig.model_type} == set(FAMILIES)


def test_defaults_need_no_layout_and_leave_every_rate_at_the_global_one():
    student = student_of(Wrapped(nn.Linear(3, 8)), 8)  # a backbone of no known family
    optimizer = build_optimizer("adamw", get_param_groups(student))
    _set_schedule(optimizer, LR, WD, backbone_lr_factor=1.0)
    assert {group["lr"] for group in optimizer.param_groups} == {LR}
    assert {group["lr_scale"] for group in optimizer.param_groups} == {1.0}
    freeze_blocks_(student, 0)
    assert all(p.requires_grad for p in student.backbone.parameters())


@pytest.mark.parametrize(
    "settings",
    [dict(layer_decay=0.9), dict(patch_embed_lr_mult=0.2)],
)
def test_an_unknown_family_is_refused_with_the_supported_ones(settings):
    student = student_of(Wrapped(nn.Linear(3, 8)), 8)
    with pytest.raises(ValueError, match="Linear.*supported: DinoModel, timm models.*dinov2, dinov2_with_registers"):
        get_param_groups(student, **settings)
    with pytest.raises(ValueError, match="not a family they know"):
        freeze_blocks_(student, 1)


def frozen_set(backbone: nn.Module) -> set[str]:
    return {name for name, p in backbone.model.named_parameters() if not p.requires_grad}


def names_with(backbone: nn.Module, *prefixes: str) -> set[str]:
    return {name for name, _ in backbone.model.named_parameters() if name.startswith(prefixes)}


@pytest.mark.parametrize(
    "family, frozen_prefixes, units",
    [
        ("dino", ("embeddings.", "encoder.layer.0."), "2 blocks"),
        ("timm_vit", ("cls_token", "reg_token", "pos_embed", "patch_embed.", "blocks.0."), "2 blocks"),
        # Stage 0 whole (both its blocks); stage 1's downsampling layer starts stage 1 and stays trained.
        ("convnext", ("embeddings.", "encoder.stages.0."), "2 stages"),
        ("swin", ("embeddings.", "encoder.layers.0.blocks."), "2 stages"),
        ("timm_resnet", ("conv1.", "bn1.", "layer1."), "4 stages"),
    ],
)
def test_freezing_the_first_unit(family, frozen_prefixes, units):
    backbone = EXPECTED[family][0]()
    student = student_of(backbone, 8)
    frozen = freeze_blocks_(student, 1)
    assert set(frozen) == frozen_set(backbone) == names_with(backbone, *frozen_prefixes)
    in_optimizer = {id(p) for group in get_param_groups(student) for p in group["params"]}
    assert not any(id(p) in in_optimizer for name, p in backbone.model.named_parameters() if name in frozen)
    count = int(units.split()[0])
    with pytest.raises(ValueError, match=f"--freeze_blocks {count + 1} is more than the {units}"):
        freeze_blocks_(student_of(EXPECTED[family][0](), 8), count + 1)


def dino_setup(seed: int = 0):
    torch.manual_seed(seed)
    student = student_of(tiny_dino(), 32)
    teacher = build_teacher(student)
    dino_loss = DinoLoss(K, 4)
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    return student, teacher, dino_loss, crops


def test_frozen_blocks_stay_as_they_were_through_training_steps():
    student, teacher, dino_loss, crops = dino_setup()
    freeze_blocks_(student, 1)
    frozen = names_with(student.backbone, "embeddings.", "encoder.layer.0.")
    start_student = copy.deepcopy(student.state_dict())
    start_teacher = copy.deepcopy(teacher.state_dict())
    optimizer = build_optimizer("adamw", get_param_groups(student, layer_decay=0.5, patch_embed_lr_mult=0.2))
    for _ in range(3):
        train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP))
    for name in frozen:
        key = f"backbone.model.{name}"
        assert torch.equal(student.state_dict()[key], start_student[key]), name
        # The EMA of a parameter equal in both networks: m t + (1 - m) t, exact up to float rounding.
        torch.testing.assert_close(teacher.state_dict()[key], start_teacher[key], rtol=0, atol=1e-7, msg=name)
    for key in ("backbone.model.encoder.layer.1.output.dense.weight", "backbone.model.layernorm.weight"):
        assert not torch.equal(student.state_dict()[key], start_student[key]), key
        assert (teacher.state_dict()[key] - start_teacher[key]).abs().max() > 1e-5, key


def head_warmup_plan(tmp_path, **overrides) -> TrainingPlan:
    """12 steps of 4 images: lr warm-up over 2 steps, the head alone for the first 3."""
    options = dict(per_device_train_batch_size=2, num_train_epochs=12, warmup_epochs=2, head_warmup_steps=3)
    args = DinoTrainingArguments(train_dir=str(tmp_path), **{**options, **overrides})
    return TrainingPlan.from_args(args, samples_per_epoch=2, num_processes=1, fresh_head=True)


def test_the_backbone_warms_up_on_its_own_after_the_head_warm_up(tmp_path):
    plan = head_warmup_plan(tmp_path, backbone_warmup_steps=4)
    student, teacher, dino_loss, crops = dino_setup()
    optimizer = build_optimizer("adamw", get_param_groups(student, layer_decay=0.5))
    scale = {id(p): group["lr_scale"] for group in optimizer.param_groups for p in group["params"]}
    factors = [0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1]  # 0 for the head's 3 steps, then linspace(0, 1, 4)
    backbone_before = copy.deepcopy(student.backbone.state_dict())
    for step, factor in enumerate(factors):
        schedule = plan.schedule(step)
        train_step(student, teacher, dino_loss, optimizer, crops, plan.step_values(step))
        lr = lr_by_parameter(optimizer)
        for p in student.backbone.parameters():
            assert lr[id(p)] == pytest.approx(schedule["lr"] * factor * scale[id(p)], rel=1e-12, abs=0)
        assert all(lr[id(p)] == schedule["lr"] for p in student.head.parameters() if p.requires_grad)
        if step == 2:  # the head alone so far
            for name, tensor in student.backbone.state_dict().items():
                assert torch.equal(tensor, backbone_before[name]), name
    assert schedule["lr"] > 0


def test_optimizer_state_with_many_groups_resumes_exactly():
    student, teacher, dino_loss, crops = dino_setup()
    fresh = copy.deepcopy(student)
    options = dict(layer_decay=0.5, patch_embed_lr_mult=0.2)
    for model in (student, fresh):
        freeze_blocks_(model, 1)
    optimizer = build_optimizer("adamw", get_param_groups(student, **options))
    train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP))
    saved = whole_optimizer_state_dict(student, optimizer)
    fresh.load_state_dict(student.state_dict())
    fresh_optimizer = build_optimizer("adamw", get_param_groups(fresh, **options))
    load_whole_optimizer_state_dict(fresh, fresh_optimizer, copy.deepcopy(saved))
    keys = ("lr_scale", "backbone", "regularized", "weight_decay")
    assert [[g[key] for key in keys] for g in fresh_optimizer.param_groups] == [
        [g[key] for key in keys] for g in optimizer.param_groups
    ]
    assert len(optimizer.param_groups) > 4
    fresh_teacher, fresh_loss = copy.deepcopy(teacher), copy.deepcopy(dino_loss)
    train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP))
    train_step(fresh, fresh_teacher, fresh_loss, fresh_optimizer, crops, StepValues(**STEP))
    for (name, p), q in zip(student.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), name


def test_layouts_count_blocks_and_stages():
    dino = backbone_layout(tiny_dino().model)
    assert (dino.num_layers, dino.num_units, dino.unit_name) == (2, 2, "blocks")
    resnet = backbone_layout(EXPECTED["timm_resnet"][0]().model)
    assert (resnet.num_layers, resnet.num_units, resnet.unit_name) == (5, 4, "stages")


@pytest.mark.slow
def test_pretrain_script_freezes_and_decays_under_ddp(data, tmp_path):
    """scripts/pretrain.py on 2 CPU processes (DDP): the frozen block in the checkpoint is the starting
    model's, bit for bit, and the block after it trained; DDP runs with the frozen parameters."""
    output_dir = tmp_path / "out"
    command = [
        *accelerate_launch(2),
        str(SCRIPT),
        *pretrain_arguments(
            data,
            output_dir,
            "--layer_decay",
            "0.5",
            "--patch_embed_lr_mult",
            "0.2",
            "--freeze_blocks",
            "1",
            # The head alone at step 0, the backbone at lr x 0 at step 1 (its warm-up's start), x 1 at step 2.
            "--head_warmup_steps",
            "1",
            "--backbone_warmup_steps",
            "2",
            samples_per_epoch=24,  # 3 steps of 8 images over the 2 processes, checkpointed after the last
            num_train_epochs=1,
            checkpointing_steps=3,
        ),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    start = DinoModel.from_pretrained(data / "model").state_dict()
    checkpoint = output_dir / "checkpoints" / "checkpoint-3"
    student, teacher = (load_file(checkpoint / f"{net}.safetensors") for net in ("student", "teacher"))
    frozen = [name for name in start if name.startswith(("embeddings.", "encoder.layer.0."))]
    assert len(frozen) == 4 + 16
    for name in frozen:
        assert torch.equal(student[f"backbone.model.{name}"], start[name]), name
        torch.testing.assert_close(teacher[f"backbone.model.{name}"], start[name], rtol=0, atol=1e-7, msg=name)
    trained = "encoder.layer.1.attention.attention.query.weight"
    assert not torch.equal(student[f"backbone.model.{trained}"], start[trained])


@pytest.mark.parametrize(
    "name, value, allowed",
    [
        ("layer_decay", 0.0, r"a factor in \(0, 1\]"),
        ("layer_decay", 1.1, r"a factor in \(0, 1\]"),
        ("patch_embed_lr_mult", 0.0, "a multiplier > 0"),
        ("freeze_blocks", -1, r"a number of blocks \(ViT\) or stages >= 0"),
        ("backbone_warmup_steps", -1, "a number of steps >= 0, or leave it unset"),
    ],
)
def test_bad_settings_are_refused_with_what_is_allowed(tmp_path, name, value, allowed):
    with pytest.raises(ValueError, match=f"--{name}={value!r} is not valid: {allowed}"):
        DinoTrainingArguments(train_dir=str(tmp_path), **{name: value})
