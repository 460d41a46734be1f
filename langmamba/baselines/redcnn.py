"""RED-CNN (Chen et al., IEEE TMI 2017): the residual encoder-decoder CNN baseline for LDCT denoising."""

from __future__ import annotations

import torch
from torch import nn

from ..models.registry import register_model


@register_model
class REDCNN(nn.Module):
    """Residual encoder-decoder CNN.

    Five 5×5 convolutions without padding (each shrinks the image by 4 pixels) and five mirrored transposed
    convolutions, with shortcuts from the input, the 2nd and the 4th encoder outputs added back in the decoder,
    as in the paper. Works on any slice size ≥ 21 pixels.

    Args:
        channels: feature maps per layer (96 in the paper).
        kernel_size: convolution size (5 in the paper).

    Shapes: ``(B, 1, H, W) -> (B, 1, H, W)``, both in the model intensity range (see ``langmamba.normalization``).
    """

    def __init__(self, channels: int = 96, kernel_size: int = 5) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.encoder = nn.ModuleList([nn.Conv2d(1 if i == 0 else channels, channels, kernel_size) for i in range(5)])
        self.decoder = nn.ModuleList(
            [nn.ConvTranspose2d(channels, 1 if i == 4 else channels, kernel_size) for i in range(5)]
        )
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut_input = x
        out = self.relu(self.encoder[0](x))
        out = self.relu(self.encoder[1](out))
        shortcut_2 = out
        out = self.relu(self.encoder[2](out))
        out = self.relu(self.encoder[3](out))
        shortcut_4 = out
        out = self.relu(self.encoder[4](out))

        out = self.decoder[0](out) + shortcut_4
        out = self.decoder[1](self.relu(out))
        out = self.decoder[2](self.relu(out)) + shortcut_2
        out = self.decoder[3](self.relu(out))
        out = self.decoder[4](self.relu(out)) + shortcut_input
        return self.relu(out)

    def get_config(self) -> dict:
        return {"channels": self.channels, "kernel_size": self.kernel_size}
