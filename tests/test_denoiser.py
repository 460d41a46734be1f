"""SS2D (strided cross-scan) and LangMamba's denoiser wrapped around a frozen LangAE."""

from __future__ import annotations

import json

import pytest
import torch

from langmamba.checkpoint import load_checkpoint, save_checkpoint
from langmamba.errors import ConfigError, InputError
from langmamba.models.config import DECODER_PRESETS, DecoderConfig, LangMambaConfig
from langmamba.models.denoiser import DenoiserDecoder, LangMamba
from langmamba.models.langae import LangAE
from langmamba.models.registry import MODEL_REGISTRY
from langmamba.models.ss2d import SS2D, cross_merge, cross_scan

VOCAB, DIM = 16, 8


def small_langae_config(**overrides) -> dict:
    """Paper topology (5 levels) at narrow widths, empty codebook of VOCAB × DIM."""
    config = dict(base_channels=8, z_channels=8, resolution=64, codebook_size=VOCAB, codebook_dim=DIM)
    config.update(overrides)
    return config


def small_langmamba(seed: int = 0, **overrides) -> LangMamba:
    torch.manual_seed(seed)
    kwargs = dict(widths=(4, 8, 8, 16, 16), depths=(1, 1, 1, 1, 1), d_state=4)
    kwargs.update(overrides)
    model = LangMamba(small_langae_config(), **kwargs)
    with torch.no_grad():
        model.langae.codebook.copy_(torch.randn(VOCAB, DIM))
    return model


# --- strided cross-scan ---------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(4, 6), (8, 8), (2, 10)])
def test_strided_cross_scan_and_merge_are_inverse(height, width):
    x = torch.randn(2, 3, height, width)
    seqs = cross_scan(x, step=2)
    assert seqs.shape == (2, 4, 3, height * width // 4)
    assert torch.equal(cross_merge(seqs, height, width, step=2), x)
    # Every pixel is scanned exactly once over the 4 sequences.
    ids = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width)
    assert torch.equal(cross_scan(ids, step=2).flatten().sort().values, ids.flatten())
    # And merge followed by scan is the identity on sequences too.
    assert torch.equal(cross_scan(cross_merge(seqs, height, width, step=2), step=2), seqs)


def test_strided_cross_scan_directions_and_subgrids():
    ids = torch.arange(16).view(1, 1, 4, 4)
    seqs = cross_scan(ids, step=2)[0, :, 0].tolist()
    assert seqs[0] == [0, 2, 8, 10]  # sub-grid (0, 0), row-major
    assert seqs[1] == [4, 12, 6, 14]  # sub-grid (1, 0), column-major
    assert seqs[2] == [11, 9, 3, 1]  # sub-grid (0, 1), row-major reversed
    assert seqs[3] == [15, 7, 13, 5]  # sub-grid (1, 1), column-major reversed


def test_full_cross_scan_merge_sums_four_directions():
    x = torch.randn(1, 2, 3, 5)
    seqs = cross_scan(x, step=1)
    assert seqs.shape == (1, 4, 2, 15)
    torch.testing.assert_close(cross_merge(seqs, 3, 5, step=1), 4 * x)


def test_cross_scan_rejects_odd_sizes_and_bad_step():
    with pytest.raises(InputError, match="even H and W"):
        cross_scan(torch.zeros(1, 1, 3, 4), step=2)
    with pytest.raises(ConfigError, match="step 1 or 2"):
        cross_scan(torch.zeros(1, 1, 4, 4), step=3)


# --- SS2D -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(8, 12), (7, 9)])
@pytest.mark.parametrize("step", [1, 2])
def test_ss2d_shapes_and_backward(height, width, step):
    torch.manual_seed(0)
    block = SS2D(d_model=8, d_state=4, expand=1.5, step=step)
    x = torch.randn(2, 8, height, width, requires_grad=True)
    y = block(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in block.parameters())


def test_ss2d_backends_agree():
    torch.manual_seed(1)
    block = SS2D(d_model=6, d_state=4, scan_backend="reference")
    x = torch.randn(1, 6, 6, 10)
    with torch.no_grad():
        expected = block(x)
        block.scan_backend = "chunked"
        torch.testing.assert_close(block(x), expected, rtol=1e-4, atol=1e-5)


def test_ss2d_mixes_information_along_its_scan_directions():
    # A change at one pixel of sub-grid (0, 0) reaches the later pixels of its row-major scan.
    torch.manual_seed(2)
    block = SS2D(d_model=4, d_state=4, d_conv=1).eval()
    x = torch.randn(1, 4, 8, 8)
    x2 = x.clone()
    x2[..., 0, 0] += 5.0
    with torch.no_grad():
        diff = (block(x2) - block(x)).abs().sum(1)[0]
    assert diff[0, 0] > 0 and diff[6, 6] > 0  # last pixel of sub-grid (0, 0)
    assert diff[1, 1] == 0  # sub-grid (1, 1) never sees sub-grid (0, 0)


# --- LangMamba -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_paper_size_langmamba_shapes_at_512():
    torch.manual_seed(0)
    model = LangMamba(LangAE(codebook_size=VOCAB, codebook_dim=384).get_config(), global_residual=False).eval()
    assert model.langae.feature_channels == (64, 64, 128, 128, 256)
    with torch.no_grad():
        out = model(torch.rand(1, 1, 512, 512))
    assert out.shape == (1, 1, 512, 512) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "height,width", [pytest.param(384, 448, marks=pytest.mark.slow), (100, 130), (16, 16), (8, 20)]
)
def test_langmamba_any_slice_size(height, width):
    model = small_langmamba(global_residual=False).eval()
    x = torch.rand(2, 1, height, width)
    with torch.no_grad():
        out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_global_residual_starts_as_identity():
    model = small_langmamba(global_residual=True).eval()
    x = torch.rand(1, 1, 40, 48)
    with torch.no_grad():
        assert torch.equal(model(x), x)


