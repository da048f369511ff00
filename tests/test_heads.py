import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from dino_hf.models.heads import DinoHead

IN_DIM, OUT_DIM, HIDDEN, BOTTLENECK = 32, 64, 48, 16


def tiny_head(**kwargs) -> DinoHead:
    return DinoHead(IN_DIM, OUT_DIM, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, **kwargs)


@pytest.mark.parametrize(
    "nlayers, use_bn, linears",
    [
        (1, False, [(IN_DIM, BOTTLENECK)]),
        (2, True, [(IN_DIM, HIDDEN), (HIDDEN, BOTTLENECK)]),
        (3, False, [(IN_DIM, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, BOTTLENECK)]),
    ],
)
def test_shapes_and_layers(nlayers, use_bn, linears):
    head = tiny_head(nlayers=nlayers, use_bn=use_bn)
    out = head(torch.randn(5, IN_DIM))
    assert out.shape == (5, OUT_DIM)
    found = [(m.in_features, m.out_features) for m in head.mlp.modules() if isinstance(m, nn.Linear)]
    assert found == linears
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == (nlayers - 1 if use_bn else 0)
    assert head.last_layer.weight_v.shape == (OUT_DIM, BOTTLENECK)
    assert head.last_layer.weight_g.shape == (OUT_DIM, 1)


def test_default_sizes_and_reference_key_names():
    head = DinoHead(384)
    assert head(torch.randn(2, 384)).shape == (2, 65536)
    assert sorted(head.state_dict()) == sorted(
        [
            "mlp.0.weight",
            "mlp.0.bias",
            "mlp.2.weight",
            "mlp.2.bias",
            "mlp.4.weight",
            "mlp.4.bias",
            "last_layer.weight_g",
            "last_layer.weight_v",
        ]
    )
    assert head.mlp[0].out_features == 2048 and head.mlp[4].out_features == 256


def test_init_follows_the_reference():
    torch.manual_seed(0)
    head = DinoHead(384, out_dim=1024)
    for linear in (head.mlp[0], head.mlp[2], head.mlp[4]):
        assert torch.count_nonzero(linear.bias) == 0
        assert linear.weight.std().item() == pytest.approx(0.02, rel=0.05)
    # PyTorch's default Linear init for the last layer: U(-1/sqrt(256), 1/sqrt(256)).
    assert head.last_layer.weight_v.abs().max().item() <= 1 / 16
    assert head.last_layer.weight_v.std().item() == pytest.approx(1 / 16 / 3**0.5, rel=0.05)
    assert torch.all(head.last_layer.weight_g == 1)


def test_weight_norm_matches_torch_parametrization():
    head = tiny_head(norm_last_layer=False)
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    reference = nn.utils.parametrizations.weight_norm(nn.Linear(BOTTLENECK, OUT_DIM, bias=False), dim=0)
    with torch.no_grad():
        reference.parametrizations.weight.original0.copy_(head.last_layer.weight_g)
        reference.parametrizations.weight.original1.copy_(head.last_layer.weight_v)
    x = torch.randn(4, BOTTLENECK)
    torch.testing.assert_close(head.last_layer(x), reference(x))


def test_frozen_norm_keeps_unit_rows_and_gets_no_gradient():
    torch.manual_seed(0)
    head = tiny_head(norm_last_layer=True)
    assert not head.last_layer.weight_g.requires_grad
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=1.0)
    head(torch.randn(6, IN_DIM)).pow(2).sum().backward()
    trainable = {name for name, p in head.named_parameters() if p.requires_grad}
    assert trainable == {name for name in head.state_dict()} - {"last_layer.weight_g"}
    for name, param in head.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert head.last_layer.weight_g.grad is None
    optimizer.step()
    row_norms = head.last_layer.weight.norm(dim=1)
    torch.testing.assert_close(row_norms, torch.ones(OUT_DIM))


def test_trainable_norm_gets_gradient():
    head = tiny_head(norm_last_layer=False, use_bn=True)
    head(torch.randn(6, IN_DIM)).pow(2).sum().backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_output_is_scaled_cosine_to_prototypes():
    head = tiny_head()
    x = torch.randn(3, IN_DIM)
    bottleneck = nn.functional.normalize(head.mlp(x), dim=-1)
    prototypes = nn.functional.normalize(head.last_layer.weight_v, dim=-1)
    torch.testing.assert_close(head(x), bottleneck @ prototypes.T)


def test_safetensors_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    head = tiny_head(use_bn=True, norm_last_layer=False)
    head.train()
    head(torch.randn(8, IN_DIM))  # moves the BatchNorm statistics away from their init
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    torch.manual_seed(1)
    restored = tiny_head(use_bn=True, norm_last_layer=False)
    restored.load_state_dict(load_file(tmp_path / "head.safetensors"))
    for name, tensor in head.state_dict().items():
        assert torch.equal(tensor, restored.state_dict()[name]), name
    x = torch.randn(4, IN_DIM)
    assert torch.equal(head.eval()(x), restored.eval()(x))


def test_nlayers_zero_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        tiny_head(nlayers=0)


def test_last_layer_gradients_are_cancelled_and_nothing_else():
    head = tiny_head(norm_last_layer=False)
    head(torch.randn(2, IN_DIM)).sum().backward()
    assert head.last_layer.weight_v.grad is not None and head.last_layer.weight_g.grad is not None
    head.cancel_last_layer_gradients_()
    assert head.last_layer.weight_v.grad is None and head.last_layer.weight_g.grad is None
    assert head.mlp[0].weight.grad is not None
