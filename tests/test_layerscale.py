"""DINOv2's LayerScale and uniform stochastic depth in DinoModel (`DinoConfig(layerscale_value=...,
drop_path_uniform=...)`), and how the conversions and exports carry them."""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
import transformers as tf
from test_modeling_dino import reference_vit_forward, tiny_config
from test_registers import assert_same_features, tiny_dinov2

from dino_hf import DinoConfig, DinoModel
from dino_hf.convert.conversions import convert_checkpoint, dino_from_dinov2_with_registers, dino_from_timm
from dino_hf.convert.export import (
    dino_to_dinov2_with_registers,
    export_backbone,
    save_as_timm,
    save_as_vit,
    to_timm_model,
    to_vit_model,
)
from dino_hf.models.layout import backbone_layout
from dino_hf.training.optimization import get_param_groups

LAYERSCALE = 1e-5  # DINOv2's `layerscale`
TOLERANCE = 1e-5


def layerscale_model(seed: int = 0, **overrides) -> DinoModel:
    """A tiny DinoModel with LayerScale whose vectors are random (as trained ones are), not the init value."""
    torch.manual_seed(seed)
    model = DinoModel(tiny_config(**({"layerscale_value": LAYERSCALE} | overrides))).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".lambda1"):
                param.copy_(torch.rand(param.shape) + 0.5)  # (D,) in [0.5, 1.5)
    return model


def layer_scale_keys(model: torch.nn.Module) -> list[str]:
    return [key for key in model.state_dict() if "layer_scale" in key]


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


# ---------------------------------------------------------------------------------------------------
# The config


def test_config_validates_and_round_trips_the_new_fields(tmp_path):
    for bad in (0, 0.0, -1e-5, math.inf, math.nan, "1e-5", True):
        with pytest.raises(ValueError, match="layerscale_value must be None"):
            DinoConfig(layerscale_value=bad)
    for bad in (1, 0, "true", None):
        with pytest.raises(ValueError, match="drop_path_uniform must be True"):
            DinoConfig(drop_path_uniform=bad)
    assert DinoConfig(layerscale_value=1).layerscale_value == 1.0
    assert isinstance(DinoConfig(layerscale_value=1).layerscale_value, float)
    config = DinoConfig.from_preset("vit_small_patch16", layerscale_value=LAYERSCALE, drop_path_uniform=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["layerscale_value"], saved["drop_path_uniform"]) == (LAYERSCALE, True)
    loaded = DinoConfig.from_pretrained(tmp_path)
    assert (loaded.layerscale_value, loaded.drop_path_uniform) == (LAYERSCALE, True)