@pytest.mark.slow
def test_only_decoder_gets_gradients_and_langae_stays_frozen():
    model = small_langmamba(global_residual=False)
    model.train()
    assert not model.langae.training and model.decoder.training
    assert not any(p.requires_grad for p in model.langae.parameters())
    before = {k: v.clone() for k, v in model.langae.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = torch.rand(2, 1, 32, 48)
    loss = (model(x) - x).square().mean()
    loss.backward()
    assert all(p.grad is None for p in model.langae.parameters())
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    optimizer.step()
    assert all(torch.equal(v, before[k]) for k, v in model.langae.state_dict().items())
    model.train(True)
    assert not model.langae.training


def test_decoder_rejects_wrong_features():
    decoder = DenoiserDecoder((8, 8, 16, 16, 32), widths=(4, 4, 8, 8, 8), depths=(0, 0, 1, 0, 1))
    with pytest.raises(InputError, match="5 feature maps"):
        decoder(torch.zeros(1, 1, 16, 16), [torch.zeros(1, 8, 16, 16)])
    with pytest.raises(ConfigError, match="widths must have 5"):
        DenoiserDecoder(widths=(4, 4))
    with pytest.raises(InputError, match="slices"):
        small_langmamba()(torch.zeros(1, 3, 16, 16))


def test_langmamba_checkpoint_round_trip(tmp_path):
    assert MODEL_REGISTRY["LangMamba"] is LangMamba
    model = small_langmamba(global_residual=False).eval()
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert isinstance(loaded, LangMamba) and not loaded.langae.training
    assert not any(p.requires_grad for p in loaded.langae.parameters())
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_from_langae_copies_weights_and_vocabulary():
    torch.manual_seed(3)
    langae = LangAE(**small_langae_config())
    langae.vocabulary = [f"w{i}" for i in range(VOCAB)]
    model = LangMamba.from_langae(langae, widths=(4, 8, 8, 16, 16), depths=(1, 1, 1, 1, 1), d_state=4)
    assert model.langae.vocabulary == langae.vocabulary
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.langae.encode_features(x), langae.eval().encode_features(x)):
            assert torch.equal(a, b)


def test_inference_copy_drops_the_langae_image_decoder(tmp_path):
    model = small_langmamba(global_residual=False).eval()
    slim = model.without_langae_decoder()
    assert slim.langae.decoder is None and not any(k.startswith("langae.decoder.") for k in slim.state_dict())
    assert not slim.langae.training and not any(p.requires_grad for p in slim.langae.parameters())
    x = torch.rand(1, 1, 48, 32)
    with torch.no_grad():
        assert torch.equal(slim(x), model(x))
    save_checkpoint(slim, tmp_path)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path)(x), model(x))


def test_from_langae_without_image_decoder():
    torch.manual_seed(4)
    langae = LangAE(**small_langae_config()).eval()
    model = LangMamba.from_langae(langae, widths=(4, 8, 8, 16, 16), depths=(1, 1, 1, 1, 1), langae_decoder=False)
    assert model.langae.decoder is None
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.langae.encode_features(x)[-1], langae.encode_features(x)[-1])


def test_decoder_presets_build_and_the_paper_one_scans_at_every_level():
    assert {"fast", "medium", "paper"} <= set(DECODER_PRESETS)
    paper = DenoiserDecoder(config=DecoderConfig.preset("paper"))
    assert all(any(isinstance(m, SS2D) for m in level.modules()) for level in paper.levels)
    assert min(DECODER_PRESETS["paper"].widths) == 64 and max(DECODER_PRESETS["paper"].widths) == 128
    fast = DenoiserDecoder(config=DECODER_PRESETS["fast"])
    assert not any(isinstance(m, SS2D) for m in fast.levels[0].modules())


def test_checkpoint_stores_the_config_dataclass_and_the_first_flat_form_still_loads(tmp_path):
    model = small_langmamba(depths=(0, 1, 1, 1, 1)).eval()
    save_checkpoint(model, tmp_path / "new")
    stored = json.loads((tmp_path / "new" / "config.json").read_text())["model_config"]
    assert stored == model.config.to_dict() and set(stored) == {"langae_config", "decoder", "langae_decoder"}
    assert LangMambaConfig.from_dict(stored) == model.config and stored["decoder"]["depths"] == [0, 1, 1, 1, 1]
    # The first checkpoints kept the decoder's fields beside langae_config; the same weights load from it.
    flat = {"langae_config": stored["langae_config"], **stored["decoder"], "langae_decoder": True}
    (tmp_path / "new" / "config.json").write_text(
        json.dumps(json.loads((tmp_path / "new" / "config.json").read_text()) | {"model_config": flat})
    )
    old = load_checkpoint(tmp_path / "new")
    assert old.config == model.config
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(old(x), model(x))


def test_config_rejects_unknown_and_malformed_fields():
    with pytest.raises(ConfigError, match="unknown key.*widht"):
        DecoderConfig.from_dict({"widht": [1, 2, 3, 4, 5]})
    with pytest.raises(ConfigError, match="depths must have 5"):
        DecoderConfig(depths=(1, 1))
    with pytest.raises(ConfigError, match="unknown decoder preset 'huge'"):
        DecoderConfig.preset("huge")
    assert DecoderConfig.preset("paper").replace(d_state=4).d_state == 4 and DECODER_PRESETS["paper"].d_state == 16
