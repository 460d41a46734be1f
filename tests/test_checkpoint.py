"""Checkpoint save/load: bit-exact round trips (single file and sharded), registry, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import langmamba
from langmamba.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    WEIGHTS_NAME,
    load_checkpoint,
    read_checkpoint_config,
    save_checkpoint,
)
from langmamba.errors import CheckpointError, ConfigError
from langmamba.models import LangAE
from langmamba.models.registry import register_model
from langmamba.normalization import normalization_config

VOCAB, DIM = 40, 16
ROOT = Path(__file__).resolve().parents[1]


def make_langae(seed: int = 0, vocab: int = VOCAB, **overrides) -> LangAE:
    torch.manual_seed(seed)
    kwargs = dict(
        base_channels=8,
        z_channels=16,
        resolution=128,
        codebook=torch.randn(vocab, DIM),
        vocabulary=[f"w{i}" for i in range(vocab)],
        vlm_backend="offline",
        vlm_id="all-MiniLM-L6-v2",
    )
    kwargs.update(overrides)
    model = LangAE(**kwargs)
    # Non-default values everywhere, so a load that silently kept the fresh init would be caught.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def assert_bit_exact(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@register_model(name="TinyTestNet")
class TinyNet(nn.Module):
    """A minimal registered model, as the SEED author registers LangMamba."""

    def __init__(self, width: int = 4, tag: str = "x") -> None:
        super().__init__()
        self.width, self.tag = width, tag
        self.linear = nn.Linear(width, width)
        self.register_buffer("table", torch.arange(width * 3, dtype=torch.float32).reshape(3, width))

    def get_config(self) -> dict:
        return {"width": self.width, "tag": self.tag}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


@pytest.mark.slow
def test_round_trip_is_bit_exact_with_metadata(tmp_path):
    model = make_langae()
    save_checkpoint(model, tmp_path / "ckpt", extra={"step": 1200, "val_psnr": 31.5})
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    config = read_checkpoint_config(tmp_path / "ckpt")
    assert config["model_class"] == "LangAE"
    assert config["model_config"] == model.get_config()
    assert config["model_config"]["channel_multipliers"] == [1, 1, 2, 2, 4]
    assert config["normalization"] == normalization_config()
    assert config["langmamba_version"] == langmamba.__version__
    assert config["vocabulary"] == model.vocabulary and config["vlm_backend"] == "offline"
    assert config["vlm_id"] == "all-MiniLM-L6-v2"
    assert config["extra"] == {"step": 1200, "val_psnr": 31.5}

    loaded = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, LangAE) and not loaded.training
    assert_bit_exact(model, loaded)
    assert torch.equal(loaded.codebook, model.codebook)
    assert loaded.vocabulary == model.vocabulary and loaded.vlm_id == "all-MiniLM-L6-v2"
    assert loaded.checkpoint_config["extra"]["step"] == 1200
    x = torch.rand(1, 1, 128, 128)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)[0], loaded(x)[0])
        assert all(torch.equal(a, b) for a, b in zip(model.encode_features(x), loaded.encode_features(x)))
    # The package-level shortcut loads the same thing.
    assert_bit_exact(model, langmamba.load(tmp_path / "ckpt"))


def test_sharded_round_trip_keeps_every_file_under_the_limit(tmp_path):
    # A 3000×16 float32 codebook (188 KiB) is larger than a 0.125 MiB shard, so it is split as well.
    model = make_langae(vocab=3000)
    limit_mb = 0.125
    save_checkpoint(model, tmp_path, max_shard_mb=limit_mb)
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / WEIGHTS_NAME).exists()
    assert all(path.stat().st_size <= limit_mb * 1024 * 1024 for path in shards)
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert "quantizer.codebook" in index["split_tensors"]
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    loaded = load_checkpoint(tmp_path)
    assert_bit_exact(model, loaded)

    # Saving unsharded into the same folder removes the old shards and index.
    save_checkpoint(model, tmp_path)
    assert not list(tmp_path.glob("model-*")) and not (tmp_path / INDEX_NAME).exists()
    assert_bit_exact(model, load_checkpoint(tmp_path))


def test_small_model_with_shard_limit_stays_single_file(tmp_path):
    save_checkpoint(TinyNet(), tmp_path, max_shard_mb=16)
    assert (tmp_path / WEIGHTS_NAME).is_file() and not (tmp_path / INDEX_NAME).exists()


def test_half_precision_and_custom_registered_model(tmp_path):
    model = make_langae().half()
    save_checkpoint(model, tmp_path / "half")
    loaded = load_checkpoint(tmp_path / "half")
    assert loaded.quant_conv.weight.dtype == torch.float16
    assert_bit_exact(model, loaded)

    tiny = TinyNet(width=6, tag="seed")
    save_checkpoint(tiny, tmp_path / "tiny")
    again = load_checkpoint(tmp_path / "tiny", expected={"model_class": "TinyTestNet", "width": 6})
    assert isinstance(again, TinyNet) and again.tag == "seed"
    assert_bit_exact(tiny, again)


def test_registry_rejects_conflicts_and_unregistered_models(tmp_path):
    with pytest.raises(ConfigError, match="already registered"):

        @register_model(name="LangAE")
        class Impostor(nn.Module):
            pass

    with pytest.raises(CheckpointError, match="not a registered model class"):
        save_checkpoint(nn.Linear(2, 2), tmp_path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_checkpoint(tmp_path)
    model = make_langae()
    save_checkpoint(model, tmp_path / "a")
    (tmp_path / "a" / WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match="weights are missing"):
        load_checkpoint(tmp_path / "a")
    save_checkpoint(make_langae(vocab=3000), tmp_path / "b", max_shard_mb=0.125)
    victim = sorted((tmp_path / "b").glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        load_checkpoint(tmp_path / "b")


def test_corrupt_files_raise(tmp_path):
    save_checkpoint(make_langae(), tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read as JSON"):
        load_checkpoint(tmp_path)


def _edit_config(directory, edit) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_shape_mismatch_names_the_key_and_shapes(tmp_path):
    save_checkpoint(make_langae(), tmp_path)
    _edit_config(tmp_path, lambda c: c["model_config"].update(base_channels=16))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path)
    message = str(info.value)
    assert "'encoder.conv_in.weight' has shape (8, 1, 3, 3) in the checkpoint but (16, 1, 3, 3)" in message

    _edit_config(tmp_path, lambda c: c["model_config"].update(base_channels=8, num_res_blocks=2))
    with pytest.raises(CheckpointError, match=r"missing in the checkpoint: encoder\.levels\.0\.blocks\.1"):
        load_checkpoint(tmp_path)


def test_expected_and_config_errors(tmp_path):
    save_checkpoint(make_langae(), tmp_path, extra={"stage": 1})
    loaded = load_checkpoint(tmp_path, expected={"model_class": "LangAE", "codebook_size": VOCAB, "stage": 1})
    assert isinstance(loaded, LangAE)
    with pytest.raises(CheckpointError, match="'codebook_size' is 40 in the checkpoint but 512 was expected"):
        load_checkpoint(tmp_path, expected={"codebook_size": 512})
    with pytest.raises(CheckpointError, match="'model_class' is 'LangAE' in the checkpoint but 'LangMamba'"):
        load_checkpoint(tmp_path, expected={"model_class": "LangMamba"})
    with pytest.raises(CheckpointError, match="no entry 'nonsense'"):
        load_checkpoint(tmp_path, expected={"nonsense": 1})

    _edit_config(tmp_path, lambda c: c["model_config"].update(warp_factor=9))
    with pytest.raises(CheckpointError, match="cannot rebuild LangAE.*warp_factor"):
        load_checkpoint(tmp_path)
    _edit_config(tmp_path, lambda c: (c["model_config"].pop("warp_factor"), c.update(model_class="Nope")))
    with pytest.raises(CheckpointError, match="unknown model class 'Nope'.*LangAE"):
        load_checkpoint(tmp_path)
    _edit_config(tmp_path, lambda c: (c.update(model_class="LangAE"), c["normalization"].update(hu_max=3000.0)))
    with pytest.raises(CheckpointError, match="normalisation"):
        load_checkpoint(tmp_path)


def test_unserialisable_extra_raises(tmp_path):
    with pytest.raises(CheckpointError, match="extra cannot be written"):
        save_checkpoint(TinyNet(), tmp_path, extra={"tensor": torch.zeros(1)})


@register_model(name="WrapperTestNet")
class WrapperNet(nn.Module):
    """Wraps a LangAE without taking the vocabulary itself (as a SEED/LangMamba model may)."""

    def __init__(self, langae_config: dict) -> None:
        super().__init__()
        self.langae_config = dict(langae_config)
        self.langae = LangAE(**langae_config)
        self.head = nn.Conv2d(1, 1, 3, padding=1)

    def get_config(self) -> dict:
        return {"langae_config": self.langae_config}


def test_wrapped_langae_keeps_its_vocabulary(tmp_path):
    inner = make_langae()
    wrapper = WrapperNet(inner.get_config())
    wrapper.langae.load_state_dict(inner.state_dict())
    wrapper.langae.vocabulary, wrapper.langae.vlm_id = inner.vocabulary, inner.vlm_id
    save_checkpoint(wrapper, tmp_path)
    config = read_checkpoint_config(tmp_path)
    assert config["vocabulary"] == inner.vocabulary and config["vlm_id"] == inner.vlm_id
    loaded = load_checkpoint(tmp_path)
    assert loaded.langae.vocabulary == inner.vocabulary and loaded.langae.vlm_id == inner.vlm_id
    assert_bit_exact(wrapper, loaded)


SHIPPED = sorted(p.parent.name for p in (ROOT / "weights").glob("*/config.json"))


def test_every_shipped_weights_folder_is_covered():
    assert {"langae", "langmamba", "langmamba_no_langda", "redcnn"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_load_and_resave_in_the_config_dataclass_form(tmp_path, name):
    """The shipped config.json files hold the keys from before the config dataclasses (LangMamba's decoder
    fields flat beside ``langae_config``); they load, and a re-save writes ``config.to_dict()`` that loads
    to the same weights and outputs."""
    folder = ROOT / "weights" / name
    stored = read_checkpoint_config(folder)
    model = load_checkpoint(folder).float()
    assert type(model).__name__ == stored["model_class"]
    config = getattr(model, "config", None)
    if config is not None:
        assert type(config).from_dict(stored["model_config"]) == config
        assert model.get_config() == config.to_dict()
    save_checkpoint(model, tmp_path / name)
    again = load_checkpoint(tmp_path / name)
    assert read_checkpoint_config(tmp_path / name)["model_config"] == model.get_config()
    state = model.state_dict()
    assert all(torch.equal(tensor, state[key]) for key, tensor in again.state_dict().items())
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        if stored["model_class"] == "LangAE":
            assert torch.equal(again.encode(x), model.encode(x))
        else:
            assert torch.equal(again(x), model(x))


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_failed_save_leaves_the_earlier_checkpoint_and_no_temporary_files(tmp_path, monkeypatch):
    """An export interrupted while writing shards, or while moving the files into place, must leave the folder
    exactly as the earlier save wrote it: loadable, bit-exact, with no staging or backup files."""
    import safetensors.torch

    first = make_langae(seed=1, vocab=3000)
    save_checkpoint(first, tmp_path, extra={"step": 1}, max_shard_mb=0.125)
    (tmp_path / "notes.txt").write_text("not a checkpoint file")
    before = _listing(tmp_path)
    assert len([n for n in before if n.startswith("model-")]) > 3

    real_save_file = safetensors.torch.save_file
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        # the second shard (the first one is written) or the single weight file is left half-written
        if len(calls) == 2 or Path(filename).name == WEIGHTS_NAME:
            Path(filename).write_bytes(b"half a shard")
            raise OSError("disk full")
        real_save_file(tensors, filename, metadata=metadata)

    second = make_langae(seed=2, vocab=3000)
    monkeypatch.setattr(safetensors.torch, "save_file", failing_save_file)
    # the same shard names, other shard names (fewer, larger shards), and the single-file layout
    for limit in (0.125, 0.25, None):
        calls.clear()
        with pytest.raises(OSError, match="disk full"):
            save_checkpoint(second, tmp_path, extra={"step": 2}, max_shard_mb=limit)
        assert _listing(tmp_path) == before, limit
    monkeypatch.setattr(safetensors.torch, "save_file", real_save_file)

    # The publishing renames fail at config.json, after the weights reached the folder: rolled back.
    real_replace = os.replace

    def failing_replace(source, target):
        if Path(source).name == CONFIG_NAME and ".tmp-" in Path(source).parent.name:
            raise OSError("rename failed")
        real_replace(source, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    for limit in (0.25, None):
        with pytest.raises(OSError, match="rename failed"):
            save_checkpoint(second, tmp_path, extra={"step": 2}, max_shard_mb=limit)
        assert _listing(tmp_path) == before, limit
    monkeypatch.setattr(os, "replace", real_replace)

    loaded = load_checkpoint(tmp_path)
    assert loaded.checkpoint_config["extra"] == {"step": 1}
    assert_bit_exact(first, loaded)

    # A save that succeeds replaces the earlier checkpoint whole and keeps the other files.
    save_checkpoint(second, tmp_path, extra={"step": 2}, max_shard_mb=0.25)
    after = _listing(tmp_path)
    assert after["notes.txt"] == before["notes.txt"]
    assert not [n for n in after if n.startswith(".")]
    assert not {n for n in before if n.startswith("model-")} & set(after)
    assert_bit_exact(second, load_checkpoint(tmp_path))
