import copy
import math

import pytest
import torch
from tiny import TINY_VIT
from torch.nn import functional as F

from dino_hf.data.masks import BlockMasking
from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.anchor import Anchor, AnchorTerm
from dino_hf.objectives.dino import DinoLoss, sinkhorn_knopp
from dino_hf.objectives.ibot import IBotLoss, IBotTerm
from dino_hf.objectives.koleo import KoLeoTerm, koleo_loss
from dino_hf.training.arguments import DinoTrainingArguments
from dino_hf.training.optimization import build_optimizer, get_param_groups
from dino_hf.training.plan import TrainingPlan
from dino_hf.training.run_log import log_line
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

K, B, NCROPS = 64, 2, 4
STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0)
# The DINOv2 stabilisers, each on its own: DinoLoss options and the weights of the terms added to the step
# (`dino_hf.objectives.term`, built in the test).
STABILISERS = {
    "paper": ({}, {}),
    "sinkhorn_knopp": ({"centering": "sinkhorn_knopp"}, {}),
    "koleo": ({}, {"koleo": 0.1}),
    # Anchoring to the start (the anchor built from the student).
    "anchor": ({}, {"gram": 1.0, "anchor_cos": 1.0}),
    # DINOv3's EMA Gram teacher at twice the resolution, refreshed from the teacher before every step.
    "gram_ema": ({}, {"gram": 1.0}),
    # iBOT's masked-patch loss, with its patch center and with Sinkhorn-Knopp (on a DinoModel with a mask token).
    "ibot": ({}, {"ibot": 1.0}),
    "ibot_sinkhorn_knopp": ({"centering": "sinkhorn_knopp"}, {"ibot": 1.0}),
}


