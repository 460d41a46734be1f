"""The multi-dose, multi-draw evaluation: bootstrap intervals, the cases file, TTA, and a tiny end-to-end run."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from langmamba import evaluate, metrics
from langmamba.baselines import REDCNN
from langmamba.checkpoint import read_weights, save_checkpoint
from langmamba.errors import InputError
from langmamba.eval_cases import EvalCase, load_cases, save_cases
from langmamba.evaluate import EvaluationIncomplete, lesion_crop, run_evaluation
from langmamba.infer import dihedral_average
from langmamba.simulate.protocol import ScanProtocol
from tests.test_denoiser import small_langmamba


def test_paired_bootstrap_interval_has_the_known_width_and_coverage():
    rng = np.random.default_rng(0)
    b = rng.normal(30, 2, 400)
    a = b + rng.normal(0.5, 1.0, 400)
    ci = metrics.paired_bootstrap_ci(a, b, seed=1)
    assert ci["low"] < 0.5 < ci["high"] and ci["n"] == 400
    assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 / np.sqrt(400), rel=0.15)  # normal theory
    covered = 0
    for trial in range(200):
        diff = rng.normal(0.5, 1.0, 60)
        ci = metrics.paired_bootstrap_ci(diff, np.zeros(60), resamples=1000, seed=trial)
        covered += ci["low"] <= 0.5 <= ci["high"]
    assert 0.88 <= covered / 200 <= 0.99
    with pytest.raises(InputError, match="same non-zero length"):
        metrics.paired_bootstrap_ci([1.0, 2.0], [1.0])


def test_tta_of_a_convolution_is_the_convolution_with_the_symmetrised_kernel():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1, bias=False)
    x = torch.randn(2, 1, 12, 12)
    kernel = conv.weight.detach()[0, 0]
    variants = [torch.rot90(torch.flip(kernel, (-1,)) if f else kernel, k) for f in (0, 1) for k in range(4)]
    symmetric = torch.nn.functional.conv2d(x, torch.stack(variants).mean(0)[None, None], padding=1)
    with torch.no_grad():
        assert torch.allclose(dihedral_average(conv, x), symmetric, atol=1e-5)
        assert not torch.allclose(conv(x), symmetric, atol=1e-3)


def _phantom(size=96, lesion=False):
    y, x = np.mgrid[:size, :size] - (size - 1) / 2
    hu = np.where((x / 40) ** 2 + (y / 32) ** 2 <= 1, 40.0, -1000.0)
    hu[(x + 12) ** 2 + y**2 < 64] = -800.0
    label = ((x - 15) ** 2 + (y - 5) ** 2 < 16) if lesion else None
    if lesion:
        hu[label] = 80.0
    stack = np.stack([hu, np.roll(hu, 2, axis=1), np.roll(hu, -2, axis=0)]).astype(np.float32)
    return stack, None if label is None else np.broadcast_to(label, stack.shape).copy()


def test_cases_file_round_trips(tmp_path):
    hu, label = _phantom(lesion=True)
    cases = [EvalCase("lung2", hu, (0.7, 0.7), "test", label), EvalCase("v1", hu[:1] + 0.5, (0.9, 0.9), "validation")]
    path = save_cases(cases, tmp_path / "cases.npz")
    back = load_cases(path)
    assert [c.name for c in back] == ["lung2", "v1"] and back[1].label is None and back[1].role == "validation"
    assert np.array_equal(back[0].hu, hu) and np.array_equal(back[0].label, label)
    assert np.array_equal(back[1].hu, hu[:1] + 0.5)  # non-integral HU kept as float
    with pytest.raises(InputError, match="not an evaluation cases file"):
        load_cases(tmp_path / "missing.npz")


def test_lesion_crop_is_a_square_around_the_lesion():
    label = np.zeros((100, 100), bool)
    label[40:46, 70:74] = True
    rows, cols = lesion_crop(label, margin_px=10)
    assert rows.stop - rows.start == cols.stop - cols.start
    assert rows.start <= 40 and rows.stop >= 46 and cols.start <= 70 and cols.stop >= 74 and cols.stop <= 100
    assert lesion_crop(np.zeros((10, 10), bool)) is None


@pytest.mark.slow
def test_quick_evaluation_end_to_end(tmp_path, monkeypatch):
    hook_calls = []

    def hook(weights, model, normal, low, denoised, label, *, device, max_slices):
        hook_calls.append({"normal": normal, "label": label})
        return {"words": "checked"}

    monkeypatch.setattr(evaluate, "explanation_metrics", hook)
    weights = tmp_path / "weights"
    for name in ("langmamba", "langmamba_no_langda"):  # untrained: the global residual makes them the identity
        save_checkpoint(small_langmamba(), weights / name)
    torch.manual_seed(0)
    save_checkpoint(REDCNN(channels=4), weights / "redcnn")
    hu, label = _phantom(lesion=True)
    cases = [EvalCase("lung2", hu, (0.8, 0.8), "test", label), EvalCase("val", _phantom()[0], (0.8, 0.8), "validation")]
    output = tmp_path / "out" / "metrics.json"
    settings = dict(
        cases=cases,
        doses=(0.25, 0.1),
        draws=2,
        device="cpu",
        progress=False,
        workers=1,
        resamples=200,
        bm3d_candidates_hu=(10, 40),
        cache=tmp_path / "cache",
    )
    with pytest.raises(EvaluationIncomplete):  # a spent budget stops between units; the cache keeps the tuning
        run_evaluation(weights, output, tmp_path / "out" / "comparison.png", max_minutes=0, **settings)
    assert (tmp_path / "cache" / "bm3d.json").is_file() and not output.exists()
    partial = tmp_path / "partial.json"
    empty = run_evaluation(weights, partial, tmp_path / "partial.png", partial=True, **settings)
    assert not empty["evaluation"]["complete"] and len(empty["evaluation"]["missing"]) == 2 * 2  # cases x doses
    assert not list((tmp_path / "cache").glob("unit-*.npz"))  # --partial computes nothing
    result = run_evaluation(weights, output, tmp_path / "out" / "comparison.png", **settings)
    again = run_evaluation(weights, partial, tmp_path / "partial.png", partial=True, **settings)
    assert again["evaluation"]["complete"] and again["evaluation"]["per_case"] == result["evaluation"]["per_case"]
    assert len(list((tmp_path / "cache").glob("unit-*.npz"))) == 2 * 2 * 2  # cases x doses x draws
    assert len(list((tmp_path / "cache").glob("denoisers-*/unit-*.npz"))) == 2 * 2 * 2  # the models' parts
    with pytest.raises(InputError, match="other settings"):
        run_evaluation(weights, output, tmp_path / "out" / "comparison.png", **(settings | {"draws": 3}))
    saved = json.loads(output.read_text())
    assert saved["evaluation"]["draws"] == 2 and saved["dose"] == 0.25
    protocol = saved["evaluation"]["scan_protocol"]  # the simulator's settings, in the dataclass's asdict form
    assert ScanProtocol.from_dict(protocol) == ScanProtocol()
    for key in ("window_-160_240", "window_-1000_1000", "noise_sigma_hu", "lesion_cnr", "bm3d_sigma_hu"):
        assert key in saved  # the keys the model card reads stay
    # The explanations hook saw lung2 at the headline dose (first draw) and its answer is the last section.
    assert list(saved)[-1] == "explanations" and saved["explanations"] == {"words": "checked"}
    assert len(hook_calls) == 1 and hook_calls[0]["normal"].shape == hu.shape
    assert np.array_equal(hook_calls[0]["label"], label)
    assert saved["evaluation"]["bm3d_tuned_on"].startswith("validation cases val")
    section = result["evaluation"]["per_case"]["lung2"]["doses"]["0.1"]["window_-160_240"]
    assert len(section["ldct"]["psnr_per_draw"]) == 2
    # LangMamba is the identity here (up to float rounding), so the input's difference to it is zero, interval
    # included, while RED-CNN (untrained) differs with a non-degenerate interval.
    zero = section["difference_to_langmamba"]["ldct"]["psnr"]
    assert max(abs(zero["mean"]), abs(zero["low"]), abs(zero["high"])) < 1e-4
    red = section["difference_to_langmamba"]["redcnn"]["psnr"]
    assert red["low"] <= red["mean"] <= red["high"] and red["high"] - red["low"] > 0
    assert "langmamba" not in section["difference_to_langmamba"] and "ldct" not in section["gain_over_input"]
    assert abs(section["gain_over_input"]["langmamba"]["psnr"]["mean"]) < 1e-4
    # Lower dose, more noise in the input.
    doses = result["evaluation"]["per_case"]["val"]["doses"]
    assert doses["0.1"]["noise_sigma_hu"]["ldct"] > doses["0.25"]["noise_sigma_hu"]["ldct"] > 0
    assert "0.25" in result["evaluation"]["validation_pooled"]
    timing = saved["evaluation"]["seconds_per_slice"]
    assert set(timing) == {"bm3d", "redcnn", "langmamba_no_langda", "langmamba"} and min(timing.values()) > 0
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 10_000
    assert (tmp_path / "out" / "metrics_figure.npz").is_file()
    # A new word calibration: only the explanations are computed again, from the headline's own low dose.
    monkeypatch.setattr(evaluate, "explanation_metrics", lambda *args, **kwargs: {"words": "recalibrated"})
    refreshed = run_evaluation(
        weights, partial, tmp_path / "partial.png", partial=True, refresh_explanations=True, **settings
    )
    assert refreshed["explanations"] == {"words": "recalibrated"}
    assert refreshed["evaluation"]["per_case"] == result["evaluation"]["per_case"]
    (headline_file,) = (tmp_path / "cache").glob("denoisers-*/headline.json")
    assert json.loads(headline_file.read_text())["explanations"] == {"words": "recalibrated"}
    # The cache's key of the weights ignores the word calibration (only the explanations change with it) and
    # sees every other tensor: new denoiser weights get their own part of the folder.
    key = evaluate.denoiser_fingerprint(weights)
    file = weights / "langmamba" / "model.safetensors"
    tensors = read_weights(weights / "langmamba")
    save_file({**tensors, "langae.quantizer.calibration": torch.full((3,), 3.0)}, str(file))
    assert evaluate.denoiser_fingerprint(weights) == key
    save_file({**tensors, "langae.quantizer.calibration": torch.full((3,), 1.0)}, str(file))
    assert evaluate.denoiser_fingerprint(weights) == key
    save_file(tensors, str(file))
    torch.manual_seed(1)
    save_checkpoint(REDCNN(channels=4), weights / "redcnn")
    assert evaluate.denoiser_fingerprint(weights) != key
    fresh = run_evaluation(weights, partial, tmp_path / "partial.png", partial=True, **settings)
    assert not fresh["evaluation"]["complete"] and len(fresh["evaluation"]["missing"]) == 2 * 2
    # Computing them reuses the low dose and BM3D of every unit but the headline (whose figure needs the image).
    bm3d_runs = []
    real_bm3d = evaluate.bm3d_denoise
    monkeypatch.setattr(evaluate, "bm3d_denoise", lambda *a, **k: bm3d_runs.append(1) or real_bm3d(*a, **k))
    retrained = run_evaluation(weights, output, tmp_path / "out" / "comparison.png", **settings)
    assert len(bm3d_runs) == 1 and retrained["evaluation"]["complete"]
    for case in ("lung2", "val"):
        for dose in ("0.25", "0.1"):
            old_window = result["evaluation"]["per_case"][case]["doses"][dose]["window_-160_240"]
            new_window = retrained["evaluation"]["per_case"][case]["doses"][dose]["window_-160_240"]
            for method in ("ldct", "bm3d", "langmamba"):  # shared parts and unchanged models score the same
                assert new_window[method]["psnr_per_draw"] == pytest.approx(old_window[method]["psnr_per_draw"])
    folders = sorted((tmp_path / "cache").glob("denoisers-*"))
    assert [len(list(f.glob("unit-*.npz"))) for f in folders] == [8, 8]  # every unit's models, for each weights
    assert len(list((tmp_path / "cache").glob("unit-*.npz"))) == 8  # one shared low dose and BM3D part per unit

    # Other BM3D candidates: tuning runs only the σ not tried before; where the best changes, that dose's BM3D runs
    # again (the headline's models too, for its figure), and nothing else is computed.
    tuned_sigmas, model_runs = [], []
    real_slice = evaluate._bm3d_slice
    monkeypatch.setattr(evaluate, "_bm3d_slice", lambda job: tuned_sigmas.append(job[1]) or real_slice(job))
    import langmamba.infer

    real_denoise = langmamba.infer.denoise_hu_array
    monkeypatch.setattr(
        langmamba.infer, "denoise_hu_array", lambda *a, **k: model_runs.append(1) or real_denoise(*a, **k)
    )
    bm3d_runs.clear()
    wider = run_evaluation(
        weights, output, tmp_path / "out" / "comparison.png", **(settings | {"bm3d_candidates_hu": (25, 40)})
    )
    assert set(tuned_sigmas) == {25.0}
    before = {d: v["sigma_hu"] for d, v in retrained["evaluation"]["bm3d"].items()}
    after = {d: v["sigma_hu"] for d, v in wider["evaluation"]["bm3d"].items()}
    changed = [d for d in after if after[d] != before[d]]
    assert changed and all(
        set(v["psnr_tried"]) == {"10.0", "25.0", "40.0"} for v in wider["evaluation"]["bm3d"].values()
    )
    assert len(bm3d_runs) == 2 * 2 * len(changed)  # cases x draws of every dose whose σ changed
    assert len(model_runs) == (3 if "0.25" in changed else 0)
    for case in ("lung2", "val"):
        for dose in after:
            old_window = retrained["evaluation"]["per_case"][case]["doses"][dose]["window_-160_240"]
            new_window = wider["evaluation"]["per_case"][case]["doses"][dose]["window_-160_240"]
            same = old_window["bm3d"]["psnr_per_draw"] == pytest.approx(new_window["bm3d"]["psnr_per_draw"])
            assert same == (dose not in changed)
            assert new_window["langmamba"]["psnr_per_draw"] == pytest.approx(old_window["langmamba"]["psnr_per_draw"])
    saved = json.loads(output.read_text())
    assert saved["bm3d_sigma_hu"] == after["0.25"] and saved["explanations"] == {"words": "recalibrated"}


def test_validation_cases_put_body_crops_back_on_one_canvas(monkeypatch):
    from langmamba.data import CTSlice, prepared
    from langmamba.eval_cases import validation_cases

    a = CTSlice(full=np.full((20, 30), 50.0, np.float32), spacing_mm=(0.8, 0.8), patient="v")
    b = CTSlice(full=np.full((25, 20), 70.0, np.float32), spacing_mm=(0.8, 0.8), patient="v")
    train = CTSlice(full=np.zeros((20, 20), np.float32), spacing_mm=(0.8, 0.8), patient="t")
    a.offset, b.offset = (5, 0), (0, 12)
    for s, role in ((a, "validation"), (b, "validation"), (train, "training")):
        s.role = role
    monkeypatch.setattr(prepared, "load_prepared", lambda path: ([a, b, train], {}))
    (case,) = validation_cases("set.npz")
    assert case.name == "v" and case.hu.shape == (2, 25, 32) and case.role == "validation"
    assert np.all(case.hu[0, 5:25, 0:30] == 50) and np.all(case.hu[1, 0:25, 12:32] == 70)
    assert case.hu[0, 0, 0] == -1000 and case.hu[1, 0, 0] == -1000
    with pytest.raises(InputError, match="not in"):
        validation_cases("set.npz", patients=["nobody"])


def test_a_cache_of_the_earlier_layout_is_split_into_shared_and_per_weights_parts(tmp_path):
    folder = tmp_path / "cache"
    settings = {"cases": [["lung2", [2, 8, 8]]], "doses": [0.25], "draws": 1, "seed": 0}
    folder.mkdir()
    earlier = {**settings, "denoisers": "abc", "tta": False, "candidates": [10, 40]}
    (folder / "settings.json").write_text(json.dumps(earlier))
    (folder / "headline.json").write_text(json.dumps({"dose": 0.25}))
    tuned = {"0.25": {"sigma_hu": 40.0, "psnr_tried": {}}, "0.1": {"sigma_hu": 65.0, "psnr_tried": {}}}
    (folder / "bm3d.json").write_text(json.dumps({"tuned": tuned, "source": "validation"}))
    arrays = {
        "score/ldct/window_-160_240/psnr": np.array([20.0, 21.0]),
        "score/bm3d/window_-160_240/psnr": np.array([22.0, 23.0]),
        "score/langmamba/window_-160_240/psnr": np.array([24.0, 25.0]),
        "sigma/ndct": np.array(7.0),
        "sigma/langmamba": np.array(5.0),
        "seconds/bm3d": np.array(1.5),
        "seconds/langmamba": np.array(0.5),
    }
    key = evaluate.UnitCache.key("lung2", 0.25, 0)
    np.savez(folder / f"unit-{key}.npz", **arrays)

    store = evaluate.UnitCache(folder, settings, denoisers="abc")
    assert json.loads((folder / "settings.json").read_text()) == settings
    assert store.load_json("headline.json") == {"dose": 0.25} and not (folder / "headline.json").exists()
    shared = np.load(folder / f"unit-{key}.npz")
    assert sorted(shared.files) == [
        "bm3d_sigma",
        "score/bm3d/window_-160_240/psnr",
        "score/ldct/window_-160_240/psnr",
        "seconds/bm3d",
        "sigma/ndct",
    ]
    # Units made before they recorded their BM3D σ get the σ of their dose from the stored tuning.
    assert float(np.load(folder / f"unit-{key}.npz")["bm3d_sigma"]) == 40.0
    assert store.load_unit(key, 50.0) is None  # BM3D ran with another σ: the unit is not finished
    scores, sigmas, seconds = store.load_unit(key, 40.0)
    assert scores["langmamba"]["window_-160_240"]["psnr"].tolist() == [24.0, 25.0]
    assert scores["ldct"]["window_-160_240"]["psnr"].tolist() == [20.0, 21.0]
    assert sigmas == {"ndct": 7.0, "langmamba": 5.0} and seconds == {"bm3d": 1.5, "langmamba": 0.5}
    # Other weights share the low dose and BM3D but have no models' part yet; other settings are refused.
    other = evaluate.UnitCache(folder, settings, denoisers="def")
    assert other.load_unit(key, 40.0) is None and other.load_baseline(key, 40.0)[1] == {"ndct": 7.0}
    with pytest.raises(InputError, match="other settings"):
        evaluate.UnitCache(folder, {**settings, "draws": 3}, denoisers="abc")
