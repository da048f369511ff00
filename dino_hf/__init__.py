"""dino_hf: DINO self-supervised pretraining of vision backbones on the Hugging Face stack.

Importing the package registers `DinoConfig` / `DinoModel` with transformers' `AutoConfig` and
`AutoModel`, and marks them so that saved folders carry their modeling code (`auto_map`) and also load
with `trust_remote_code=True` where dino_hf is not installed.
"""

from transformers import AutoConfig, AutoModel

from .configuration_dino import PRESETS, DinoConfig
from .modeling_dino import DinoModel, dino_image_processor

AutoConfig.register(DinoConfig.model_type, DinoConfig, exist_ok=True)
AutoModel.register(DinoConfig, DinoModel, exist_ok=True)
DinoConfig.register_for_auto_class()
DinoModel.register_for_auto_class("AutoModel")

__version__ = "0.1.0"

__all__ = ["DinoConfig", "DinoModel", "PRESETS", "dino_image_processor"]
