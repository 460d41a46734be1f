"""Training losses of LangMamba: stage 1 (LangAE) and stage 2 (the denoiser, with LangDA).

Images are ``(B, 1, H, W)`` tensors in model range ([0, 1] = [-1000, 2000] HU).

Perceptual term. The paper's VQGAN-style stage 1 uses LPIPS on pretrained VGG features, which cannot
be downloaded here (and ImageNet features are a questionable prior for CT). The substitute is
``(1 - multi-scale SSIM) + L1 between Sobel gradient magnitudes``: SSIM at three dyadic scales
penalises loss of local contrast and structure (the blur an L1-only autoencoder produces), and the
gradient-magnitude term directly penalises smoothed edges and lost fine texture, which is what LPIPS
is mostly used for in VQGAN training. Both need no weights, are deterministic and cost a few
depth-wise convolutions. Scales are combined by a weighted arithmetic mean (not the product of the
original MS-SSIM), which stays differentiable and well behaved when a scale's SSIM is negative.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from langmamba.errors import InputError
from langmamba.models.quantizer import QuantizerOutput

# First three MS-SSIM scale weights of Wang et al. (2003), renormalised to sum to 1.
_SSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001)
_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5


def _check_pair(prediction: torch.Tensor, target: torch.Tensor) -> None:
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise InputError(
            f"prediction and target must be (B, C, H, W) of the same shape, got {tuple(prediction.shape)} "
            f"and {tuple(target.shape)}"
        )


def _gaussian_window(channels: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    coords = torch.arange(_SSIM_WINDOW, device=device, dtype=dtype) - (_SSIM_WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * _SSIM_SIGMA**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, _SSIM_WINDOW, _SSIM_WINDOW).contiguous()


def ssim(prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM (Gaussian window 11, sigma 1.5, reflect padding) of ``(B, C, H, W)`` images; scalar."""
    _check_pair(prediction, target)
    channels = prediction.shape[1]
    window = _gaussian_window(channels, prediction.device, prediction.dtype)
    pad = _SSIM_WINDOW // 2
    mode = "reflect" if min(prediction.shape[-2:]) > pad else "replicate"

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (pad, pad, pad, pad), mode=mode), window, groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(prediction), blur(target)
    var_x = blur(prediction * prediction) - mu_x**2
    var_y = blur(target * target) - mu_y**2
    cov = blur(prediction * target) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean()


