"""Every speed option keeps the numbers of one training step (dino_hf/speed.py and the options
that are always on: SDPA attention, bf16 autocast)."""

import copy

import pytest
import torch
from tiny import TINY_VIT

from dino_hf.models.backbones import build_backbone
from dino_hf.models.configuration_dino import DinoConfig
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.dino import DinoLoss
from dino_hf.training.optimization import build_optimizer, get_param_groups, optimizer_kernel_options
from dino_hf.training.speed import apply_speed_options, compile_units
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher

K, B, NCROPS = 64, 2, 4
STEP = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=False)
TINY_CONFIG = DinoConfig(**TINY_VIT)


def setup(backbone: str = "vit"):
    """Student (no stochastic depth, so runs are comparable), a teacher that differs from it, a
    non-zero center and fixed crops (2 x 32 px + 2 x 16 px)."""
    torch.manual_seed(0)
    spec = TINY_CONFIG if backbone == "vit" else "timm:test_resnet"
    student_backbone = build_backbone(spec, drop_path_rate=0.0)
    student = MultiCropWrapper(
        student_backbone, DinoHead(student_backbone.num_features, out_dim=K, hidden_dim=48, bottleneck_dim=16)
    )
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dino_loss = DinoLoss(K, NCROPS)
    dino_loss.center.copy_(0.1 * torch.randn(1, K))
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(2)]
    return student, teacher, dino_loss, crops


def one_step(models, crops, optimizer, accelerator=None):
    student, teacher, dino_loss = models
    stats = train_step(student, teacher, dino_loss, optimizer, crops, StepValues(**STEP), accelerator=accelerator)
    return {key: value.item() for key, value in stats.items()}


def assert_same_networks(a, b, atol):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_optimizer_step_equals_the_default_step(name):
    student, teacher, dino_loss, crops = setup()
    fast = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    plain_stats = one_step((student, teacher, dino_loss), crops, build_optimizer(name, get_param_groups(student)))
    optimizer = build_optimizer(name, get_param_groups(fast[0]), device="cpu")
    assert optimizer.defaults.get("fused") or optimizer.defaults.get("foreach")
    fast_stats = one_step(fast, crops, optimizer)
    assert fast_stats == plain_stats
    assert_same_networks(fast[0], student, atol=1e-6)
    assert_same_networks(fast[1], teacher, atol=1e-6)
    assert not torch.equal(fast[0].head.mlp[0].weight, setup()[0].head.mlp[0].weight)  # the step did move


def test_optimizer_options_per_device():
    assert optimizer_kernel_options("adamw", "cuda") == {"fused": True}
    assert optimizer_kernel_options("sgd", torch.device("cuda", 0)) == {"fused": True}
    assert optimizer_kernel_options("adamw", "meta") == {"foreach": True}  # no fused kernels there
    assert optimizer_kernel_options("lars", "cuda") == {}
    student = setup()[0]
    assert type(build_optimizer("lars", get_param_groups(student), device="cpu")).__name__ == "LARS"


def test_sdpa_step_equals_eager_attention_step():
    student, teacher, dino_loss, crops = setup()
    eager = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    for model in eager[:2]:
        vit = model.backbone.model  # DinoModel's explicit softmax path, taken when weights are requested
        model.backbone.forward = lambda pixels, vit=vit: vit(pixels, output_attentions=True).pooler_output
    one_step((student, teacher, dino_loss), crops, build_optimizer("sgd", get_param_groups(student)))
    one_step(eager, crops, build_optimizer("sgd", get_param_groups(eager[0])))
    assert_same_networks(eager[0], student, atol=1e-6)
    assert_same_networks(eager[1], teacher, atol=1e-6)
    torch.testing.assert_close(eager[2].center, dino_loss.center, atol=1e-6, rtol=0)


