"""Register tokens in DinoModel (Darcet et al. 2024) and the conversion to and from transformers'
`Dinov2WithRegistersModel`."""

import json

import pytest
import torch
import transformers as tf
from test_modeling_dino import random_mask, reference_vit_forward, tiny_config
from tiny import TINY_VIT

from dino_hf import DinoConfig, DinoModel
from dino_hf.convert.conversions import convert_checkpoint, dino_from_dinov2_with_registers
from dino_hf.convert.export import as_plain_vit, dino_to_dinov2_with_registers
from dino_hf.evaluation.attention import attention_maps
from dino_hf.evaluation.feature_models import DinoFeatureModel
from dino_hf.evaluation.linear_probe import probe_features
from dino_hf.models.weight_check import WeightLoadingError
from dino_hf.training.arguments import DinoTrainingArguments, preset_overrides

REGISTERS = 3


@pytest.fixture
def model() -> DinoModel:
    torch.manual_seed(0)
    return DinoModel(tiny_config(num_register_tokens=REGISTERS)).eval()


def without_registers(tokens: torch.Tensor, dim: int) -> torch.Tensor:
    """The CLS and patch positions of `tokens` along `dim`, by index."""
    keep = torch.tensor([0, *range(1 + REGISTERS, tokens.shape[dim])])
    return tokens.index_select(dim, keep)


def tiny_dinov2(**overrides) -> tf.Dinov2WithRegistersModel:
    """A random Dinov2WithRegistersModel of DINO's blocks (LayerScale 1, GELU), with a trained-looking
    mask token and registers (both start at zero in transformers)."""
    fields = dict(
        {key: value for key, value in TINY_VIT.items() if key != "intermediate_size"},
        mlp_ratio=2,
        num_register_tokens=REGISTERS,
    )
    torch.manual_seed(0)
    model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(**(fields | overrides))).eval()
    with torch.no_grad():
        model.embeddings.mask_token.normal_()
        model.embeddings.register_tokens.normal_()
    return model


# ---------------------------------------------------------------------------------------------------
# The model


def test_no_registers_by_default_and_the_presets_take_them():
    assert DinoConfig().num_register_tokens == 0
    assert "embeddings.register_tokens" not in DinoModel(tiny_config()).state_dict()
    config = DinoConfig.from_preset("vit_small_patch16", num_register_tokens=4)
    assert (config.num_register_tokens, config.hidden_size) == (4, 384)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="num_register_tokens must be a whole number >= 0"):
            DinoConfig(num_register_tokens=bad)


def test_config_overrides_give_the_preset_registers(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    args = DinoTrainingArguments(
        train_dir=str(tmp_path),
        model_name_or_path="vit_tiny_patch8",
        config_overrides="num_register_tokens=4",
        global_crops_size=32,
        local_crops_size=16,
    )
    assert preset_overrides(args) == {"num_register_tokens": 4}


def test_registers_follow_the_cls_token_without_position_embedding(model):
    registers = model.embeddings.register_tokens
    assert registers.shape == (1, REGISTERS, 32)
    x = torch.randn(2, 3, 24, 40)  # a size whose position embeddings are interpolated
    with torch.no_grad():
        embedded = model.embeddings(x)  # (B, 1 + R + N, D)
        plain = DinoModel(tiny_config())
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "embeddings.register_tokens"})
        expected = plain.embeddings(x)  # (B, 1 + N, D)
    assert embedded.shape == (2, 1 + REGISTERS + 15, 32)
    torch.testing.assert_close(embedded[:, 1 : 1 + REGISTERS], registers.expand(2, -1, -1), rtol=0, atol=0)
    torch.testing.assert_close(without_registers(embedded, 1), expected, rtol=0, atol=0)