def test_a_config_json_without_the_fields_loads_with_the_defaults(tmp_path):
    DinoConfig().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for field in ("layerscale_value", "drop_path_uniform"):
        saved.pop(field, None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = DinoConfig.from_pretrained(tmp_path)
    assert (loaded.layerscale_value, loaded.drop_path_uniform) == (None, False)


# ---------------------------------------------------------------------------------------------------
# Defaults: DINO's ViT as before


def test_the_defaults_keep_the_weights_the_init_draws_and_the_outputs():
    assert (DinoConfig().layerscale_value, DinoConfig().drop_path_uniform) == (None, False)
    fields = dict(num_hidden_layers=3, drop_path_rate=0.3)
    torch.manual_seed(0)
    default = DinoModel(tiny_config(**fields))
    default_rng = torch.random.get_rng_state()
    torch.manual_seed(0)
    explicit = DinoModel(tiny_config(**fields, layerscale_value=None, drop_path_uniform=False))
    assert torch.equal(torch.random.get_rng_state(), default_rng)
    assert list(explicit.state_dict()) == list(default.state_dict())
    assert layer_scale_keys(default) == [] and not any(p.ndim == 1 and p.numel() == 0 for p in default.parameters())
    for key, value in default.state_dict().items():
        assert torch.equal(explicit.state_dict()[key], value), key
    # LayerScale is initialised without random draws: every other weight is the same for the same seed.
    torch.manual_seed(0)
    scaled = DinoModel(tiny_config(**fields, layerscale_value=LAYERSCALE))
    assert torch.equal(torch.random.get_rng_state(), default_rng)
    for key, value in default.state_dict().items():
        assert torch.equal(scaled.state_dict()[key], value), key
    x = images()
    default.train(), explicit.train()
    torch.manual_seed(3)
    expected = default(x).last_hidden_state
    torch.manual_seed(3)
    torch.testing.assert_close(explicit(x).last_hidden_state, expected, rtol=0, atol=0)
    with torch.no_grad():
        independent = reference_vit_forward(default.state_dict(), default.config, x)
        assert (default.eval()(x).last_hidden_state - independent).abs().max() <= TOLERANCE


# ---------------------------------------------------------------------------------------------------
# LayerScale


def test_layerscale_weights_have_dinov2s_names_and_start_at_the_value():
    torch.manual_seed(0)
    model = DinoModel(tiny_config(layerscale_value=0.25))
    assert layer_scale_keys(model) == [f"encoder.layer.{i}.layer_scale{n}.lambda1" for i in (0, 1) for n in (1, 2)]
    for key in layer_scale_keys(model):
        assert torch.equal(model.state_dict()[key], torch.full((32,), 0.25)), key


@pytest.mark.parametrize("layerscale_value", [LAYERSCALE, 0.5])
def test_layerscale_is_initialised_on_the_meta_device_path(layerscale_value, tmp_path):
    config = tiny_config(layerscale_value=layerscale_value)
    with torch.device("meta"):
        empty = DinoModel(config)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    empty.to_empty(device="cpu")
    with torch.no_grad():
        for param in empty.parameters():
            param.fill_(7.0)  # whatever the memory held: init_weights must overwrite it
    empty.init_weights()
    for key in layer_scale_keys(empty):
        assert torch.equal(empty.state_dict()[key], torch.full((32,), layerscale_value)), key
    # from_pretrained builds on the meta device and initialises what the folder lacks with `_init_weights`.
    torch.manual_seed(0)
    DinoModel(tiny_config()).save_pretrained(tmp_path)
    loaded = DinoModel.from_pretrained(tmp_path, layerscale_value=layerscale_value)
    for key in layer_scale_keys(loaded):
        assert torch.equal(loaded.state_dict()[key], torch.full((32,), layerscale_value)), key


def test_layerscale_forward_matches_the_independent_reference_at_any_size():
    model = layerscale_model()
    for size in ((32, 32), (24, 40)):
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            got = model(x).last_hidden_state
        assert (got - reference_vit_forward(model.state_dict(), model.config, x)).abs().max() <= TOLERANCE
    with torch.no_grad():
        plain = DinoModel(tiny_config())
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "layer_scale" not in k})
        assert (plain.eval()(images()).pooler_output - model(images()).pooler_output).abs().max() > 1e-2


def test_a_block_matches_transformers_dinov2_layer_with_copied_weights():
    model = layerscale_model()
    dinov2 = dino_to_dinov2_with_registers(model)
    ours, theirs = model.encoder.layer[1], dinov2.encoder.layer[1]
    assert torch.equal(theirs.layer_scale1.lambda1, ours.layer_scale1.lambda1)
    assert torch.equal(theirs.layer_scale2.lambda1, ours.layer_scale2.lambda1)
    tokens = torch.randn(2, 17, 32)
    with torch.no_grad():
        got, _ = ours(tokens)
        expected = theirs(tokens)
        expected = expected[0] if isinstance(expected, tuple) else expected
    assert (got - expected).abs().max() <= TOLERANCE


def reference_block(layer, tokens: torch.Tensor, keep1: float = 1.0, keep2: float = 1.0) -> torch.Tensor:
    """x + keep1 * ls1 * attn(norm1(x)), then x + keep2 * ls2 * mlp(norm2(x)), from the block's submodules;
    keep1, keep2 are what drop path multiplies each branch by (0, or 1 / keep probability)."""
    attended, _ = layer.attention(layer.layernorm_before(tokens))
    tokens = tokens + keep1 * (layer.layer_scale1.lambda1 * attended)
    mlp = layer.output(layer.intermediate(layer.layernorm_after(tokens)))
    return tokens + keep2 * (layer.layer_scale2.lambda1 * mlp)


def test_a_block_scales_each_branch_and_drops_it_per_sample():
    model = layerscale_model(drop_path_rate=0.5, drop_path_uniform=True)
    layer = model.encoder.layer[0]
    tokens = torch.randn(64, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(tokens)[0], reference_block(layer, tokens), rtol=1e-5, atol=1e-5)
        torch.manual_seed(0)
        got, _ = layer.train()(tokens)
        # Each sample is one of the four keep / drop cases of the two branches (drop path 0.5: x 2 or x 0).
        cases = [(k1, k2) for k1 in (0.0, 2.0) for k2 in (0.0, 2.0)]
        gaps = torch.stack([(got - reference_block(layer, tokens, *case)).abs().amax(dim=(1, 2)) for case in cases])
    assert (gaps.amin(dim=0) <= 1e-5).all()
    assert set(gaps.argmin(dim=0).tolist()) == {0, 1, 2, 3}


def test_every_parameter_gets_a_gradient_with_layerscale():
    model = layerscale_model(drop_path_rate=0.0).train()
    model(images()).last_hidden_state.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert missing == []
    assert all(model.get_parameter(key).grad.abs().sum() > 0 for key in layer_scale_keys(model))


