"""Body-aware random patches with flip/rot90 augmentation, sampled directly on the training device."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from ..metrics import body_mask


def augment(batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One of the 8 flips/rotations by 90° per sample, the same for all channels of a sample.

    ``batch``: (B, C, H, W) with H == W; low- and normal-dose images are channels so they move together.
    """
    out = torch.empty_like(batch)
    choices = torch.randint(0, 8, (batch.shape[0],), generator=generator).tolist()
    for i, choice in enumerate(choices):
        sample = torch.rot90(batch[i], choice % 4, dims=(-2, -1))
        out[i] = torch.flip(sample, dims=(-1,)) if choice >= 4 else sample
    return out


class PatchSampler:
    """Draw square patches whose centres lie inside the patient's body.

    Args:
        images: per slice a (C, H, W) tensor (e.g. low and normal dose stacked), all on one device.
        body_hu: per slice the (H, W) HU image the body mask is computed from (normal dose).
        patch_size: side of the square patches in pixels (slices smaller than this, e.g. body crops, are padded
            at the bottom and right with ``pad_value``).
        seed: seeds the sampler's own generator.
        pad_value: what padding adds, in the images' units (default: air, -1000 HU).
    """

    def __init__(
        self,
        images: list[torch.Tensor],
        body_hu: list[np.ndarray],
        patch_size: int = 128,
        seed: int = 0,
        pad_value: float = -1000.0,
    ) -> None:
        if not images or len(images) != len(body_hu):
            raise ConfigError("PatchSampler needs one body image per slice and at least one slice")
        self.patch_size = patch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.images, self.centres = [], []
        half = patch_size // 2
        for image, hu in zip(images, body_hu):
            pad_h, pad_w = max(0, patch_size - image.shape[-2]), max(0, patch_size - image.shape[-1])
            if pad_h or pad_w:
                # Reflection cannot pad by more than the image's own size (body crops can be half a patch).
                image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=pad_value)
                hu = np.pad(hu, ((0, pad_h), (0, pad_w)), constant_values=-1000.0)
            mask = np.zeros(image.shape[-2:], dtype=bool)
            mask[half : image.shape[-2] - (patch_size - half) + 1, half : image.shape[-1] - (patch_size - half) + 1] = (
                True
            )
            inside = mask & body_mask(hu)
            rows, cols = np.nonzero(inside if inside.any() else mask)
            self.images.append(image)
            self.centres.append(torch.as_tensor(np.stack([rows, cols], 1)))

    def sample(
        self, batch_size: int, augment_patches: bool = True, return_index: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[int]]:
        """A (batch_size, C, patch, patch) batch on the images' device (and the slice index of each patch)."""
        half = self.patch_size // 2
        which = torch.randint(0, len(self.images), (batch_size,), generator=self.generator).tolist()
        patches = []
        for index in which:
            centres = self.centres[index]
            row, col = centres[torch.randint(0, len(centres), (1,), generator=self.generator)].tolist()[0]
            patches.append(
                self.images[index][
                    :, row - half : row - half + self.patch_size, col - half : col - half + self.patch_size
                ]
            )
        batch = torch.stack(patches)
        if augment_patches:
            batch = augment(batch, self.generator)
        return (batch, which) if return_index else batch
