import copy

import pytest
import torch
from tiny import TINY_VIT
from torch import nn

from dino_hf import DinoConfig, DinoModel
from dino_hf.models.backbones import DinoModelBackbone
from dino_hf.models.heads import DinoHead
from dino_hf.models.multicrop_wrapper import MultiCropWrapper
from dino_hf.objectives.dino import DinoLoss
from dino_hf.training.optimization import LARS, build_optimizer, clip_gradients_, get_param_groups
from dino_hf.training.step import StepValues, train_step
from dino_hf.training.teacher import build_teacher


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.scale = nn.Parameter(torch.ones(3))  # 1-D without ".bias" in its name
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)
        self.head = DinoHead(3, out_dim=8, hidden_dim=5, bottleneck_dim=4)  # frozen weight_g


def test_param_groups_split_and_skip_frozen():
    model = Tiny()
    regularized, not_regularized = get_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert regularized["regularized"] and not not_regularized["regularized"]
    assert regularized["lr_scale"] == not_regularized["lr_scale"] == 1.0  # no layer decay by default
    assert not regularized["backbone"] and not not_regularized["backbone"]  # no .backbone in this model
    assert not_regularized["weight_decay"] == 0.0 and "weight_decay" not in regularized
    assert sorted(names[id(p)] for p in regularized["params"]) == sorted(
        ["linear.weight", "head.mlp.0.weight", "head.mlp.2.weight", "head.mlp.4.weight", "head.last_layer.weight_v"]
    )
    assert sorted(names[id(p)] for p in not_regularized["params"]) == sorted(
        ["linear.bias", "norm.weight", "norm.bias", "scale", "head.mlp.0.bias", "head.mlp.2.bias", "head.mlp.4.bias"]
    )  # "frozen" and "head.last_layer.weight_g" are left out


def test_clipping_is_per_parameter():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3, 1))
    model = nn.ParameterList([a, b])
    a.grad = torch.tensor([6.0, 8.0])  # norm 10
    b.grad = torch.tensor([[1.0], [0.0], [0.0]])  # norm 1
    norms = clip_gradients_(model, 3.0)
    torch.testing.assert_close(norms, torch.tensor([10.0, 1.0]))
    torch.testing.assert_close(a.grad, torch.tensor([6.0, 8.0]) * 3.0 / (10.0 + 1e-6))
    assert torch.equal(b.grad, torch.tensor([[1.0], [0.0], [0.0]]))  # under the limit: untouched
    assert a.grad.norm().item() == pytest.approx(3.0, rel=1e-6)  # not a global norm: b keeps its own


def test_clip_zero_turns_clipping_off():
    p = nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([30.0, 40.0])
    assert clip_gradients_(nn.ParameterList([p]), 0.0) is None
    assert torch.equal(p.grad, torch.tensor([30.0, 40.0]))
    with pytest.raises(ValueError, match="0 turns"):
        clip_gradients_(nn.ParameterList([p]), -1.0)


def test_lars_step_by_hand():
    torch.manual_seed(0)
    weight, bias = nn.Parameter(torch.randn(3, 2)), nn.Parameter(torch.randn(3))
    weight.grad, bias.grad = torch.randn(3, 2), torch.randn(3)
    w0, b0, gw, gb = weight.detach().clone(), bias.detach().clone(), weight.grad.clone(), bias.grad.clone()
    optimizer = LARS([{"params": [weight]}, {"params": [bias], "weight_decay": 0.0}], lr=0.1, weight_decay=0.01)
    optimizer.step()
    optimizer.step()  # second step uses the momentum buffer mu

    update_w = gw + 0.01 * w0
    mu_w = update_w * (0.001 * w0.norm() / update_w.norm())
    w1 = w0 - 0.1 * mu_w
    update_w2 = gw + 0.01 * w1
    mu_w2 = 0.9 * mu_w + update_w2 * (0.001 * w1.norm() / update_w2.norm())
    torch.testing.assert_close(weight.detach(), w1 - 0.1 * mu_w2)
    # 1-D: no weight decay, no adaptation: plain momentum SGD.
    torch.testing.assert_close(bias.detach(), b0 - 0.1 * gb - 0.1 * (0.9 * gb + gb))


def test_build_optimizer_by_name():
    groups = get_param_groups(Tiny())
    assert isinstance(build_optimizer("adamw", groups), torch.optim.AdamW)
    sgd = build_optimizer("sgd", get_param_groups(Tiny()))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9
    lars = build_optimizer("lars", get_param_groups(Tiny()))
    assert isinstance(lars, LARS) and lars.param_groups[1]["weight_decay"] == 0.0
    assert [g["regularized"] for g in lars.param_groups] == [True, False]
    with pytest.raises(ValueError, match="adamw, sgd, lars"):
        build_optimizer("adam", groups)


def two_groups(model: nn.Module) -> list[dict]:
    """The parameter groups before layer decay: regularised and not, over backbone and head together."""
    groups = [{"params": [], "regularized": True}, {"params": [], "weight_decay": 0.0, "regularized": False}]
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[name.endswith(".bias") or param.ndim == 1]["params"].append(param)
    return [{**group, "lr_scale": 1.0, "backbone": False} for group in groups]


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_default_groups_train_bit_for_bit_as_two_groups(name):
    """Backbone and head in groups of their own change no number of the paper's recipe."""
    torch.manual_seed(0)
    backbone = DinoModelBackbone(DinoModel(DinoConfig(**TINY_VIT, drop_path_rate=0.0)))
    student = MultiCropWrapper(backbone, DinoHead(32, out_dim=16, hidden_dim=16, bottleneck_dim=8))
    networks = [(student, build_teacher(student), DinoLoss(16, 4))]
    networks.append(copy.deepcopy(networks[0]))
    start = copy.deepcopy(student.state_dict())
    optimizers = [
        build_optimizer(name, get_param_groups(networks[0][0]), device="cpu"),
        build_optimizer(name, two_groups(networks[1][0]), device="cpu"),
    ]
    assert (len(optimizers[0].param_groups), len(optimizers[1].param_groups)) == (4, 2)
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(2)]
    step = dict(lr=0.01, weight_decay=0.04, momentum=0.9, teacher_temp=0.04, clip_grad=3.0, freeze_last_layer=False)
    for _ in range(3):
        for (s, t, loss), optimizer in zip(networks, optimizers):
            train_step(s, t, loss, optimizer, crops, StepValues(**step))
    (student, teacher, _), (other_student, other_teacher, _) = networks
    moved = "backbone.model.layernorm.weight"
    assert not torch.equal(student.state_dict()[moved], start[moved])
    for (key, value), other in zip(
        [*student.state_dict().items(), *teacher.state_dict().items()],
        [*other_student.state_dict().values(), *other_teacher.state_dict().values()],
    ):
        assert torch.equal(value, other), key
