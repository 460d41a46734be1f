"""Training data: patient-level splits, paired layouts, body-aware patches."""

import numpy as np
import pytest
import torch

from langmamba.data import CTSlice, PatchSampler, augment, load_npy_pairs, split_by_patient
from langmamba.errors import ConfigError, InputError


def _slices(patients, per_patient=3, size=32):
    return [
        CTSlice(full=np.full((size, size), i, np.float32), spacing_mm=(1.0, 1.0), patient=p)
        for p in patients
        for i in range(per_patient)
    ]


def test_split_keeps_patients_apart():
    slices = _slices(["a", "b", "c", "d", "e"])
    train, val = split_by_patient(slices, validation_fraction=0.4, seed=1)
    assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
    assert len({s.patient for s in val}) == 2 and len(train) + len(val) == len(slices)
    train, val = split_by_patient(slices, validation_patients=["c"])
    assert {s.patient for s in val} == {"c"}
    with pytest.raises(ConfigError, match="not in the data"):
        split_by_patient(slices, validation_patients=["z"])


def test_npy_pairs_layout(tmp_path):
    for kind in ("quarter_1mm", "full_1mm"):
        (tmp_path / "train" / kind).mkdir(parents=True)
    for name, value in (("L067_0.npy", 10), ("L067_1.npy", 20), ("L096_0.npy", 30)):
        np.save(tmp_path / "train" / "quarter_1mm" / name, np.full((8, 8), value + 1024.0))
        np.save(tmp_path / "train" / "full_1mm" / name, np.full((8, 8), value + 1024.0 + 1))
    slices = load_npy_pairs(tmp_path, hu_offset=1024)
    assert [s.patient for s in slices] == ["L067", "L067", "L096"]
    assert slices[2].low[0, 0] == 30 and slices[2].full[0, 0] == 31
    (tmp_path / "train" / "full_1mm" / "L096_0.npy").unlink()
    with pytest.raises(InputError, match="same names"):
        load_npy_pairs(tmp_path)


def test_augment_moves_channels_together():
    torch.manual_seed(0)
    batch = torch.rand(16, 1, 8, 8).repeat(1, 2, 1, 1)
    out = augment(batch, torch.Generator().manual_seed(3))
    assert torch.equal(out[:, 0], out[:, 1])
    # every output is one of the 8 flips/rotations of its input
    for original, moved in zip(batch[:, 0], out[:, 0]):
        variants = [torch.rot90(original, k) for k in range(4)]
        variants += [torch.flip(v, (-1,)) for v in variants]
        assert any(torch.equal(moved, v) for v in variants)


def test_patches_come_from_the_body():
    hu = np.full((96, 96), -1000.0, np.float32)
    hu[40:80, 40:80] = 50.0  # the body: bottom-right block
    image = torch.as_tensor(np.stack([hu, hu]))
    sampler = PatchSampler([image], [hu], patch_size=16, seed=0)
    patches, which = sampler.sample(64, augment_patches=False, return_index=True)
    assert patches.shape == (64, 2, 16, 16) and set(which) == {0}
    # the patch centre lies inside the body
    assert (patches[:, 0, 8, 8] == 50.0).all()
