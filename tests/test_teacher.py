import pytest
import torch
from tiny import TINY_VIT

from dino_hf import DinoConfig
from dino_hf.models.backbones import build_backbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.training.teacher import build_teacher, ema_update_

BACKBONES = {
    "timm_vit": lambda: build_backbone(
        "timm:test_vit", image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2
    ),
    "timm_resnet": lambda: build_backbone("timm:test_resnet"),
    "dino_model": lambda: build_backbone(
        DinoConfig(
            **TINY_VIT,
        )
    ),
}


def tiny_student(backbone_name: str = "timm_vit", **head_kwargs) -> MultiCropWrapper:
    backbone = BACKBONES[backbone_name]()
    head = DinoHead(backbone.num_features, out_dim=64, hidden_dim=48, bottleneck_dim=16, **head_kwargs)
    return MultiCropWrapper(backbone, head)


def multi_crops(batch: int = 2) -> list[torch.Tensor]:
    return [torch.randn(batch, 3, 32, 32) for _ in range(2)] + [torch.randn(batch, 3, 16, 16) for _ in range(4)]


@pytest.mark.parametrize("backbone_name", sorted(BACKBONES))
def test_grouped_forward_equals_one_call_per_crop(backbone_name):
    torch.manual_seed(0)
    model = tiny_student(backbone_name).eval()
    crops = multi_crops()
    calls = []
    model.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))

    with torch.no_grad():
        grouped = model(crops)
        one_by_one = torch.cat([model.head(model.backbone(crop)) for crop in crops])

    assert grouped.shape == (6 * 2, 64)
    assert calls[:2] == [(4, 3, 32, 32), (8, 3, 16, 16)]  # one backbone call per resolution
    torch.testing.assert_close(grouped, one_by_one, rtol=1e-4, atol=1e-5)


def test_groups_only_consecutive_crops_of_one_size():
    model = tiny_student().eval()
    calls = []
    model.backbone.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        assert model(crops).shape == (6, 64)
        assert model(crops[0]).shape == (2, 64)  # a single tensor is one crop
    assert calls == [2, 2, 2, 2]


def test_build_teacher_copies_without_gradients_or_drop_path():
    student = tiny_student(norm_last_layer=False)
    student.backbone.model.blocks[1].drop_path1.drop_prob = 0.1  # as built with drop_path_rate > 0
    teacher = build_teacher(student)

    assert all(not p.requires_grad for p in teacher.parameters())
    assert student.head.last_layer.weight_g.requires_grad  # the student is untouched
    assert teacher.head.norm_last_layer and not student.head.norm_last_layer
    assert student.backbone.model.blocks[1].drop_path1.drop_prob == 0.1
    assert all(getattr(m, "drop_prob", 0.0) == 0.0 for m in teacher.modules())
    for (name, s), (t_name, t) in zip(student.state_dict().items(), teacher.state_dict().items()):
        assert name == t_name and torch.equal(s, t) and s.data_ptr() != t.data_ptr()


def test_teacher_forward_on_globals_builds_no_graph():
    teacher = build_teacher(tiny_student())
    assert not teacher(multi_crops()[:2]).requires_grad


@pytest.mark.parametrize("momentum", [0.0, 0.5, 0.996, 0.9995])
def test_ema_equals_formula(momentum):
    torch.manual_seed(0)
    student = tiny_student(use_bn=True)
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p))
        for b in teacher.buffers():
            b.add_(1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    parameter_names = {name for name, _ in teacher.named_parameters()}
    student_state = student.state_dict()

    ema_update_(teacher, student, momentum)

    for name, value in teacher.state_dict().items():
        if name in parameter_names:
            expected = momentum * teacher_before[name] + (1 - momentum) * student_state[name]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        else:  # buffers (BatchNorm statistics) are not averaged
            assert torch.equal(value, teacher_before[name]), name
    assert any(name.endswith("running_mean") for name in teacher_before)


def test_ema_momentum_one_leaves_teacher_unchanged():
    student = tiny_student()
    teacher = build_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(3.0).add_(1.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update_(teacher, student, 1.0)
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_ema_refuses_different_architectures():
    with pytest.raises(ValueError, match="build_teacher"):
        ema_update_(build_teacher(tiny_student()), tiny_student(nlayers=2), 0.9)
