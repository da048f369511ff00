"""Block masks of the student's global crops for iBOT's masked-patch loss (Zhou et al. 2022; DINOv2,
Oquab et al. 2023, Sec. 3; reference `dinov2/data/masking.py: MaskingGenerator` and
`dinov2/data/collate.py: collate_data_and_cast`).

Drawn on the host, in the DataLoader workers, once per batch (`BlockMasking`), so that the step gets
fixed-shape tensors and reads nothing back from the device:

- of the 2b global crops of a micro-batch of b images, n = int(2b x `sample_probability`) get a mask
  and the others none; with r = linspace(min, max, n + 1) (`ratio_min_max`), the i-th masked crop hides
  int(N x u) of its N patches, u uniform in [r_i, r_i+1]; the 2b masks are then shuffled over the crops;
- a mask is made of blocks (BEiT, Bao et al. 2022): repeatedly a rectangle of area uniform in
  [4, patches still to hide] and aspect ratio exp(uniform(ln 0.3, ln 1/0.3)) is placed at random,
  up to 10 tries for one that adds patches without exceeding the count, until the count is reached
  or no try adds a patch (`block_mask`).

The random draws of a batch are seeded by its samples' seeds, which are their positions in the stream
(`dino_hf.data.stream.MultiCropStream`), so that a resumed run draws the masks of an uninterrupted one.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

# BEiT's block shapes (DINOv2's `MaskingGenerator` defaults): the smallest block's area, the range of
# aspect ratios, and the tries for a block that adds patches before a mask is left as it is.
MIN_BLOCK_PATCHES = 4
MIN_ASPECT = 0.3
BLOCK_TRIES = 10


def _add_block(mask: np.ndarray, rng: np.random.Generator, max_patches: int) -> int:
    """Mask one more rectangle of `mask (h, w)` in place, adding at most `max_patches` patches; returns
    how many it added (0 when none of `BLOCK_TRIES` rectangles adds any within that limit)."""
    height, width = mask.shape
    log_aspect = (math.log(MIN_ASPECT), math.log(1 / MIN_ASPECT))
    for _ in range(BLOCK_TRIES):
        area = MIN_BLOCK_PATCHES + (max_patches - MIN_BLOCK_PATCHES) * rng.random()
        aspect = math.exp(log_aspect[0] + (log_aspect[1] - log_aspect[0]) * rng.random())
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            block = mask[top : top + h, left : left + w]  # a view: assigning to it masks the patches
            added = h * w - int(block.sum())
            if 0 < added <= max_patches:
                block[...] = True
                return added
    return 0


def block_mask(grid: tuple[int, int], num_masked: int, rng: np.random.Generator) -> np.ndarray:
    """A mask of `grid = (h, w)` patches made of rectangles, hiding `num_masked` of them (fewer when
    no block fits any more; see the module docstring). Returns a bool array `(h, w)`, True: masked."""
    mask = np.zeros(grid, dtype=bool)
    count = 0
    while count < num_masked:
        added = _add_block(mask, rng, num_masked - count)
        if not added:
            break
        count += added
    return mask


class PatchMasks(NamedTuple):
    """The masks of one batch and what the loss needs of them, all of fixed shape.

    The batch of B images is `micro_batches` micro-batches of b = B / micro_batches images (gradient
    accumulation), each masked on its own; inside a micro-batch its 2b global crops are in the
    student's row order, [global crop 1 of its b images, global crop 2 of its b images], and its
    patch tokens `(2b, N, C)` flatten to `2b * N` rows.

    Fields:
        bool_masked_pos (`torch.Tensor` of shape `(B, 2, N)`, bool): True where image i's global crop
            c hides patch p (row-major over the patch grid).
        indices (`torch.Tensor` of shape `(micro_batches, M)`, int64): per micro-batch, the rows of its
            flattened patch tokens that are masked, then padding (row 0) up to M, the most patches the
            masks can hide (`BlockMasking.max_masked_patches`).
        weights (`torch.Tensor` of shape `(micro_batches, M)`, float32): 1 / (masked patches of the
            crop) for each masked row, 0 for the padding.
    """

    bool_masked_pos: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    def micro_batches(self) -> list["PatchMasks"]:
        """The masks of each micro-batch: `(b, 2, N)`, `(1, M)`, `(1, M)`."""
        count = len(self.indices)
        per_image = self.bool_masked_pos.chunk(count)
        return [PatchMasks(per_image[j], self.indices[j : j + 1], self.weights[j : j + 1]) for j in range(count)]

    def crop_masks(self) -> torch.Tensor:
        """`bool_masked_pos` in the student's row order of the global crops: `(2B, N)`, crop 1's images
        first (for one micro-batch, the rows of its patch tokens)."""
        return self.bool_masked_pos.transpose(0, 1).flatten(0, 1)

    def to(self, device, non_blocking: bool = False) -> "PatchMasks":
        return PatchMasks(*(tensor.to(device, non_blocking=non_blocking) for tensor in self))


@dataclass(frozen=True)
class BlockMasking:
    """How the batches of a run are masked (DINOv2's `ibot.mask_ratio_min_max` and
    `ibot.mask_sample_probability`).

    Args:
        grid (`tuple[int, int]`): patches (h, w) of a global crop (global crop size / patch size).
        ratio_min_max (`tuple[float, float]`, defaults to `(0.1, 0.5)`): the range of the fraction of
            patches a masked crop hides.
        sample_probability (`float`, defaults to 0.5): the fraction of the global crops that are masked.
        micro_batches (`int`, defaults to 1): micro-batches per batch (gradient accumulation), each
            masked on its own as DINOv2 masks each GPU's batch.
    """

    grid: tuple[int, int]
    ratio_min_max: tuple[float, float] = (0.1, 0.5)
    sample_probability: float = 0.5
    micro_batches: int = 1

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def masked_crops(self, crops: int) -> int:
        """n = int(crops x sample_probability): how many of `crops` global crops get a mask."""
        return int(crops * self.sample_probability)

    def ratio_edges(self, crops: int) -> np.ndarray:
        """linspace(min, max, n + 1): masked crop i hides a fraction in [edges[i], edges[i + 1]]."""
        return np.linspace(*self.ratio_min_max, self.masked_crops(crops) + 1)

    def max_masked_patches(self, crops: int) -> int:
        """M = sum_i int(N x edges[i + 1]): the most patches the masks of `crops` global crops can hide
        (each hides at most its target, int(N x u) with u <= edges[i + 1]), whatever the draw."""
        return sum(int(self.num_patches * edge) for edge in self.ratio_edges(crops)[1:])

    def targets(self, crops: int, rng: np.random.Generator) -> list[int]:
        """The patches each masked crop is to hide, int(N x u) with u uniform in [edges[i], edges[i + 1]],
        in the order of the intervals (before the shuffle over the crops)."""
        edges = self.ratio_edges(crops)
        return [int(self.num_patches * (low + (high - low) * rng.random())) for low, high in zip(edges, edges[1:])]

    def draw(self, batch_size: int, rng: np.random.Generator) -> PatchMasks:
        """The masks of a batch of `batch_size` images (a multiple of `micro_batches`), from `rng`."""
        if batch_size % self.micro_batches:
            raise ValueError(
                f"a batch of {batch_size} images does not split into {self.micro_batches} micro-batches to mask"
            )
        images = batch_size // self.micro_batches
        crops = 2 * images
        limit = self.max_masked_patches(crops)
        masks = np.zeros((batch_size, 2, self.num_patches), dtype=bool)
        indices = np.zeros((self.micro_batches, limit), dtype=np.int64)
        weights = np.zeros((self.micro_batches, limit), dtype=np.float32)
        for j in range(self.micro_batches):
            hidden = [block_mask(self.grid, target, rng).reshape(-1) for target in self.targets(crops, rng)]
            hidden += [np.zeros(self.num_patches, dtype=bool)] * (crops - len(hidden))
            rows = np.stack([hidden[k] for k in rng.permutation(crops)])  # (2b, N), the student's crop order
            masks[j * images : (j + 1) * images] = rows.reshape(2, images, -1).transpose(1, 0, 2)
            flat = np.flatnonzero(rows)  # rows of the micro-batch's flattened (2b * N) patch tokens
            indices[j, : len(flat)] = flat
            per_crop = np.float32(1.0) / np.maximum(rows.sum(axis=1), 1).astype(np.float32)  # (2b,)
            weights[j, : len(flat)] = per_crop[flat // self.num_patches]
        return PatchMasks(torch.from_numpy(masks), torch.from_numpy(indices), torch.from_numpy(weights))

    def __call__(self, seeds: list[int]) -> PatchMasks:
        """The masks of a batch whose samples' generators were seeded by `seeds` (one per image, their
        positions in the stream): the same samples always get the same masks."""
        return self.draw(len(seeds), np.random.default_rng([int(seed) for seed in seeds]))


__all__ = ["BLOCK_TRIES", "MIN_ASPECT", "MIN_BLOCK_PATCHES", "BlockMasking", "PatchMasks", "block_mask"]
