"""``langmamba.runtime``: device choice, default weights and batch size, torchrun ranks."""

import pytest
import torch

from langmamba.errors import CheckpointError, ConfigError
from langmamba.runtime import TorchrunRank, default_batch_size, default_weights, resolve_device


def test_auto_device_is_cuda_when_present_else_cpu_and_bad_names_are_refused():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="device must be"):
        resolve_device("gpu-please")
    assert default_batch_size("cpu") == 1 and default_batch_size("cuda") == 4


def test_default_weights_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("LANGMAMBA_WEIGHTS", raising=False)
    assert (default_weights() / "config.json").is_file()
    monkeypatch.setenv("LANGMAMBA_WEIGHTS", str(tmp_path))
    with pytest.raises(CheckpointError, match="LANGMAMBA_WEIGHTS"):
        default_weights()
    (tmp_path / "config.json").write_text("{}")
    assert default_weights() == tmp_path


def test_torchrun_rank_from_the_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    single = TorchrunRank.from_environment()
    assert single == TorchrunRank(0, 1, 0) and single.gather("summary") == ["summary"]
    assert single.device("cpu") == "cpu" and single.is_main and not single.active
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ranks = TorchrunRank.from_environment()
    assert ranks == TorchrunRank(1, 2, 1)  # LOCAL_RANK defaults to RANK
    assert ranks.device("cpu") == "cpu" and not ranks.is_main and ranks.active
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ConfigError, match="not within WORLD_SIZE"):
        TorchrunRank.from_environment()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="integers"):
        TorchrunRank.from_environment()
