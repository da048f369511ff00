"""dino_hf: DINO self-supervised pretraining of vision backbones on the Hugging Face stack.

Importing the package registers `DinoConfig` / `DinoModel` with transformers' `AutoConfig` and
`AutoModel`, and marks them so that saved folders carry their modeling code (`auto_map`) and also load
with `trust_remote_code=True` where dino_hf is not installed.
"""

from transformers import AutoConfig, AutoModel

from .models.configuration_dino import PRESETS, DinoConfig
from .models.image_processing_dino import dino_image_processor
from .models.modeling_dino import DinoModel

AutoConfig.register(DinoConfig.model_type, DinoConfig, exist_ok=True)
AutoModel.register(DinoConfig, DinoModel, exist_ok=True)
DinoConfig.register_for_auto_class()
DinoModel.register_for_auto_class("AutoModel")

# The training side is imported on first use, so that `import dino_hf` stays light for inference.
_LAZY = {
    "DinoHead": "models.heads",
    "MultiCropWrapper": "models.multicrop_wrapper",
    "build_backbone": "models.backbones",
    "MultiCropTransform": "augment.multicrop",
    "load_image_stream": "data.sources",
    "DinoLoss": "objectives.dino",
    "build_teacher": "training.teacher",
    "DinoTrainingArguments": "training.arguments",
    "train": "training.trainer",
    "train_step": "training.step",
    "StepValues": "training.step",
    "load_feature_model": "evaluation.feature_models",
    "knn_evaluate": "evaluation.knn",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'dino_hf' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = ["DinoConfig", "DinoModel", "PRESETS", "dino_image_processor", *_LAZY]