# ---------------------------------------------------------------------------------------------------
# Uniform stochastic depth


def test_uniform_drop_path_gives_every_block_the_rate():
    config = tiny_config(num_hidden_layers=5, drop_path_rate=0.3, drop_path_uniform=True)
    with torch.device("meta"):
        empty = DinoModel(config)
    for model in (DinoModel(config), empty):
        assert [layer.drop_path.drop_prob for layer in model.encoder.layer] == [0.3] * 5
    linear = DinoModel(tiny_config(num_hidden_layers=5, drop_path_rate=0.3))
    assert [layer.drop_path.drop_prob for layer in linear.encoder.layer] == pytest.approx(
        [0.0, 0.075, 0.15, 0.225, 0.3]
    )
    # The first block really drops: about 30 % of the samples skip its branches in training.
    layer = DinoModel(config).encoder.layer[0].train()
    tokens = torch.randn(2000, 2, 32)
    with torch.no_grad():
        torch.manual_seed(0)
        got, _ = layer(tokens)
    untouched = (got == tokens).all(dim=(1, 2)).float().mean().item()
    assert untouched == pytest.approx(0.3 * 0.3, abs=0.03)  # both branches dropped


# ---------------------------------------------------------------------------------------------------
# Dinov2WithRegistersModel, both ways


@pytest.mark.parametrize("registers", [0, 4])
def test_round_trip_through_a_stock_dinov2_folder(registers, tmp_path):
    model = layerscale_model(num_register_tokens=registers, drop_path_rate=0.2, drop_path_uniform=True)
    dinov2 = dino_to_dinov2_with_registers(model)
    assert (dinov2.config.layerscale_value, dinov2.config.drop_path_rate) == (LAYERSCALE, 0.2)
    dinov2.save_pretrained(tmp_path)
    loaded = tf.AutoModel.from_pretrained(tmp_path).eval()  # transformers alone
    assert type(loaded) is tf.Dinov2WithRegistersModel
    for i, layer in enumerate(loaded.encoder.layer):
        assert torch.equal(layer.layer_scale1.lambda1, model.encoder.layer[i].layer_scale1.lambda1)
        assert torch.equal(layer.layer_scale2.lambda1, model.encoder.layer[i].layer_scale2.lambda1)
    assert_same_features(model, loaded, images())
    back = dino_from_dinov2_with_registers(tmp_path, drop_path_rate=0.0)
    assert back.config.layerscale_value == LAYERSCALE
    assert set(back.state_dict()) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert_same_features(back, loaded, images(2))


def test_a_dinov2_checkpoint_with_learned_layerscale_converts():
    dinov2 = tiny_dinov2(layerscale_value=LAYERSCALE)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in dinov2.encoder.layer:
            for scale in (layer.layer_scale1, layer.layer_scale2):
                scale.lambda1.copy_(torch.rand(32, generator=generator) + 0.5)
    model = dino_from_dinov2_with_registers(dinov2, drop_path_rate=0.0)
    assert model.config.layerscale_value == LAYERSCALE
    assert len(layer_scale_keys(model)) == 4
    torch.testing.assert_close(
        model.encoder.layer[1].layer_scale2.lambda1, dinov2.encoder.layer[1].layer_scale2.lambda1, rtol=0, atol=0
    )
    assert_same_features(model, dinov2, images())
    assert dino_from_dinov2_with_registers(dinov2, layerscale_value=0.5).config.layerscale_value == 0.5


def test_a_dinov2_with_layerscale_1_everywhere_converts_without_layerscale():
    dinov2 = tiny_dinov2()  # transformers' init: every LayerScale exactly 1
    model = dino_from_dinov2_with_registers(dinov2, drop_path_rate=0.0)
    assert model.config.layerscale_value is None and layer_scale_keys(model) == []
    assert_same_features(model, dinov2, images())
    kept = dino_from_dinov2_with_registers(dinov2, drop_path_rate=0.0, layerscale_value=1.0)
    assert kept.config.layerscale_value == 1.0
    assert all(torch.equal(kept.get_parameter(key), torch.ones(32)) for key in layer_scale_keys(kept))
    assert_same_features(kept, dinov2, images())


# ---------------------------------------------------------------------------------------------------
# The other exports


