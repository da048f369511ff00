import copy
import math

import pytest
import torch
from torch.nn import functional as F

from dino_hf.models.backbones import build_backbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.training.loss import DinoLoss
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.step import train_step
from dino_hf.training.teacher import build_teacher

K, B, NCROPS = 64, 2, 4
STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0)


def setup():
    """Fixed student, a teacher that differs from it, a non-zero center and fixed crops."""
    torch.manual_seed(0)
    backbone = build_backbone("timm:test_vit", drop_path_rate=0.0, image_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    student = MultiCropWrapper(backbone, DinoHead(32, out_dim=K, hidden_dim=48, bottleneck_dim=16))
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dino_loss = DinoLoss(K, NCROPS)
    dino_loss.center.copy_(0.1 * torch.randn(1, K))
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(2)]
    return student, teacher, dino_loss, crops


def step_by_hand(student, teacher, center, crops, optimizer_name, freeze_last_layer):
    """One step written from the formulas of docs/recipe.md#training-step, sharing nothing with dino_hf but the networks' forward."""
    with torch.no_grad():
        t = teacher(crops[:2])  # (2B, K)
    s = student(crops)  # (NCROPS * B, K)
    q = F.softmax((t - center) / STEP["teacher_temp"], dim=-1).chunk(2)
    log_p = F.log_softmax(s / 0.1, dim=-1).chunk(NCROPS)
    terms = [(-q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(NCROPS) if v != i]
    loss = sum(terms) / len(terms)
    assert len(terms) == 2 * NCROPS - 2

    names, params = zip(*[(n, p) for n, p in student.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for name, p, g in zip(names, params, grads):
            if freeze_last_layer and "last_layer" in name:
                continue  # no gradient: the optimiser skips it entirely
            coefficient = STEP["clip_grad"] / (g.norm() + 1e-6)
            if coefficient < 1:
                g = g * coefficient
            decay = 0.0 if (name.endswith(".bias") or p.ndim == 1) else STEP["weight_decay"]
            lr = STEP["lr"]
            if optimizer_name == "adamw":  # first step: moments start at 0, bias corrections 0.1 and 0.001
                m, v = 0.1 * g, 0.001 * g * g
                p.mul_(1 - lr * decay)
                p.sub_(lr * (m / 0.1) / ((v / 0.001).sqrt() + 1e-8))
            else:  # SGD, momentum buffer starts as the first gradient
                p.sub_(lr * (g + decay * p))
        momentum = STEP["momentum"]
        for pt, ps in zip(teacher.parameters(), student.parameters()):
            pt.copy_(momentum * pt + (1 - momentum) * ps)
    new_center = 0.9 * center + 0.1 * t.mean(0, keepdim=True)
    return loss.item(), new_center


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
@pytest.mark.parametrize("freeze_last_layer", [False, True])
def test_one_step_equals_step_by_hand(optimizer_name, freeze_last_layer):
    student, teacher, dino_loss, crops = setup()
    hand_student, hand_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    center = dino_loss.center.clone()
    last_layer_before = student.head.last_layer.weight_v.detach().clone()

    optimizer = build_optimizer(optimizer_name, get_param_groups(student), lr=123.0, weight_decay=5.0)
    stats = train_step(student, teacher, dino_loss, optimizer, crops, freeze_last_layer=freeze_last_layer, **STEP)
    hand_loss, hand_center = step_by_hand(hand_student, hand_teacher, center, crops, optimizer_name, freeze_last_layer)

    assert stats["loss"] == pytest.approx(hand_loss, rel=1e-6)
    assert math.isfinite(stats["teacher_entropy"]) and stats["distinct_prototypes"] >= 1
    torch.testing.assert_close(dino_loss.center, hand_center)
    for (name, p), hand_p in zip(student.named_parameters(), hand_student.parameters()):
        torch.testing.assert_close(p, hand_p, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), hand_p in zip(teacher.named_parameters(), hand_teacher.parameters()):
        torch.testing.assert_close(p, hand_p, rtol=1e-5, atol=1e-6, msg=name)
    moved = not torch.equal(student.head.last_layer.weight_v, last_layer_before)
    assert moved != freeze_last_layer
    assert all(p.grad is None for p in student.parameters())
    assert [g["lr"] for g in optimizer.param_groups] == [STEP["lr"], STEP["lr"]]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [STEP["weight_decay"], 0.0]


def test_clipping_is_active_in_the_step():
    # The step above is only a test of clipping if some gradients exceed clip_grad.
    student, teacher, dino_loss, crops = setup()
    dino_loss(student(crops), teacher(crops[:2]), STEP["teacher_temp"]).backward()
    norms = [p.grad.norm().item() for p in student.parameters() if p.grad is not None]
    assert max(norms) > STEP["clip_grad"] > min(norms)


def test_step_through_accelerator_equals_plain_step():
    accelerate = pytest.importorskip("accelerate")
    student, teacher, dino_loss, crops = setup()
    plain = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    accelerator = accelerate.Accelerator(cpu=True)
    try:
        optimizer = build_optimizer("adamw", get_param_groups(student))
        student, optimizer = accelerator.prepare(student, optimizer)
        stats = train_step(student, teacher, dino_loss, optimizer, crops, freeze_last_layer=False,
                           accelerator=accelerator, **STEP)
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    plain_optimizer = build_optimizer("adamw", get_param_groups(plain[0]))
    plain_stats = train_step(*plain, plain_optimizer, crops, freeze_last_layer=False, **STEP)
    assert stats == plain_stats
    for p, plain_p in zip(accelerator.unwrap_model(teacher).parameters(), plain[1].parameters()):
        assert torch.equal(p, plain_p)


def test_non_finite_loss_stops_before_any_update():
    student, teacher, dino_loss, crops = setup()
    before = copy.deepcopy(student.state_dict())
    crops[0] = torch.full_like(crops[0], float("nan"))
    optimizer = build_optimizer("adamw", get_param_groups(student))
    with pytest.raises(FloatingPointError, match="bf16"):
        train_step(student, teacher, dino_loss, optimizer, crops, freeze_last_layer=False, **STEP)
    for name, value in student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_param_groups_without_flag_are_refused():
    student, teacher, dino_loss, crops = setup()
    optimizer = torch.optim.AdamW(student.parameters())
    with pytest.raises(ValueError, match="get_param_groups"):
        train_step(student, teacher, dino_loss, optimizer, crops, freeze_last_layer=False, **STEP)


def test_bf16_step_through_accelerator_stays_finite():
    accelerate = pytest.importorskip("accelerate")
    student, teacher, dino_loss, crops = setup()
    teacher_before = copy.deepcopy(teacher.state_dict())
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    try:
        optimizer = build_optimizer("adamw", get_param_groups(student))
        student, optimizer = accelerator.prepare(student, optimizer)
        stats = train_step(student, teacher, dino_loss, optimizer, crops, freeze_last_layer=False,
                           accelerator=accelerator, **STEP)
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    assert all(math.isfinite(value) for value in stats.values())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert any(not torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())
