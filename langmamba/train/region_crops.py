"""Normal-dose crops with per-pixel tissue classes and lesion masks, drawn on the training device.

The residual LangAE learns its word reading from each region's own HU composition and lesion overlap
(:mod:`langmamba.vlm.regions`). Classes are computed once per whole slice (so the body mask is exact:
lungs are inside, air around the patient outside) and cropped together with the image and the lesion
mask, flips and transposes applied to all three alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data import CTSlice
from ..normalization import hu_to_model
from ..vlm.regions import classify_hu


def _pad_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Pad ``(C, H, W)`` (model-range HU, class map, lesion mask) on the bottom/right up to ``size`` with air:
    0 in the model range (-1000 HU), class 0 (air), no lesion. Reflection would mirror a body-cropped slice's
    anatomy into the crop."""
    pad_h, pad_w = max(0, size - x.shape[-2]), max(0, size - x.shape[-1])
    if not (pad_h or pad_w):
        return x
    return F.pad(x, (0, pad_w, 0, pad_h), value=0.0)


class RegionCrops:
    """Crops ``(image, classes, lesion)`` of ``patch_size`` from the training slices.

    Args:
        slices: training slices (``full`` HU, optional ``label`` lesion mask).
        patch_size: crop side in pixels (slices smaller than this are padded with air).
        device: where the slices, class maps and crops live.
        seed: seeds the crop generator.
        lesion_share: share of crops drawn from the slices whose lesion mask marks a lesion (when there are
            any): lesions are rare, and their words are learnt only there.
    """

    def __init__(
        self,
        slices: Sequence[CTSlice],
        patch_size: int,
        device: torch.device,
        seed: int = 0,
        lesion_share: float = 0.25,
    ) -> None:
        self.patch_size = int(patch_size)
        self.lesion_share = float(lesion_share)
        self.device = device
        self.generator = torch.Generator().manual_seed(seed)
        self.stacks, self.has_label, self.starts = [], [], []
        for s in slices:
            hu = torch.as_tensor(np.asarray(s.full, np.float32), device=device)
            classes = classify_hu(hu[None])[0]
            label = (
                torch.zeros_like(hu)
                if s.label is None
                else torch.as_tensor(np.asarray(s.label) != 0, device=device).float()
            )
            stack = torch.stack([hu_to_model(hu), classes.float(), label])
            stack = _pad_to(stack, self.patch_size)
            self.stacks.append(stack)
            self.has_label.append(s.label is not None)
            # Crop corners whose centre lies in the body (any corner when none does).
            half = self.patch_size // 2
            body = (
                stack[
                    1,
                    half : stack.shape[1] - self.patch_size + half + 1,
                    half : stack.shape[2] - self.patch_size + half + 1,
                ]
                > 0
            )
            corners = torch.nonzero(body).cpu() if body.any() else torch.nonzero(torch.ones_like(body)).cpu()
            self.starts.append(corners)
        self.with_lesion = [i for i, s in enumerate(slices) if s.label is not None and np.asarray(s.label).any()]

    def __len__(self) -> int:
        return len(self.stacks)

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image (B, 1, P, P) model range, classes (B, P, P) long, lesion (B, P, P) float, has_label (B,) bool)``."""
        p = self.patch_size
        which = torch.randint(0, len(self.stacks), (batch_size,), generator=self.generator).tolist()
        if self.with_lesion and self.lesion_share > 0:
            lesion_pick = torch.rand(batch_size, generator=self.generator) < self.lesion_share
            chosen = torch.randint(0, len(self.with_lesion), (batch_size,), generator=self.generator).tolist()
            which = [self.with_lesion[c] if pick else w for w, c, pick in zip(which, chosen, lesion_pick.tolist())]
        crops = []
        for index in which:
            corners = self.starts[index]
            top, left = corners[torch.randint(0, len(corners), (1,), generator=self.generator)].tolist()[0]
            crop = self.stacks[index][:, top : top + p, left : left + p]
            flips = torch.randint(0, 2, (3,), generator=self.generator).tolist()
            if flips[0]:
                crop = crop.flip(-1)
            if flips[1]:
                crop = crop.flip(-2)
            if flips[2]:
                crop = crop.transpose(-1, -2)
            crops.append(crop)
        batch = torch.stack(crops)
        has = torch.tensor([self.has_label[i] for i in which], device=self.device)
        return batch[:, :1].contiguous(), batch[:, 1].round().long(), batch[:, 2].contiguous(), has
