"""A tiny CLIP teacher for the tests: CLIPModel (hidden 32, 2 layers, 32 px, patch 8), a word-level tokenizer
made here (nothing downloaded) and a 32 px CLIPImageProcessor."""

from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

WORDS = (
    "<pad> <unk> <bos> <eos> this is a an the photo of . red green blue dark yellow grey cat itap bad origami large "
    "small in video game art"
).split()


def word_tokenizer(max_length: int) -> tf.PreTrainedTokenizerFast:
    """Lower-cased words and full stops, `<bos> ... <eos>`; unknown words are `<unk>`."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", WORDS.index("<bos>")), ("<eos>", WORDS.index("<eos>"))]
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def text_config(max_length: int) -> dict:
    special = dict(pad_token_id=0, bos_token_id=WORDS.index("<bos>"), eos_token_id=WORDS.index("<eos>"))
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return dict(vocab_size=len(WORDS), max_position_embeddings=max_length, **layers, **special)


VISION_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
VISION_CONFIG.update(image_size=32, patch_size=8)


def save_clip_teacher(folder: Path, embedding: int = 16, seed: int = 0) -> Path:
    """A tiny CLIP teacher folder with embeddings of `embedding`, its tokenizer and image processor."""
    torch.manual_seed(seed)
    config = tf.CLIPConfig(text_config=text_config(16), vision_config=VISION_CONFIG, projection_dim=embedding)
    tf.CLIPModel(config).save_pretrained(folder)
    word_tokenizer(16).save_pretrained(folder)
    tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder
