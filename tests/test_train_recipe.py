"""The stage-2 training recipe: fresh noise per batch, dose jitter, dihedral augmentation, EMA, best-checkpoint
selection, resume with the moving average, and the split that never uses the test case."""

import json

import numpy as np
import pytest
import torch

from langmamba.data import CTSlice
from langmamba.data.patches import augment
from langmamba.errors import ConfigError
from langmamba.simulate.protocol import ScanProtocol
from langmamba.train import appearance, engine, load_config, train
from langmamba.train import data as train_data
from langmamba.train.config import DataConfig
from langmamba.train.ema import ModelEMA


def _phantom(seed: int, size: int = 96) -> np.ndarray:
    """A water ellipse (0 HU) with a few brighter and darker disks, air (-1000 HU) around it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    hu = np.where((x / (0.45 * size)) ** 2 + (y / (0.38 * size)) ** 2 <= 1, 0.0, -1000.0)
    for _ in range(4):
        cy, cx = rng.uniform(-0.2, 0.2, 2) * size
        hu[(x - cx) ** 2 + (y - cy) ** 2 < (0.06 * size) ** 2] = rng.choice([-700.0, 60.0, 400.0])
    return hu.astype(np.float32)


def _slices(patients=("a", "b", "c"), per_patient=2, roles=None):
    slices = []
    for p, name in enumerate(patients):
        for k in range(per_patient):
            s = CTSlice(full=_phantom(10 * p + k), spacing_mm=(1.5, 1.5), patient=name)
            if roles:
                s.role = roles[name]
            slices.append(s)
    return slices


def _data(monkeypatch, slices=None, **settings) -> train_data.TrainingData:
    monkeypatch.setattr(train_data, "load_slices", lambda config: (slices or _slices(), None))
    config = DataConfig(patch_size=64, validation_patients=["c"], **settings)
    return train_data.TrainingData.build(config, torch.device("cpu"), seed=0, validation_slices=1)


@pytest.mark.slow
def test_every_batch_gets_noise_never_seen_before(monkeypatch):
    data = _data(monkeypatch, patches_per_slice=1)
    first, second = data._low_dose([0, 0]), data._low_dose([0])
    full = data.sampler.images[0][0]
    noise = [low - full for low in first + second]
    assert all(n.abs().max() > 1 for n in noise)  # noise was added
    # Two copies of one slice in a batch, and the next batch, all get different realisations.
    assert not torch.allclose(noise[0], noise[1]) and not torch.allclose(noise[0], noise[2])
    low, full_patch, which = data.batch(4)
    assert low.shape == full_patch.shape == (4, 1, 64, 64) and len(which) == 4
    assert set(which) <= {0, 1, 2, 3}


def test_dose_jitter_covers_the_configured_range(monkeypatch):
    doses = []

    def record(full_hu, spacing_mm, dose, seed):
        doses.append(dose)
        return full_hu + 1.0

    data = _data(monkeypatch, dose=0.1, dose_max=0.5, patches_per_slice=2)
    monkeypatch.setattr(train_data, "simulate_on_device", record)
    for _ in range(150):
        data.batch(2)
    assert 0.1 <= min(doses) < 0.13 and 0.47 < max(doses) <= 0.5
    assert 0.27 < np.mean(doses) < 0.33  # uniform, not clustered at one end
    fixed = DataConfig(dose=0.25)
    assert train_data.draw_dose(fixed, np.random.default_rng(0)) == 0.25


def test_augmentation_reaches_all_eight_dihedral_transforms():
    patch = torch.arange(4.0).reshape(1, 1, 2, 2).repeat(256, 2, 1, 1)  # low and full channels
    out = augment(patch, torch.Generator().manual_seed(0))
    seen = {tuple(sample[0].flatten().tolist()) for sample in out}
    assert len(seen) == 8
    assert torch.equal(out[:, 0], out[:, 1])  # low and normal dose move together


def test_ema_follows_the_formula_with_its_warm_up():
    model = torch.nn.Linear(2, 1)
    frozen = torch.nn.Parameter(torch.ones(1), requires_grad=False)
    model.register_parameter("frozen", frozen)
    ema = ModelEMA(model, decay=0.9)
    expected = model.weight.detach().clone()
    for n in range(30):
        with torch.no_grad():
            model.weight.add_(1.0)
            model.frozen.add_(1.0)
        ema.update(model)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * model.weight.detach()
    assert torch.allclose(ema.model.weight, expected, atol=1e-5)
    assert ema.model.frozen.item() == 1.0  # frozen weights are not averaged (they never change in training)
    restored = ModelEMA(model, decay=0.9)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.model.weight, ema.model.weight) and restored.updates == 30


def test_split_uses_roles_and_never_the_test_case(monkeypatch):
    roles = {"a": "training", "b": "validation", "c": "validation", "lung2": "test"}
    slices = _slices(("a", "b", "c", "lung2"), roles=roles)
    train, validation = train_data.split_slices(slices, DataConfig(validation_patients=None), seed=0)
    assert {s.patient for s in train} == {"a"} and {s.patient for s in validation} == {"b", "c"}
    _, narrowed = train_data.split_slices(slices, DataConfig(validation_patients=["c"]), seed=0)
    assert {s.patient for s in narrowed} == {"c"}
    with pytest.raises(ConfigError, match="not validation patients"):
        train_data.split_slices(slices, DataConfig(validation_patients=["a"]), seed=0)
    plain = _slices(("a", "b", "lung2"))
    train, validation = train_data.split_slices(plain, DataConfig(validation_patients=["b"]), seed=0)
    assert "lung2" not in {s.patient for s in train + validation}
    with pytest.raises(ConfigError, match="test case"):
        train_data.split_slices(plain, DataConfig(validation_patients=["lung2"]), seed=0)


QUICK = [
    "model=redcnn",
    "redcnn.channels=4",
    "data.crop=128",
    "data.patch_size=64",
    "optim.batch_size=2",
    "data.max_slices_per_patient=2",
    "optim.warmup_steps=2",
    "run.log_every=1",
    "run.validation_slices=1",
    "data.validation_patients=['pydicom:explicit_VR-UN']",
    "data.include_pydicom=true",
    "optim.ema_decay=0.5",
    "data.validation_doses=[0.25]",
]


@pytest.mark.slow
def test_the_best_validated_average_is_exported(tmp_path, monkeypatch):
    scores = iter([20.0, 25.0, 22.0])
    calls = []

    def scripted(task, model, data, device):
        calls.append({k: v.clone() for k, v in model.state_dict().items()})
        return {"val_psnr": next(scores), "val_ssim": 0.5}

    monkeypatch.setattr(engine, "validate", scripted)
    out = tmp_path / "run"
    train(
        load_config(
            overrides=QUICK + ["optim.steps=6", "run.validate_every=2", "run.checkpoint_every=2", f"run.output={out}"]
        ),
        progress=False,
    )
    status = json.loads((out / "status.json").read_text())
    assert status["best_step"] == 4 and status["best_val_psnr"] == 25.0 and status["finished"]
    from langmamba.checkpoint import load_checkpoint

    exported = load_checkpoint(out / "model")
    assert exported.checkpoint_config["extra"]["best_step"] == 4
    assert exported.checkpoint_config["extra"]["steps"] == 6
    # The simulator's settings of the training low doses, in the protocol dataclass's asdict form.
    assert ScanProtocol.from_dict(exported.checkpoint_config["extra"]["scan_protocol"]) == ScanProtocol()
    for name, tensor in exported.state_dict().items():  # the EMA weights validated at step 4
        assert torch.equal(tensor, calls[1][name]), name
    raw = load_checkpoint(out / "checkpoints" / "step-0000006" / "model")
    assert any(not torch.equal(a, b) for a, b in zip(raw.parameters(), exported.parameters()))


@pytest.mark.slow
def test_resume_continues_weights_average_and_noise_exactly(tmp_path, monkeypatch):
    settings = QUICK + ["optim.steps=6", "run.validate_every=100", "run.checkpoint_every=100", "run.max_minutes=100"]
    straight = tmp_path / "straight"
    train(load_config(overrides=settings + [f"run.output={straight}"]), progress=False)

    calls = {"n": 0}

    def stop_after_three(started, minutes, dist, device):
        calls["n"] += 1
        return calls["n"] == 3

    monkeypatch.setattr(engine, "_out_of_time", stop_after_three)
    interrupted = tmp_path / "interrupted"
    config = load_config(overrides=settings + [f"run.output={interrupted}"])
    train(config, progress=False)
    assert json.loads((interrupted / "status.json").read_text())["step"] == 3
    train(config, progress=False)
    a = torch.load(straight / "checkpoints" / "step-0000006" / "training_state.pt", weights_only=False)
    b = torch.load(interrupted / "checkpoints" / "step-0000006" / "training_state.pt", weights_only=False)
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    for name, tensor in a["ema"]["weights"].items():  # bit for bit: the same weights, average and noise stream
        assert torch.equal(tensor, b["ema"]["weights"][name]), name
    assert a["data"]["batches"] == b["data"]["batches"] == 6


def test_validation_slices_are_shared_out_over_patients():
    slices = _slices(("long",), per_patient=10) + _slices(("one", "two"), per_patient=1)
    picked = train_data.pick_validation(slices, 5)
    names = [s.patient for s in picked]
    assert len(picked) == 5 and names.count("one") == names.count("two") == 1 and names.count("long") == 3
    assert len(train_data.pick_validation(slices, 50)) == 12


def test_slices_of_different_sizes_are_simulated_together_and_cut_back(monkeypatch):
    small = CTSlice(full=_phantom(1, size=72), spacing_mm=(1.5, 1.5), patient="a")
    big = CTSlice(full=_phantom(2, size=96), spacing_mm=(1.5, 1.5), patient="a")
    calls = []

    def record(full_hu, spacing_mm, dose, seed):
        calls.append(full_hu.clone())
        return full_hu + 5.0

    data = _data(monkeypatch, slices=[small, big, *_slices(("c",))])
    monkeypatch.setattr(train_data, "simulate_on_device", record)
    lows = data._low_dose([0, 1])
    assert len(calls) == 1 and calls[0].shape == (2, 96, 96)
    assert calls[0][0, 0, 0] == -1000  # the air canvas around the smaller slice
    for k, low in enumerate(lows):  # each slice as the sampler holds it (padded or not), with its own noise
        image = data.sampler.images[k][0]
        assert low.shape == image.shape and torch.equal(low, image + 5.0)
    assert lows[1].shape == big.full.shape


@pytest.mark.slow
def test_a_changed_validation_set_restarts_the_best_comparison(tmp_path, monkeypatch):
    scores = iter([30.0, 31.0, 25.0, 20.0])
    monkeypatch.setattr(
        engine, "validate", lambda task, model, data, device: {"val_psnr": next(scores), "val_ssim": 0.5}
    )
    out = tmp_path / "run"
    settings = QUICK + ["run.validate_every=2", "run.checkpoint_every=2", f"run.output={out}"]
    train(load_config(overrides=settings + ["optim.steps=4"]), progress=False)
    assert json.loads((out / "status.json").read_text())["best_step"] == 4
    train(load_config(overrides=settings + ["optim.steps=5"]), progress=False)  # same set: 25 dB does not win
    assert json.loads((out / "status.json").read_text())["best_step"] == 4
    # Resumed with other validation noise: the 20 dB at step 6 is not compared with the 31 dB of another set.
    train(load_config(overrides=settings + ["optim.steps=6", "data.validation_doses=[0.1]"]), progress=False)
    status = json.loads((out / "status.json").read_text())
    assert status["best_step"] == 6 and status["best_val_psnr"] == 20.0


def test_zoom_resamples_the_slice_and_simulates_it_at_the_new_pixel_size(monkeypatch):
    calls = []

    def record(full_hu, spacing_mm, dose, seed):
        calls.append((tuple(full_hu.shape), spacing_mm))
        return full_hu + 5.0

    data = _data(monkeypatch, zoom=[2.0, 2.0], patches_per_slice=2)
    monkeypatch.setattr(train_data, "simulate_on_device", record)
    low, full, _ = data.batch(4)
    assert [shape[1:] for shape, _ in calls] == [(192, 192)]  # 96-pixel phantoms at twice the size
    assert calls[0][0][0] == 1  # four times the pixels, so four times the patches: one slice fills the batch
    assert calls[0][1] == (0.75, 0.75)  # 1.5 mm pixels halved
    assert low.shape == full.shape == (4, 1, 64, 64)
    assert torch.allclose(low - full, torch.full_like(low, 5.0 / 3000.0), atol=1e-6)  # the low dose of that view
    view = data._view(0, 0.5)  # shrunk below a patch: padded with air, every centre still cuts a whole patch
    assert view.full.shape == (64, 64) and view.spacing_mm == (3.0, 3.0)
    assert bool((view.centres == 32).all())


def test_softening_blurs_the_target_before_the_noise_is_added(monkeypatch):
    data = _data(monkeypatch, soften_probability=1.0, soften_sigma_mm=[3.0, 3.0])
    view = data._view(0, 1.0)
    original = data.sampler.images[0][0]
    assert view.spacing_mm == (1.5, 1.5) and torch.equal(view.centres, data.sampler.centres[0])
    assert view.full.shape == original.shape
    edges = (original.diff(dim=1).abs().max(), view.full.diff(dim=1).abs().max())
    assert edges[1] < 0.5 * edges[0]  # the air/water edge is spread over several pixels
    assert abs(float(view.full.mean() - original.mean())) < 5.0  # blurred, not shifted
    plain = _data(monkeypatch)  # off by default: the slice as scanned, the sampler's own tensor
    as_scanned = plain._view(0, 1.0).full
    assert as_scanned.data_ptr() == plain.sampler.images[0].data_ptr() and torch.equal(as_scanned, original)


def test_appearance_helpers():
    hu = torch.full((20, 30), 40.0)
    assert torch.allclose(appearance.gaussian_blur(hu, 2.0), hu)  # a flat image stays flat, edges included
    assert appearance.zoom_slice(hu, 1.5).shape == (30, 45)
    assert appearance.zoom_slice(hu, 1.0) is hu
    edge = torch.where(torch.arange(40) < 20, -1000.0, 1000.0).repeat(8, 1)
    assert appearance.zoom_slice(edge, 2.0).min() >= -1000.0  # bicubic overshoot below air is clipped
    generator = torch.Generator().manual_seed(0)
    zooms = [appearance.draw_zoom((0.5, 2.0), generator) for _ in range(400)]
    assert 0.5 <= min(zooms) < 0.55 and 1.9 < max(zooms) <= 2.0
    assert abs(np.mean(np.log(zooms))) < 0.1  # log-uniform: as many shrunk as enlarged
    assert appearance.draw_zoom(None, generator) == 1.0
    assert appearance.draw_soften_mm(0.0, (0.3, 1.0), generator) == 0.0
    blurs = [appearance.draw_soften_mm(0.5, (0.3, 1.0), generator) for _ in range(400)]
    assert 0.4 < np.mean([b == 0 for b in blurs]) < 0.6 and all(b == 0 or 0.3 <= b <= 1.0 for b in blurs)
