import pytest
import torch
from torch import nn

from dino_hf.models.heads import DinoHead
from dino_hf.training.optimization import LARS, build_optimizer, clip_gradients_, get_param_groups


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
