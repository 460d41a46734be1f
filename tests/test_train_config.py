"""Training configs validate with clear errors."""

from pathlib import Path

import pytest

from langmamba.errors import ConfigError
from langmamba.train.config import load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: langmamba\noptim:\n  steps: 50\n  lr: 1e-3\ndata:\n  patch_size: 256\n")
    config = load_config(path, ["optim.batch_size=4", "denoiser.langda_weight=0"])
    assert config.model == "langmamba"
    assert (config.optim.steps, config.optim.lr, config.optim.batch_size) == (50, 1e-3, 4)
    assert config.data.patch_size == 256 and config.denoiser.langda_weight == 0.0


def test_old_seed_names_still_work_with_a_deprecation_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("model: seed\nrun:\n  seed: 3\nseed:\n  langda_weight: 0.5\n  decoder_preset: paper\n")
    with pytest.warns(DeprecationWarning) as caught:
        config = load_config(path, ["seed.langda_weight=0.25"])
    messages = " ".join(str(w.message) for w in caught)
    assert "'langmamba'" in messages and "'denoiser'" in messages
    assert config.model == "langmamba" and config.run.seed == 3
    assert (config.denoiser.langda_weight, config.denoiser.decoder_preset) == (0.25, "paper")


def test_shipped_configs_load_without_warnings():
    import warnings
    from pathlib import Path

    import langmamba

    folder = Path(langmamba.__file__).parent / "configs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        configs = {p.stem: load_config(p) for p in sorted(folder.glob("*.yaml"))}
    assert set(configs) == {"langae", "langmamba", "langmamba_no_langda", "redcnn"}
    assert configs["langmamba"].model == "langmamba" and configs["langmamba_no_langda"].denoiser.langda_weight == 0


def test_decoder_config_of_the_denoiser_section():
    from langmamba.train.config import decoder_config

    config = load_config(
        overrides=["denoiser.decoder_preset=medium", "denoiser.decoder={d_state: 4}", "denoiser.global_residual=false"]
    )
    decoder = decoder_config(config.denoiser)
    assert decoder.widths == (32, 64, 96, 128, 128) and decoder.d_state == 4 and not decoder.global_residual
    with pytest.raises(ConfigError, match="denoiser.decoder: .*unknown key.*width"):
        load_config(overrides=["denoiser.decoder={width: 3}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.stepz=3", "unknown key optim.stepz"),
        ("optim.steps=many", "optim.steps: expected an integer"),
        ("run.bf16=maybe", "run.bf16: expected true or false"),
        ("data.dose=1.5", "data.dose must be in"),
        ("data.patch_size=100", "multiple of 16"),
        ("data.zoom=[2.0,1.0]", "data.zoom must be"),
        ("data.soften_probability=2", "data.soften_probability must be"),
        ("data.soften_sigma_mm=[1.0]", "data.soften_sigma_mm must be"),
        ("model=unet", "expected langae, langmamba, redcnn"),
        ("data.source=npy", "data.root is required"),
        ("langae.word_thresholds=[0.9]", "one threshold per pyramid level"),
        ("steps=3", "unknown key steps"),
    ],
)
def test_bad_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("optim: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_recorded_configs_with_retired_keys_load_with_a_warning():
    """The config of an earlier run (adversarial_* and fresh_noise_every, since removed) still loads."""
    with pytest.warns(FutureWarning) as caught:
        recorded = "weights/training/experiments/one_patient_v0.1/langae/config.yaml"
        config = load_config(Path(__file__).resolve().parents[1] / recorded)
    messages = sorted(str(w.message) for w in caught if issubclass(w.category, FutureWarning))
    assert [m.split(" is ignored")[0] for m in messages] == [
        "config key data.fresh_noise_every",
        "config key langae.adversarial_start_step",
        "config key langae.adversarial_weight",
    ]
    assert config.model == "langae" and not hasattr(config.langae, "adversarial_weight")
    with pytest.raises(ConfigError, match="unknown key langae.adversarial_wieght"):
        load_config(overrides=["langae.adversarial_wieght=0.1"])