def test_bf16_autocast_step_is_close_to_the_fp32_step():
    accelerate = pytest.importorskip("accelerate")
    student, teacher, dino_loss, crops = setup()
    before = copy.deepcopy(student)
    bf16 = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    fp32_stats = one_step((student, teacher, dino_loss), crops, build_optimizer("sgd", get_param_groups(student)))
    accelerator = accelerate.Accelerator(cpu=True, mixed_precision="bf16")
    try:
        optimizer = build_optimizer("sgd", get_param_groups(bf16[0]), device=accelerator.device)
        prepared, optimizer = accelerator.prepare(bf16[0], optimizer)
        bf16_stats = one_step((prepared, bf16[1], bf16[2]), crops, optimizer, accelerator)
    finally:
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    assert bf16_stats["loss"] == pytest.approx(fp32_stats["loss"], rel=2e-2)
    assert all(p.dtype == torch.float32 for p in bf16[0].parameters())
    # The student's update: same direction and size within bf16's precision.
    bf16_delta = torch.cat([(p - q).flatten() for p, q in zip(bf16[0].parameters(), before.parameters())])
    fp32_delta = torch.cat([(p - q).flatten() for p, q in zip(student.parameters(), before.parameters())])
    assert torch.nn.functional.cosine_similarity(bf16_delta, fp32_delta, dim=0) > 0.99
    assert (bf16_delta.norm() / fp32_delta.norm()).item() == pytest.approx(1.0, abs=0.05)
    assert_same_networks(bf16[1], teacher, atol=1e-3)


def test_channels_last_step_equals_the_default_step():
    student, teacher, dino_loss, crops = setup("resnet")
    fast = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    apply_speed_options(fast[0], fast[1], channels_last=True)
    convs = [m.weight for m in fast[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # 1 x 1 kernels are contiguous in both layouts
    one_step((student, teacher, dino_loss), crops, build_optimizer("sgd", get_param_groups(student)))
    one_step(fast, crops, build_optimizer("sgd", get_param_groups(fast[0]), device="cpu"))
    assert_same_networks(fast[0], student, atol=1e-5)
    assert_same_networks(fast[1], teacher, atol=1e-5)


def test_compile_keeps_modules_and_state_dict_keys():
    student, teacher, _, _ = setup()
    keys = list(student.state_dict()), list(teacher.state_dict())
    apply_speed_options(student, teacher, torch_compile=True)
    assert (list(student.state_dict()), list(teacher.state_dict())) == keys
    for model in (student, teacher):
        units = compile_units(model)
        assert units == [*model.backbone.model.encoder.layer, model.head]  # each block, then the head
        assert all(unit._compiled_call_impl is not None for unit in units)
    with pytest.raises(TypeError, match="MultiCropWrapper"):
        apply_speed_options(student.backbone, teacher.backbone, torch_compile=True)


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step():
    student, teacher, dino_loss, crops = setup()
    compiled = [copy.deepcopy(x) for x in (student, teacher, dino_loss)]
    apply_speed_options(compiled[0], compiled[1], torch_compile=True)
    eager_stats = one_step((student, teacher, dino_loss), crops, build_optimizer("sgd", get_param_groups(student)))
    compiled_stats = one_step(compiled, crops, build_optimizer("sgd", get_param_groups(compiled[0]), device="cpu"))
    assert compiled_stats["loss"] == pytest.approx(eager_stats["loss"], rel=1e-5)
    assert_same_networks(compiled[0], student, atol=1e-5)
    assert_same_networks(compiled[1], teacher, atol=1e-5)


@pytest.mark.slow
def test_compiled_steps_compile_once_per_resolution_and_never_again():
    """After the first steps (both crop resolutions seen, student and teacher), later steps run the
    graphs already built: a recompilation is an error here."""
    student, teacher, dino_loss, crops = setup()
    apply_speed_options(student, teacher, torch_compile=True)
    optimizer = build_optimizer("adamw", get_param_groups(student), device="cpu")
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    for _ in range(2):
        one_step((student, teacher, dino_loss), crops, optimizer)
    graphs = counters["unique_graphs"] - before
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            one_step((student, teacher, dino_loss), [crop + 0.1 for crop in crops], optimizer)
    assert counters["unique_graphs"] - before == graphs
    # block (student 32 and 16 px, teacher 32 px) and head (student, teacher): the same graph for every block
    assert graphs <= 5, graphs