def multiscale_ssim(
    prediction: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, scales: int = 3
) -> torch.Tensor:
    """Weighted mean of :func:`ssim` over ``scales`` dyadic scales (2×2 average pooling between them).

    Scales whose image would be smaller than 8 pixels are skipped. Returns a scalar (1 = identical).
    """
    weights = list(_SSIM_SCALE_WEIGHTS[:scales]) if scales <= len(_SSIM_SCALE_WEIGHTS) else [1.0] * scales
    values, used = [], []
    for i, weight in enumerate(weights):
        if i and min(prediction.shape[-2:]) < 16:
            break
        if i:
            prediction, target = F.avg_pool2d(prediction, 2), F.avg_pool2d(target, 2)
        values.append(ssim(prediction, target, data_range))
        used.append(weight)
    total = sum(used)
    return sum(w / total * v for w, v in zip(used, values))


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude (intensity per pixel) of ``(B, C, H, W)`` images, same shape."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device, dtype=x.dtype) / 8
    kernels = torch.stack([kx, kx.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernels, groups=x.shape[1])
    gx, gy = g[:, 0::2], g[:, 1::2]
    # The epsilon keeps the square root differentiable on flat regions.
    return torch.sqrt(gx**2 + gy**2 + 1e-12)


def perceptual_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    ssim_weight: float = 1.0,
    gradient_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weight-free perceptual substitute: ``ssim_weight * (1 - MS-SSIM) + gradient_weight * L1(|∇p|, |∇t|)``.

    Computed in float32 even under autocast: SSIM's variances are differences of squares, which bf16's 8-bit
    mantissa cancels into noise (a LangAE trained under bf16 autocast diverged after ~400 steps with them).

    Returns ``(loss, {"ssim": 1 - MS-SSIM, "gradient": gradient L1})`` with scalar tensors.
    """
    _check_pair(prediction, target)
    with torch.autocast(prediction.device.type, enabled=False):
        prediction, target = prediction.float(), target.float()
        ssim_term = 1.0 - multiscale_ssim(prediction, target)
        gradient_term = F.l1_loss(gradient_magnitude(prediction), gradient_magnitude(target))
    return ssim_weight * ssim_term + gradient_weight * gradient_term, {"ssim": ssim_term, "gradient": gradient_term}


def stage1_loss(
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    quantizer_output: QuantizerOutput,
    *,
    l1_weight: float = 1.0,
    perceptual_weight: float = 1.0,
    commitment_weight: float = 1.0,
    semantic_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """LangAE loss: ``l1 * L1 + perceptual * P + commitment * C + semantic * S``.

    ``C`` and ``S`` come from ``quantizer_output`` (``C`` already includes the quantizer's beta).

    Returns ``(total, parts)`` where ``parts`` holds detached scalars ``l1, perceptual, ssim, gradient,
    commitment, semantic, total``.
    """
    _check_pair(reconstruction, target)
    l1 = F.l1_loss(reconstruction, target)
    perceptual, perceptual_parts = perceptual_loss(reconstruction, target)
    commitment = quantizer_output.commitment_loss
    semantic = quantizer_output.semantic_loss
    total = (
        l1_weight * l1 + perceptual_weight * perceptual + commitment_weight * commitment + semantic_weight * semantic
    )
    parts = {
        "l1": l1,
        "perceptual": perceptual,
        **perceptual_parts,
        "commitment": commitment,
        "semantic": semantic,
        "total": total,
    }
    return total, {k: v.detach() for k, v in parts.items()}


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode with parameters excluded from autograd, restoring both afterwards.

    The graph recorded inside treats the parameters as constants, so a later ``backward()`` leaves
    their ``.grad`` untouched even after ``requires_grad`` is restored.
    """
    was_training = module.training
    trainable = [p for p in module.parameters() if p.requires_grad]
    module.eval()
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in trainable:
            p.requires_grad_(True)
        module.train(was_training)


def langda_loss(
    langae: nn.Module,
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    semantic_weight: float = 1.0,
    perceptual_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Language-guided domain alignment (LangDA) between a denoised slice and its normal-dose target.

    ``semantic = MSE(Q(E(prediction)), Q(E(target)))`` on the LangAE's quantized (word) latents and
    ``perceptual = MSE(E(prediction), E(target))`` on its continuous latents. The LangAE is frozen
    (eval mode, no parameter gradients) and the target side runs under ``no_grad``; gradients reach
    ``prediction`` (through the quantizer's straight-through estimator for the semantic part).

    Args:
        langae: a :class:`~langmamba.models.langae.LangAE` (or anything with ``encode``/``quantize``).
        prediction, target: ``(B, 1, H, W)`` in model range, H and W multiples of 16.

    Returns:
        ``(semantic_weight * semantic + perceptual_weight * perceptual, {"semantic", "perceptual",
        "total"})`` with detached parts.
    """
    _check_pair(prediction, target)
    with frozen(langae):
        with torch.no_grad():
            target_latent = langae.encode(target)
            target_words = langae.quantize(target_latent).quantized
        latent = langae.encode(prediction)
        words = langae.quantize(latent).quantized
    semantic = F.mse_loss(words, target_words)
    perceptual = F.mse_loss(latent, target_latent)
    total = semantic_weight * semantic + perceptual_weight * perceptual
    return total, {"semantic": semantic.detach(), "perceptual": perceptual.detach(), "total": total.detach()}


def denoising_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    langae: nn.Module,
    langda_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stage-2 loss: ``MSE(prediction, target) + langda_weight * LangDA`` (LangDA skipped at weight 0).

    Returns ``(total, {"mse", "langda", "langda_semantic", "langda_perceptual", "total"})`` with detached parts.
    """
    _check_pair(prediction, target)
    mse = F.mse_loss(prediction, target)
    parts = {"mse": mse.detach()}
    total = mse
    if langda_weight:
        langda, langda_parts = langda_loss(langae, prediction, target)
        total = total + langda_weight * langda
        parts.update(
            langda=langda.detach(),
            langda_semantic=langda_parts["semantic"],
            langda_perceptual=langda_parts["perceptual"],
        )
    else:
        zero = mse.detach().new_zeros(())
        parts.update(langda=zero, langda_semantic=zero, langda_perceptual=zero)
    parts["total"] = total.detach()
    return total, parts
