"""LayerNorm epsilon of converted transformers ViTs (issue 38, item 8; docs/formats.md#layernorm-epsilon).

A transformers ViT folder read for evaluation (`load_feature_model`) keeps its config's eps, so that its
features are stock `ViTModel`'s: a Google-style ViT (eps 1e-12) is not evaluated at DINO's 1e-6. The
conversions into DinoModel (`convert_checkpoint --from vit`, the reference `.pth` checkpoints) keep
DINO's 1e-6, the eps the reference trained its weights with.
"""

import json

import pytest
import torch
from transformers import ViTConfig, ViTModel

from dino_hf.convert.conversions import dino_from_reference, dino_from_vit
from dino_hf.convert.timm_weights import DINO_LAYER_NORM_EPS, dino_to_timm_state_dict
from dino_hf.evaluation.feature_models import DinoFeatureModel, load_feature_model

TOLERANCE = 1e-5  # fp32 parity with stock transformers
GOOGLE_EPS = 1e-12  # transformers' ViT default, what google/vit-* (and facebook/dino-*) configs say
TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, image_size=32, patch_size=8
)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def images(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


@pytest.fixture
def google_vit_folder(tmp_path):
    """A tiny random ViT folder with transformers' own initialisation (std 0.02, LayerNorms 1 and 0), as a
    Google ViT is laid out, eps 1e-12. Its token variance is small (about 0.1), so the eps shows: read with
    1e-6 its features move by about 1e-3, a hundred times the tolerance."""
    torch.manual_seed(0)
    ViTModel(ViTConfig(**TINY, layer_norm_eps=GOOGLE_EPS)).save_pretrained(tmp_path / "vit")
    return tmp_path / "vit"


def stock_outputs(folder, pixel_values: torch.Tensor):
    """Stock transformers: the folder read back by `ViTModel.from_pretrained`."""
    with torch.no_grad():
        return ViTModel.from_pretrained(folder).eval()(pixel_values)


def test_evaluation_keeps_the_vit_eps_and_matches_stock_transformers(google_vit_folder):
    feature_model, _ = load_feature_model(google_vit_folder)
    assert isinstance(feature_model, DinoFeatureModel)
    assert feature_model.model.config.layer_norm_eps == GOOGLE_EPS
    pixel_values = images()
    expected = stock_outputs(google_vit_folder, pixel_values).last_hidden_state  # (B, 1 + N, D)
    with torch.no_grad():
        cls = feature_model(pixel_values)  # (B, D): the DINO feature, CLS after the final LayerNorm
        (last,) = feature_model.last_blocks(pixel_values, 1)
        output = feature_model.model(pixel_values)
    assert max_diff(cls, expected[:, 0]) <= TOLERANCE
    assert max_diff(output.pooler_output, expected[:, 0]) <= TOLERANCE
    assert max_diff(last, expected) <= TOLERANCE
    assert max_diff(output.last_hidden_state, expected) <= TOLERANCE


def test_dino_eps_would_fail_the_stock_comparison(google_vit_folder):
    """The test above would catch a conversion at DINO's 1e-6: on this ViT the eps moves the features by
    far more than the tolerance."""
    at_dino_eps = dino_from_vit(google_vit_folder)  # the conversion's default, for facebook/dino-* weights
    assert at_dino_eps.config.layer_norm_eps == DINO_LAYER_NORM_EPS
    pixel_values = images()
    expected = stock_outputs(google_vit_folder, pixel_values).last_hidden_state
    with torch.no_grad():
        output = at_dino_eps(pixel_values)
    assert max_diff(output.pooler_output, expected[:, 0]) > 10 * TOLERANCE
    assert max_diff(output.last_hidden_state, expected) > 10 * TOLERANCE


def test_config_without_eps_reads_transformers_default(google_vit_folder):
    """A config.json that names no eps is read as ViTModel reads it: ViTConfig's default, 1e-12."""
    config_file = google_vit_folder / "config.json"
    config = json.loads(config_file.read_text())
    del config["layer_norm_eps"]
    config_file.write_text(json.dumps(config))
    feature_model, _ = load_feature_model(google_vit_folder)
    assert feature_model.model.config.layer_norm_eps == ViTConfig().layer_norm_eps == GOOGLE_EPS
    pixel_values = images()
    with torch.no_grad():
        cls = feature_model(pixel_values)
    assert max_diff(cls, stock_outputs(google_vit_folder, pixel_values).last_hidden_state[:, 0]) <= TOLERANCE


def test_model_instance_keeps_its_eps(google_vit_folder):
    vit = ViTModel.from_pretrained(google_vit_folder).eval()
    model = dino_from_vit(vit, keep_layer_norm_eps=True)
    assert model.config.layer_norm_eps == GOOGLE_EPS
    with torch.no_grad():
        assert max_diff(model(images()).pooler_output, vit(images()).last_hidden_state[:, 0]) <= TOLERANCE


def test_keep_eps_is_refused_without_a_config_or_with_an_explicit_eps(google_vit_folder):
    with pytest.raises(ValueError, match="no config.json to keep the LayerNorm eps of.*pass the ViT folder"):
        dino_from_vit(google_vit_folder / "model.safetensors", keep_layer_norm_eps=True, num_attention_heads=2)
    with pytest.raises(ValueError, match="both set the LayerNorm eps; pass one of them"):
        dino_from_vit(google_vit_folder, keep_layer_norm_eps=True, layer_norm_eps=1e-6)
    assert dino_from_vit(google_vit_folder, layer_norm_eps=1e-5).config.layer_norm_eps == 1e-5


def test_reference_checkpoint_keeps_dino_eps(google_vit_folder):
    """A reference `.pth` backbone (timm names, no config) is DINO's network, trained with 1e-6."""
    state_dict = dino_to_timm_state_dict(dino_from_vit(google_vit_folder, keep_layer_norm_eps=True).state_dict())
    imported = dino_from_reference(state_dict, num_attention_heads=2)
    assert imported.model.config.layer_norm_eps == DINO_LAYER_NORM_EPS