def test_timm_export_carries_layerscale(tmp_path):
    model = layerscale_model()
    save_as_timm(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_args"]["init_values"] == LAYERSCALE
    with torch.no_grad():
        expected = model(images())
        timm_model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
        torch.testing.assert_close(
            timm_model.blocks[1].ls2.gamma, model.encoder.layer[1].layer_scale2.lambda1, rtol=0, atol=0
        )
        assert (timm_model(images()) - expected.pooler_output).abs().max() <= TOLERANCE
        assert (timm_model.forward_features(images()) - expected.last_hidden_state).abs().max() <= TOLERANCE
        wrapper = tf.TimmWrapperModel.from_pretrained(tmp_path).eval()
        assert (wrapper(images()).pooler_output - expected.pooler_output).abs().max() <= TOLERANCE
        assert (to_timm_model(model)(images()) - expected.pooler_output).abs().max() <= TOLERANCE
    for back in (dino_from_timm(tmp_path), dino_from_timm(timm_model)):
        assert back.config.layerscale_value == LAYERSCALE
        assert set(back.state_dict()) == set(model.state_dict())
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
    from_state_dict = dino_from_timm(timm_model.state_dict(), num_attention_heads=2)
    assert from_state_dict.config.layerscale_value == 1e-5  # timm's LayerScale default


def test_vit_export_refuses_layerscale(tmp_path):
    model = layerscale_model()
    with pytest.raises(ValueError, match="LayerScale .* which transformers' ViTModel cannot hold"):
        save_as_vit(model, tmp_path / "vit")
    with pytest.raises(ValueError, match="dino_to_dinov2_with_registers"):
        to_vit_model(model)
    model.save_pretrained(tmp_path / "dino")
    with pytest.raises(ValueError, match="ViTModel cannot hold"):
        convert_checkpoint("dino", tmp_path / "dino", "vit", tmp_path / "vit")
    convert_checkpoint("dino", tmp_path / "dino", "timm", tmp_path / "timm")
    with torch.no_grad():
        timm_model = timm.create_model(f"local-dir:{tmp_path / 'timm'}", pretrained=True).eval()
        assert (timm_model(images()) - model(images()).pooler_output).abs().max() <= TOLERANCE


def test_the_training_export_keeps_layerscale_and_uniform_drop_path(tmp_path):
    """`export_backbone` (the end of training) writes a DinoModel folder, which holds both options."""
    model = layerscale_model(drop_path_rate=0.2, drop_path_uniform=True)
    export = export_backbone(model, tmp_path / "export", image_size=32)
    loaded = tf.AutoModel.from_pretrained(export).eval()  # `import dino_hf` registered DinoModel
    assert type(loaded) is DinoModel
    assert (loaded.config.layerscale_value, loaded.config.drop_path_uniform) == (LAYERSCALE, True)
    assert [layer.drop_path.drop_prob for layer in loaded.encoder.layer] == [0.2, 0.2]
    with torch.no_grad():
        assert (loaded(images()).pooler_output - model(images()).pooler_output).abs().max() <= 1e-6


def test_the_training_export_loads_without_dino_hf(tmp_path):
    """The folder's own copy of the modeling code (`trust_remote_code=True`) holds LayerScale too."""
    model = layerscale_model()
    export_backbone(model, tmp_path / "export", image_size=32)
    torch.save(images(), tmp_path / "x.pt")
    with torch.no_grad():
        torch.save(model(images()).pooler_output, tmp_path / "expected.pt")
    script = textwrap.dedent(
        """
        import sys
        sys.modules["dino_hf"] = None  # dino_hf cannot be imported in this process
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained("export", trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert model.config.layerscale_value == 1e-5, model.config.layerscale_value
        with torch.no_grad():
            diff = (model(torch.load("x.pt")).pooler_output - torch.load("expected.pt")).abs().max().item()
        assert diff <= 1e-6, diff
        print("OK", diff)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout


# ---------------------------------------------------------------------------------------------------
# Optimiser groups


def test_layerscale_sits_in_its_block_and_gets_no_weight_decay():
    model = layerscale_model()
    layout = backbone_layout(model)
    for i in range(2):
        block = layout.places[f"encoder.layer.{i}.attention.output.dense.weight"]
        for n in (1, 2):
            place = layout.places[f"encoder.layer.{i}.layer_scale{n}.lambda1"]
            assert (place.layer, place.unit, place.patch_embed) == (i + 1, i + 1, False)
            assert place == block
    # layer_decay 0.5 over L = 2 blocks: block b at 0.5^(2 - b).
    assert layout.lr_scale("encoder.layer.0.layer_scale1.lambda1", 0.5, 1.0) == 0.25
    assert layout.lr_scale("encoder.layer.1.layer_scale2.lambda1", 0.5, 1.0) == 0.5
    scales = {id(model.get_parameter(key)) for key in layer_scale_keys(model)}
    for group in get_param_groups(model):
        if scales & {id(p) for p in group["params"]}:
            assert not group["regularized"] and group["weight_decay"] == 0.0
