"""The tiny ViT the tests build: 32 px images, patch 8, hidden 32, 2 layers of 2 heads."""

TINY_VIT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
)