def test_registers_are_initialised_like_the_cls_token():
    torch.manual_seed(0)
    registers = DinoModel(tiny_config(hidden_size=256, num_attention_heads=4, num_register_tokens=8))
    values = registers.embeddings.register_tokens
    assert values.std().item() == pytest.approx(0.02, rel=0.1)
    assert values.abs().max().item() <= 2.0  # truncated normal, as the CLS token


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_forward_with_registers_matches_the_independent_reference(model, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x, output_attentions=True, output_hidden_states=True)
    expected = reference_vit_forward(model.state_dict(), model.config, x)
    patches = (size[0] // 8) * (size[1] // 8)
    assert out.last_hidden_state.shape == expected.shape == (2, 1 + REGISTERS + patches, 32)
    assert (out.last_hidden_state - expected).abs().max() <= 1e-5
    torch.testing.assert_close(out.pooler_output, out.last_hidden_state[:, 0], rtol=0, atol=0)
    assert (model.num_register_tokens, model.num_prefix_tokens) == (REGISTERS, 1 + REGISTERS)
    assert out.attentions[-1].shape == (2, 2, 1 + REGISTERS + patches, 1 + REGISTERS + patches)


def test_registers_take_part_in_attention(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x).pooler_output
        model.embeddings.register_tokens.mul_(-3.0)
        after = model(x).pooler_output
    assert (before - after).abs().max() > 1e-3


def test_every_parameter_gets_a_gradient_with_registers(model):
    model.train()
    model(torch.randn(2, 3, 32, 32)).last_hidden_state.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert model.embeddings.register_tokens.grad.abs().sum() > 0


def test_intermediate_layers_and_attention_leave_the_registers_out(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, output_hidden_states=True, output_attentions=True)
        layers = model.get_intermediate_layers(x, n=2)
        attention = model.get_last_selfattention(x)
    for got, hidden in zip(layers, out.hidden_states[-2:], strict=True):
        assert got.shape == (2, 1 + 16, 32)
        torch.testing.assert_close(got, without_registers(model.layernorm(hidden), 1))
    assert attention.shape == (2, 2, 17, 17)
    torch.testing.assert_close(attention, without_registers(without_registers(out.attentions[-1], 2), 3))
    # The registers' share of the CLS query's attention is what the rows now lack.
    register_share = out.attentions[-1][:, :, 0, 1 : 1 + REGISTERS].sum(-1)  # (B, heads)
    torch.testing.assert_close(attention[:, :, 0].sum(-1), 1 - register_share)


def test_evaluation_sees_patches_only(model):
    features = DinoFeatureModel(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x, output_attentions=True)
    maps = attention_maps(features, x)  # (B, heads, 4, 4)
    cls_to_patches = out.attentions[-1][:, :, 0, 1 + REGISTERS :]  # (B, heads, 16)
    torch.testing.assert_close(maps, cls_to_patches.reshape(2, 2, 4, 4))
    with torch.no_grad():
        probe = probe_features(features, x, n_last_blocks=1, avgpool_patchtokens=True)  # (B, 2D)
    patches = out.last_hidden_state[:, model.num_prefix_tokens :]  # (B, 16, D)
    torch.testing.assert_close(probe[:, 1::2], patches.mean(dim=1))


# ---------------------------------------------------------------------------------------------------
# Dinov2WithRegistersModel


def assert_same_features(dino: DinoModel, dinov2: tf.Dinov2WithRegistersModel, x: torch.Tensor, **masking) -> None:
    """Features and patch tokens of both within 1e-5 (fp32)."""
    with torch.no_grad():
        ours, theirs = dino(x, **masking), dinov2(x, **masking)
    assert ours.last_hidden_state.shape == theirs.last_hidden_state.shape
    assert (ours.pooler_output - theirs.pooler_output).abs().max() <= 1e-5
    prefix = dino.num_prefix_tokens
    patches = ours.last_hidden_state[:, prefix:] - theirs.last_hidden_state[:, 1 + dinov2.config.num_register_tokens :]
    assert patches.abs().max() <= 1e-5


@pytest.mark.parametrize("registers", [REGISTERS, 0])
def test_to_dinov2_with_registers_at_the_native_size(registers):
    torch.manual_seed(0)
    model = DinoModel(tiny_config(num_register_tokens=registers)).eval()
    dinov2 = dino_to_dinov2_with_registers(model)
    assert type(dinov2) is tf.Dinov2WithRegistersModel
    config = dinov2.config
    assert (config.num_register_tokens, config.mlp_ratio, config.use_swiglu_ffn) == (registers, 2, False)
    assert config.layer_norm_eps == 1e-6
    for layer in dinov2.encoder.layer:
        assert torch.equal(layer.layer_scale1.lambda1, torch.ones(32))
        assert torch.equal(layer.layer_scale2.lambda1, torch.ones(32))
    assert torch.count_nonzero(dinov2.embeddings.mask_token) == 0  # none in the DinoModel: Dinov2's init
    assert_same_features(model, dinov2, torch.randn(2, 3, 32, 32))


def test_from_dinov2_with_registers_at_the_native_size_masks_included():
    dinov2 = tiny_dinov2()
    model = dino_from_dinov2_with_registers(dinov2, drop_path_rate=0.0)
    assert (model.config.num_register_tokens, model.config.intermediate_size) == (REGISTERS, 64)
    assert model.config.use_mask_token  # a trained (non-zero) mask token is kept
    torch.testing.assert_close(model.embeddings.mask_token[0], dinov2.embeddings.mask_token, rtol=0, atol=0)
    x = torch.randn(2, 3, 32, 32)
    assert_same_features(model, dinov2, x)
    # The mask token goes where Dinov2WithRegistersModel's own bool_masked_pos puts it.
    assert_same_features(model, dinov2, x, bool_masked_pos=random_mask(2, 16))
    assert not dino_from_dinov2_with_registers(dinov2, use_mask_token=False).config.use_mask_token


def test_an_untrained_mask_token_is_left_out():
    dinov2 = tiny_dinov2(num_register_tokens=0)
    with torch.no_grad():
        dinov2.embeddings.mask_token.zero_()
    model = dino_from_dinov2_with_registers(dinov2)
    assert model.embeddings.mask_token is None and model.embeddings.register_tokens is None
    assert model.num_prefix_tokens == 1
    assert dino_from_dinov2_with_registers(dinov2, use_mask_token=True).embeddings.mask_token is not None


def test_round_trip_through_a_dinov2_folder(tmp_path):
    torch.manual_seed(0)
    model = DinoModel(tiny_config(num_register_tokens=REGISTERS, use_mask_token=True)).eval()
    with torch.no_grad():
        model.embeddings.mask_token.normal_()
    dino_to_dinov2_with_registers(model).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "dinov2_with_registers"
    loaded = tf.AutoModel.from_pretrained(tmp_path).eval()  # transformers alone
    assert type(loaded) is tf.Dinov2WithRegistersModel
    assert_same_features(model, loaded, torch.randn(2, 3, 32, 32), bool_masked_pos=random_mask(2, 16))
    back = dino_from_dinov2_with_registers(tmp_path, drop_path_rate=0.0)
    assert set(back.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


@pytest.mark.parametrize("size", [(48, 48), (16, 16), (24, 40)])
def test_other_sizes_differ_only_by_the_position_interpolation(model, size):
    """Dinov2 resizes the position grid to the target size with antialiasing; DinoModel follows the
    reference DINO (scale factor (h + 0.1) / sqrt(N), no antialiasing). The outputs differ there, and
    agree once Dinov2 is given DINO's interpolation."""
    dinov2 = dino_to_dinov2_with_registers(model)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        gap = (model(x).last_hidden_state - dinov2(x).last_hidden_state).abs().max()
    assert gap > 1e-3
    dinov2.embeddings.interpolate_pos_encoding = lambda embeddings, height, width: (
        model.embeddings.interpolate_pos_encoding(height, width)
    )
    assert_same_features(model, dinov2, x)


def test_blocks_that_are_not_dinos_are_refused(tmp_path):
    dinov2 = tiny_dinov2()
    with torch.no_grad():
        dinov2.encoder.layer[1].layer_scale2.lambda1.fill_(1e-5)  # DINOv2's trained checkpoints: learned
    # Such a LayerScale converts (tests/test_layerscale.py), but not into a DinoModel without one.
    with pytest.raises(ValueError, match=r"encoder.layer.1.layer_scale2.lambda1 is not all ones"):
        dino_from_dinov2_with_registers(dinov2, layerscale_value=None)
    with pytest.raises(ValueError, match="SwiGLU MLP"):
        dino_from_dinov2_with_registers(tiny_dinov2(use_swiglu_ffn=True))
    with pytest.raises(ValueError, match="expected a Dinov2WithRegistersModel"):
        dino_from_dinov2_with_registers(DinoModel(tiny_config()))
    DinoModel(tiny_config()).save_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match="model_type 'dino_vit', not 'dinov2_with_registers'"):
        dino_from_dinov2_with_registers(tmp_path / "dino")
    with pytest.raises(ValueError, match="intermediate_size 48 is not a multiple of hidden_size 32"):
        dino_to_dinov2_with_registers(DinoModel(tiny_config(intermediate_size=48)))


def test_an_incomplete_dinov2_folder_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_dinov2().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["encoder.layer.0.layer_scale1.lambda1"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightLoadingError, match="encoder.layer.0.layer_scale1.lambda1"):
        dino_from_dinov2_with_registers(tmp_path)


def test_vit_and_timm_exports_refuse_registers_and_leave_the_mask_token_out(model, tmp_path):
    model.save_pretrained(tmp_path / "registers")
    for target in ("vit", "timm"):
        with pytest.raises(ValueError, match=f"3 register tokens, which the {target} layout cannot hold"):
            convert_checkpoint("dino", tmp_path / "registers", target, tmp_path / target)
    torch.manual_seed(0)
    masked = DinoModel(tiny_config(use_mask_token=True)).eval()
    plain = as_plain_vit(masked, "timm")
    assert plain.embeddings.mask_token is None and not plain.config.use_mask_token
    assert masked.config.use_mask_token  # the model given is left as it is
    masked.save_pretrained(tmp_path / "masked")
    convert_checkpoint("dino", tmp_path / "masked", "vit", tmp_path / "vit")
    vit = tf.ViTModel.from_pretrained(tmp_path / "vit").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (vit(x).pooler_output - masked(x).pooler_output).abs().max() <= 1e-5