def setup(batch=B, mask_token=False, **loss_options):
    """Fixed student, a teacher that differs from it, a non-zero center and fixed crops of `batch` images.
    `mask_token`: a DinoModel backbone with a mask token (iBOT) in place of the timm ViT."""
    torch.manual_seed(0)
    if mask_token:
        backbone = build_backbone(DinoConfig(**TINY_VIT), drop_path_rate=0.0, mask_token=True)
    else:
        backbone = build_backbone(
            "timm:test_vit", drop_path_rate=0.0, image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
        )
    student = MultiCropWrapper(backbone, DinoHead(32, out_dim=K, hidden_dim=48, bottleneck_dim=16))
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dino_loss = DinoLoss(K, NCROPS, **loss_options)
    dino_loss.center.copy_(0.1 * torch.randn(1, K))
    crops = [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [torch.randn(batch, 3, 16, 16) for _ in range(2)]
    return student, teacher, dino_loss, crops


def step_by_hand(student, teacher, center, crops, optimizer_name, freeze_last_layer):
    """One step written from the formulas of docs/recipe.md#training-step, sharing nothing with dino_hf
    but the networks' forward."""
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
    stats = train_step(
        student, teacher, dino_loss, optimizer, crops, StepValues(freeze_last_layer=freeze_last_layer, **STEP)
    )
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
    groups = optimizer.param_groups  # backbone and head, each regularised and not
    assert [g["lr"] for g in groups] == [STEP["lr"]] * 4
    assert [g["weight_decay"] for g in groups] == [STEP["weight_decay"] if g["regularized"] else 0.0 for g in groups]


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
        stats = train_step(
            student,
            teacher,
            dino_loss,
            optimizer,
            crops,
            StepValues(freeze_last_layer=False, **STEP),
            accelerator=accelerator,
        )
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    plain_optimizer = build_optimizer("adamw", get_param_groups(plain[0]))
    plain_stats = train_step(*plain, plain_optimizer, crops, StepValues(freeze_last_layer=False, **STEP))
    assert stats == plain_stats
    for p, plain_p in zip(accelerator.unwrap_model(teacher).parameters(), plain[1].parameters()):
        assert torch.equal(p, plain_p)


def optimizer_state(optimizer) -> list:
    return [
        (key, value.clone() if isinstance(value, torch.Tensor) else value)
        for state in optimizer.state.values()
        for key, value in sorted(state.items())
    ]


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd", "lars"])
def test_non_finite_loss_changes_nothing_and_is_decided_on_the_device(optimizer_name):
    """A NaN step, after a good one: every weight of both networks, the optimiser state and the
    center stay bit for bit, and the step says it was skipped."""
    student, teacher, dino_loss, crops = setup()
    optimizer = build_optimizer(optimizer_name, get_param_groups(student), device="cpu")  # fused kernels
    train_step(student, teacher, dino_loss, optimizer, crops, StepValues(freeze_last_layer=False, **STEP))
    before = [copy.deepcopy(x.state_dict()) for x in (student, teacher, dino_loss)]
    state_before = optimizer_state(optimizer)
    bad = [torch.full_like(crops[0], float("nan"))] + crops[1:]
    stats = train_step(student, teacher, dino_loss, optimizer, bad, StepValues(freeze_last_layer=False, **STEP))
    assert stats["nonfinite"].item() == 1.0 and not math.isfinite(stats["loss"].item())
    for module, saved in zip((student, teacher, dino_loss), before):
        for name, value in module.state_dict().items():
            assert torch.equal(value, saved[name]), name
    for (key, value), (key_before, value_before) in zip(optimizer_state(optimizer), state_before, strict=True):
        assert key == key_before and (
            torch.equal(value, value_before) if isinstance(value, torch.Tensor) else value == value_before
        ), key


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_a_skipped_first_step_leaves_the_optimiser_as_new(optimizer_name):
    """Skipped before any good step (no moments, no momentum buffers yet), the next good step is the
    step a fresh optimiser makes."""
    student, teacher, dino_loss, crops = setup()
    fresh = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    optimizer = build_optimizer(optimizer_name, get_param_groups(student), device="cpu")  # fused kernels
    bad = [torch.full_like(crops[0], float("inf"))] + crops[1:]
    assert (
        train_step(student, teacher, dino_loss, optimizer, bad, StepValues(freeze_last_layer=False, **STEP))[
            "nonfinite"
        ]
        == 1
    )
    train_step(student, teacher, dino_loss, optimizer, crops, StepValues(freeze_last_layer=False, **STEP))
    train_step(
        *fresh,
        build_optimizer(optimizer_name, get_param_groups(fresh[0]), device="cpu"),
        crops,
        StepValues(freeze_last_layer=False, **STEP),
    )
    for p, fresh_p in zip(student.parameters(), fresh[0].parameters()):
        assert torch.equal(p, fresh_p)
    assert torch.equal(dino_loss.center, fresh[2].center)


def test_param_groups_without_flag_are_refused():
    student, teacher, dino_loss, crops = setup()
    optimizer = torch.optim.AdamW(student.parameters())
    with pytest.raises(ValueError, match="get_param_groups"):
        train_step(student, teacher, dino_loss, optimizer, crops, StepValues(freeze_last_layer=False, **STEP))


def test_bf16_step_through_accelerator_stays_finite():
    accelerate = pytest.importorskip("accelerate")
    student, teacher, dino_loss, crops = setup()
    teacher_before = copy.deepcopy(teacher.state_dict())
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    try:
        optimizer = build_optimizer("adamw", get_param_groups(student))
        student, optimizer = accelerator.prepare(student, optimizer)
        stats = train_step(
            student,
            teacher,
            dino_loss,
            optimizer,
            crops,
            StepValues(freeze_last_layer=False, **STEP),
            accelerator=accelerator,
        )
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    assert all(math.isfinite(value) for value in stats.values())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    assert any(not torch.equal(p, teacher_before[n]) for n, p in teacher.named_parameters())


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that read a tensor's value back to the host: on a GPU each one waits for the
    device (`.item()`, `.tolist()`, `bool` / `float` / `int` of a tensor, `.numpy()`, and the ops whose
    output size depends on the data, boolean-mask indexing included)."""

    READS = {
        "item",
        "tolist",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "numpy",
        "nonzero",
        "unique",
        "unique_consecutive",
        "masked_select",
        "argwhere",
    }

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.READS or (name in ("__getitem__", "__setitem__") and _has_bool_mask(args[1])):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _has_bool_mask(index) -> bool:
    """Whether a tensor index holds a boolean mask (`x[mask]`: its size is read from the device)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


@pytest.mark.parametrize("stabiliser", list(STABILISERS))
@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd", "lars"])
@pytest.mark.parametrize("through_accelerator", [False, True])
def test_a_steady_state_step_reads_nothing_back(optimizer_name, through_accelerator, stabiliser):
    accelerate = pytest.importorskip("accelerate")
    loss_options, weights = STABILISERS[stabiliser]
    ibot = "ibot" in weights
    # micro-batches of 2: KoLeo needs 2
    student, teacher, dino_loss, crops = setup(batch=4, mask_token=ibot, **loss_options)
    terms = [KoLeoTerm(weights["koleo"])] if "koleo" in weights else []
    if stabiliser == "anchor":
        anchor = Anchor(student.backbone, gram=True, cosine=True, remove_neg=True)
        terms.append(AnchorTerm(anchor, weights["gram"], weights["anchor_cos"]))
    if ibot:  # the masks drawn as the loader draws them, for 2 micro-batches
        masks = BlockMasking((4, 4), micro_batches=2)(list(range(4)))
        terms.append(IBotTerm(IBotLoss(K, **loss_options), weights["ibot"], masks))
    gram_teacher = None
    if stabiliser == "gram_ema":
        gram_teacher = Anchor(student.backbone, gram=True, cosine=False, resolution_scale=2.0, snapshot_step=None)
        terms.append(AnchorTerm(gram_teacher, weights["gram"]))
    optimizer = build_optimizer(optimizer_name, get_param_groups(student), device="cpu")
    accelerator = None
    if through_accelerator:
        accelerator = accelerate.Accelerator(cpu=True)
        student, optimizer = accelerator.prepare(student, optimizer)
    try:
        for step in range(3):
            with HostReads() as reads:
                if gram_teacher is not None:  # as the trainer's loop does before a refresh step
                    gram_teacher.snapshot_(teacher.backbone, step)
                stats = train_step(
                    student,
                    teacher,
                    dino_loss,
                    optimizer,
                    crops,
                    StepValues(freeze_last_layer=step == 0, **STEP),
                    accelerator=accelerator,
                    accumulation_steps=2,
                    terms=terms,
                )
            if step:  # the first step creates the optimiser state
                assert reads.calls == [], reads.calls
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    assert stats["nonfinite"].item() == 0.0 and math.isfinite(stats["loss"].item())


# ---- DINOv2's stabilisers --------------------------------------------------------------------------


def test_the_wrapper_returns_the_backbone_features_on_request():
    student, _, _, crops = setup()
    logits, features = student(crops, return_features=True)
    with torch.no_grad():
        expected = torch.cat([student.backbone(torch.cat(crops[:2])), student.backbone(torch.cat(crops[2:]))])
    torch.testing.assert_close(features, expected)
    assert torch.equal(logits, student(crops))
    assert features.shape == (NCROPS * B, 32)


def test_a_step_with_sinkhorn_knopp_centering():
    student, teacher, dino_loss, crops = setup(centering="sinkhorn_knopp", sinkhorn_iterations=3)
    center = dino_loss.center.clone()
    with torch.no_grad():
        q = sinkhorn_knopp(teacher(crops[:2]), STEP["teacher_temp"], 3).chunk(2)
        log_p = F.log_softmax(student(crops) / 0.1, dim=-1).chunk(NCROPS)
    pairs = [(-q[i] * log_p[v]).sum(-1).mean() for i in range(2) for v in range(NCROPS) if v != i]

    optimizer = build_optimizer("adamw", get_param_groups(student))
    stats = train_step(student, teacher, dino_loss, optimizer, crops, StepValues(freeze_last_layer=False, **STEP))

    assert stats["nonfinite"].item() == 0.0
    assert stats["loss"].item() == pytest.approx((sum(pairs) / len(pairs)).item(), rel=1e-6)
    assert torch.equal(dino_loss.center, center)  # the center is neither used nor updated
    assert "center_norm" not in stats and math.isfinite(stats["teacher_entropy"].item())


def test_a_step_with_koleo_reports_it_and_trains_the_backbone_with_it():
    student, teacher, dino_loss, crops = setup()
    plain = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    with torch.no_grad():
        features = student.backbone(torch.cat(crops[:2])).chunk(2)
    expected_koleo = sum(koleo_loss(crop_features) for crop_features in features)

    optimizer = build_optimizer("adamw", get_param_groups(student))
    stats = train_step(
        student,
        teacher,
        dino_loss,
        optimizer,
        crops,
        StepValues(freeze_last_layer=False, **STEP),
        terms=[KoLeoTerm(0.1)],
    )
    plain_stats = train_step(
        *plain,
        build_optimizer("adamw", get_param_groups(plain[0])),
        crops,
        StepValues(freeze_last_layer=False, **STEP),
    )

    assert "koleo" not in plain_stats
    assert stats["koleo"].ndim == 0 and math.isfinite(stats["koleo"].item())
    assert stats["koleo"].item() == pytest.approx(expected_koleo.item(), rel=1e-6)
    assert stats["loss"].item() == pytest.approx(plain_stats["loss"].item(), rel=1e-6)  # "loss" is DINO's alone
    assert stats["nonfinite"].item() == 0.0
    # KoLeo acts on the backbone's features: it changes the backbone's update, not the head's.
    backbone_moved = [
        not torch.allclose(p, q, rtol=0, atol=1e-7)
        for p, q in zip(student.backbone.parameters(), plain[0].backbone.parameters())
    ]
    assert any(backbone_moved)
    for p, q in zip(student.head.parameters(), plain[0].head.parameters()):
        torch.testing.assert_close(p, q)
    line = log_line(1, {"epoch": 0.0, **{key: value.item() for key, value in stats.items()}})
    assert f"koleo={stats['koleo'].item():.4g}" in line


def test_the_plan_passes_the_koleo_weight_to_the_step(tmp_path):
    args = DinoTrainingArguments(train_dir=str(tmp_path), koleo_weight=0.1, per_device_train_batch_size=B)
    plan = TrainingPlan.from_args(args, samples_per_epoch=100, num_processes=1, fresh_head=False)
    assert plan.term_weights(0)["koleo"] == 0.1
    student, teacher, dino_loss, crops = setup()
    optimizer = build_optimizer("adamw", get_param_groups(student))
    terms = [KoLeoTerm(plan.term_weights(0)["koleo"])]
    stats = train_step(student, teacher, dino_loss, optimizer, crops, plan.step_values(0), terms=terms)
    assert "koleo" in stats and math.isfinite(stats["loss"].item())
