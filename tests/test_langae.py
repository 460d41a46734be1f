"""LangAE, its pyramid language quantizer, the losses and the HU normalisation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from langmamba.errors import InputError
from langmamba.losses import (
    denoising_loss,
    gradient_magnitude,
    langda_loss,
    multiscale_ssim,
    perceptual_loss,
    stage1_loss,
)
from langmamba.models import LangAE, PyramidLanguageQuantizer, word_scores
from langmamba.models.quantizer import cell_index, expand_from_grid, pool_to_grid
from langmamba.normalization import HU_MAX, HU_MIN, hu_to_model, model_to_hu

VOCAB, DIM = 50, 12


def small_langae(seed: int = 0, **overrides) -> LangAE:
    """Paper topology (5 levels, 4 downsamplings) at narrow widths; resolution 128 puts attention on level 3."""
    torch.manual_seed(seed)
    kwargs = dict(
        base_channels=8,
        z_channels=16,
        resolution=128,
        codebook=torch.randn(VOCAB, DIM),
        vocabulary=[f"word{i}" for i in range(VOCAB)],
    )
    kwargs.update(overrides)
    return LangAE(**kwargs)


@pytest.fixture(scope="module")
def model() -> LangAE:
    return small_langae()


@pytest.mark.slow
def test_paper_config_shapes_at_512():
    torch.manual_seed(0)
    paper = LangAE(codebook=torch.randn(64, 384)).eval()
    assert paper.feature_channels == (64, 64, 128, 128, 256)
    x = torch.rand(1, 1, 512, 512)
    with torch.inference_mode():
        features = paper.encode_features(x)
        reconstruction, out = paper(x)
    assert [tuple(f.shape) for f in features] == [
        (1, 64, 512, 512),
        (1, 64, 256, 256),
        (1, 128, 128, 128),
        (1, 128, 64, 64),
        (1, 256, 32, 32),
    ]
    assert reconstruction.shape == (1, 1, 512, 512)
    assert out.quantized.shape == out.continuous.shape == (1, 384, 32, 32)
    assert out.grids == [(2, 2), (8, 8), (32, 32)]
    assert [tuple(t.shape) for t in out.token_ids] == [(1, 2, 2), (1, 8, 8), (1, 32, 32)]
    assert [tuple(r.shape) for r in out.region_latents] == [(1, 2, 2, 384), (1, 8, 8, 384), (1, 32, 32, 384)]
    assert torch.isfinite(reconstruction).all()


@pytest.mark.slow
def test_odd_multiple_of_16_and_token_range(model):
    x = torch.rand(2, 1, 384, 448)
    with torch.no_grad():
        features = model.encode_features(x[:1])
        reconstruction, out = model(x)
    z = out.continuous
    assert [tuple(f.shape[-2:]) for f in features] == [(384, 448), (192, 224), (96, 112), (48, 56), (24, 28)]
    assert [f.shape[1] for f in features] == list(model.feature_channels) == [8, 8, 16, 16, 32]
    assert z.shape == (2, DIM, 24, 28)
    assert reconstruction.shape == x.shape
    assert out.grids == [(2, 2), (8, 8), (24, 28)]
    for ids, grid in zip(out.token_ids, out.grids):
        assert ids.dtype == torch.long and ids.shape == (2, *grid)
        assert int(ids.min()) >= 0 and int(ids.max()) < VOCAB


@pytest.mark.parametrize("shape", [(1, 1, 200, 256), (1, 1, 256, 250), (1, 2, 256, 256), (1, 256, 256)])
def test_bad_input_shapes_raise(model, shape):
    with pytest.raises(InputError, match="multiples of 16|expects slices"):
        model.encode(torch.rand(*shape))


def test_small_patches_clamp_the_pyramid(model):
    with torch.no_grad():
        reconstruction, out = model(torch.rand(1, 1, 64, 112))
    assert reconstruction.shape == (1, 1, 64, 112)
    assert out.grids == [(2, 2), (4, 7), (4, 7)]
    assert [tuple(t.shape) for t in out.token_ids] == [(1, 2, 2), (1, 4, 7), (1, 4, 7)]


@pytest.mark.slow
def test_uneven_cells_partition_the_latent():
    idx = cell_index(28, 8)
    sizes = torch.bincount(idx, minlength=8)
    assert sizes.sum() == 28 and set(sizes.tolist()) == {3, 4}
    assert torch.all(idx[1:] >= idx[:-1])  # contiguous cells
    x = torch.randn(1, 3, 24, 28)
    pooled = pool_to_grid(x, (8, 8))
    rows, cols = cell_index(24, 8), cell_index(28, 8)
    manual = x[0][:, rows == 5][:, :, cols == 6].mean(dim=(1, 2))
    torch.testing.assert_close(pooled[0, :, 5, 6], manual)
    assert expand_from_grid(pooled, (24, 28)).shape == x.shape


def test_streaming_average_definition():
    torch.manual_seed(1)
    quantizer = PyramidLanguageQuantizer(torch.randn(30, 4))
    z = torch.randn(2, 4, 12, 10)
    out = quantizer(z)
    words = [quantizer.codebook[ids].permute(0, 3, 1, 2) for ids in out.token_ids]
    expanded = [expand_from_grid(w, (12, 10)) for w in words]
    torch.testing.assert_close(out.quantized, sum(expanded) / 3)
    # Level 2 looks up 2z - up(e_1), pooled on its 8×8 grid.
    target = pool_to_grid(2 * z - expanded[0], (8, 8)).permute(0, 2, 3, 1)
    torch.testing.assert_close(out.region_latents[1], target)
    assert out.commitment_loss > 0
    # Each level's token is the nearest codebook row to its region latent (= top-1 word score).
    for ids, region in zip(out.token_ids, out.region_latents):
        top_ids, top_probs = word_scores(region, quantizer.codebook, k=3)
        assert top_ids.shape == (*ids.shape, 3) and torch.equal(top_ids[..., 0], ids)
        assert torch.all(top_probs[..., :-1] >= top_probs[..., 1:]) and torch.all(top_probs.sum(-1) <= 1 + 1e-6)


def test_latent_on_a_word_is_reproduced_exactly():
    codebook = torch.randn(10, 6)
    quantizer = PyramidLanguageQuantizer(codebook)
    z = codebook[7].reshape(1, 6, 1, 1).expand(1, 6, 9, 11).clone()
    out = quantizer(z)
    assert all(torch.all(ids == 7) for ids in out.token_ids)
    torch.testing.assert_close(out.quantized, z)
    assert float(out.commitment_loss) == pytest.approx(0.0, abs=1e-10)


def test_latents_are_scaled_to_the_codebook_norm(model):
    x = torch.rand(2, 1, 128, 128)
    with torch.no_grad():
        norms = model.encode(x).norm(dim=1)
        raw = small_langae(normalize_latent=False).encode(x)
    torch.testing.assert_close(norms, torch.full_like(norms, float(model.codebook.norm(dim=1).mean())))
    assert raw.shape == (2, DIM, 8, 8) and not torch.allclose(raw.norm(dim=1), norms)


@pytest.mark.slow
def test_straight_through_reaches_encoder_but_not_codebook(model):
    model.zero_grad(set_to_none=True)
    x = torch.rand(1, 1, 128, 128)
    reconstruction, out = model(x)
    (reconstruction - x).abs().mean().backward()
    conv_in = model.encoder.conv_in.weight.grad
    assert conv_in is not None and conv_in.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0
    assert not model.codebook.requires_grad and model.codebook.grad is None
    assert "quantizer.codebook" in model.state_dict()
    assert all(p is not model.codebook for p in model.parameters())
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_semantic_loss_pulls_toward_candidates():
    torch.manual_seed(2)
    codebook = torch.randn(20, 6)
    quantizer = PyramidLanguageQuantizer(codebook)
    z = torch.randn(1, 6, 8, 8)
    candidates = [[torch.tensor([3])]] * 3
    assert float(quantizer(z).semantic_loss) == 0.0
    word = codebook[3].reshape(1, 6, 1, 1)
    losses = [float(quantizer(z + a * (word - z), candidates).semantic_loss) for a in (0.0, 0.5, 1.0)]
    assert losses[0] > losses[1] > losses[2] > 0
    # Gradient descent on the latent lowers it too, and the loss has a gradient.
    z_var = z.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([z_var], lr=0.05)
    first = None
    for _ in range(10):
        loss = quantizer(z_var, candidates).semantic_loss
        first = float(loss.detach()) if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(quantizer(z_var.detach(), candidates).semantic_loss) < first


def test_semantic_candidates_masks_lists_and_empty_images():
    torch.manual_seed(3)
    quantizer = PyramidLanguageQuantizer(torch.randn(15, 5))
    z = torch.randn(2, 5, 8, 8)
    ids = [torch.tensor([1, 4]), torch.tensor([], dtype=torch.long)]
    mask = torch.zeros(2, 15, dtype=torch.bool)
    mask[0, [1, 4]] = True
    from_lists = quantizer(z, [ids, ids, ids]).semantic_loss
    from_masks = quantizer(z, [mask, mask, mask]).semantic_loss
    torch.testing.assert_close(from_lists, from_masks)
    # The image without candidates contributes nothing.
    alone = quantizer(z[:1], [ids[:1]] * 3).semantic_loss
    torch.testing.assert_close(from_lists, alone)
    # A level without candidates is skipped; none at all gives exactly 0.
    assert float(quantizer(z, [None, None, [ids[1], ids[1]]]).semantic_loss) == 0.0
    with pytest.raises(InputError, match="outside the vocabulary"):
        quantizer(z, [[torch.tensor([15]), ids[1]], None, None])
    with pytest.raises(InputError, match="one entry per level"):
        quantizer(z, [mask])


def test_codebook_validation():
    with pytest.raises(InputError, match="codebook"):
        PyramidLanguageQuantizer(torch.randn(5))
    with pytest.raises(InputError, match="NaN"):
        PyramidLanguageQuantizer(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(InputError, match="vocabulary has 3 words"):
        LangAE(base_channels=8, z_channels=8, codebook=torch.randn(4, 4), vocabulary=["a", "b", "c"])


@pytest.mark.slow
def test_stage1_loss_sums_its_weighted_parts(model):
    torch.manual_seed(4)
    x = torch.rand(2, 1, 128, 128)
    candidates = [[torch.tensor([0, 1]), torch.tensor([2])]] * 3
    reconstruction, out = model(x, candidates)
    total, parts = stage1_loss(reconstruction, x, out)
    assert parts["semantic"] > 0 and parts["commitment"] > 0 and parts["l1"] > 0 and parts["perceptual"] > 0
    expected = parts["l1"] + parts["perceptual"] + parts["commitment"] + parts["semantic"]
    torch.testing.assert_close(total.detach(), expected)
    weighted, _ = stage1_loss(reconstruction, x, out, l1_weight=2.0, semantic_weight=0.5)
    torch.testing.assert_close(weighted.detach(), expected + parts["l1"] - 0.5 * parts["semantic"])
    assert "adversarial" not in parts
    model.zero_grad(set_to_none=True)
    total.backward()
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_perceptual_substitute():
    torch.manual_seed(5)
    x = torch.rand(1, 1, 64, 64)
    same, parts = perceptual_loss(x, x.clone())
    assert float(same) == pytest.approx(0.0, abs=1e-5)
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    loss, parts = perceptual_loss(blurred, x)
    assert parts["ssim"] > 0.05 and parts["gradient"] > 0.01
    assert float(multiscale_ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    ramp = torch.arange(16.0).repeat(16, 1).reshape(1, 1, 16, 16)
    # A ramp of slope 1 per column has gradient magnitude 1 away from the border.
    torch.testing.assert_close(gradient_magnitude(ramp)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))


def test_langda_zero_for_identical_and_gradients_only_to_prediction():
    langae = small_langae(seed=6)
    target = torch.rand(1, 1, 128, 128)
    same, _ = langda_loss(langae, target.clone(), target)
    assert float(same) == 0.0
    prediction = (target + 0.1 * torch.randn_like(target)).requires_grad_(True)
    loss, parts = langda_loss(langae, prediction, target)
    assert loss > 0 and parts["perceptual"] > 0
    loss.backward()
    assert prediction.grad is not None and prediction.grad.abs().sum() > 0
    assert all(p.grad is None for p in langae.parameters())
    assert all(p.requires_grad for p in langae.parameters()) and langae.training


def test_denoising_loss_combines_mse_and_langda():
    langae = small_langae(seed=7)
    target = torch.rand(1, 1, 128, 128)
    prediction = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    total, parts = denoising_loss(prediction, target, langae, langda_weight=0.5)
    torch.testing.assert_close(total.detach(), parts["mse"] + 0.5 * parts["langda"])
    total.backward()
    assert prediction.grad.abs().sum() > 0
    only_mse, parts0 = denoising_loss(prediction, target, langae, langda_weight=0.0)
    torch.testing.assert_close(only_mse, torch.nn.functional.mse_loss(prediction, target))
    assert float(parts0["langda"]) == 0.0


def test_normalization_numpy_and_torch():
    hu = np.array([-2000, -1000, 500, 2000, 3000], dtype=np.int16)
    scaled = hu_to_model(hu)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(model_to_hu(scaled), [HU_MIN, HU_MIN, 500.0, HU_MAX, HU_MAX])
    t = torch.tensor([-1000.0, 0.0, 2000.0], dtype=torch.float64)
    back = model_to_hu(hu_to_model(t))
    assert back.dtype == torch.float64
    torch.testing.assert_close(back, t)
    assert float(model_to_hu(torch.tensor(1.2), clip=False)) == pytest.approx(2600.0)
    assert float(hu_to_model(torch.tensor(2600.0), clip=False)) == pytest.approx(1.2)
