"""The model-card evaluation: every method on the held-out volume, quarter dose simulated with a fixed seed.

``langmamba evaluate`` runs it on the sample study's lung2 (never used for training or tuning) and writes
``metrics.json`` and a figure showing the same slice for every method.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import metrics
from .normalization import hu_to_model, model_to_hu

logger = logging.getLogger(__name__)

METHOD_ORDER = ("ldct", "bm3d", "redcnn", "langmamba_no_langda", "langmamba")
METHOD_TITLES = {"ndct": "normal dose", "ldct": "quarter dose (input)", "bm3d": "BM3D", "redcnn": "RED-CNN",
                 "langmamba_no_langda": "LangMamba w/o LangDA", "langmamba": "LangMamba"}
NOISE_ROI_PX = 11


def noise_roi(normal: np.ndarray, body: np.ndarray, size: int = NOISE_ROI_PX) -> np.ndarray:
    """The most uniform soft-tissue square (``size`` px) of each slice, chosen on the normal-dose image.

    Candidates lie inside the eroded body with a local mean of 0–100 HU; the square with the lowest local
    standard deviation wins. Slices without such a square get no ROI. Returns a boolean mask (Z, H, W).
    """
    roi = np.zeros(normal.shape, dtype=bool)
    half = size // 2
    for z in range(normal.shape[0]):
        image = normal[z].astype(np.float64)
        mean = ndimage.uniform_filter(image, size)
        std = np.sqrt(np.maximum(ndimage.uniform_filter(image**2, size) - mean**2, 0))
        allowed = ndimage.binary_erosion(body[z], iterations=size) & (mean > 0) & (mean < 100)
        if not allowed.any():
            continue
        row, col = np.unravel_index(np.argmin(np.where(allowed, std, np.inf)), std.shape)
        roi[z, row - half:row + half + 1, col - half:col - half + size] = True
    return roi


def lesion_background(reference: np.ndarray, lesion: np.ndarray, body: np.ndarray,
                      spacing_mm: tuple[float, float], lung_hu: float = -400.0) -> np.ndarray:
    """The lesion's background: a 2–8 mm ring around it, restricted to its dominant tissue on the normal dose.

    A lung nodule's ring holds lung and chest wall; mixing them would make σ measure anatomy, not noise, so the
    ring keeps only its aerated (< ``lung_hu``) or only its dense part, whichever is larger.
    """
    ring = metrics.background_ring(lesion, 2.0, 8.0, spacing_mm, within=body)
    aerated = ring & (reference < lung_hu)
    dense = ring & (reference >= lung_hu)
    return aerated if aerated.sum() >= dense.sum() else dense


def score_methods(outputs: dict[str, np.ndarray], reference: np.ndarray, *, label: np.ndarray | None = None,
                  spacing_mm: tuple[float, float] = (1.0, 1.0)) -> dict:
    """Metrics of every method's output against the normal-dose ``reference`` (all (Z, H, W) HU).

    Returns ``{"window_-160_240": {method: {psnr, ssim, rmse}}, "window_-1000_1000": {...}, "noise_sigma_hu":
    {method: σ}, "lesion_cnr": {method: CNR}}``; noise σ is the mean standard deviation inside the per-slice
    uniform ROIs of :func:`noise_roi` (the normal-dose image's own σ is reported under ``"ndct"``).
    """
    body = metrics.body_mask(reference)
    roi = noise_roi(reference, body)
    result: dict = {}
    for window_name, window in metrics.WINDOWS.items():
        result[f"window_{window_name}"] = {
            name: {"psnr": metrics.psnr(out, reference, window), "ssim": metrics.ssim(out, reference, window),
                   "rmse": metrics.rmse(out, reference, window)}
            for name, out in outputs.items()}
    slices = [z for z in range(reference.shape[0]) if roi[z].any()]
    result["noise_sigma_hu"] = {name: float(np.mean([np.std(out[z][roi[z]], ddof=1) for z in slices]))
                                for name, out in {"ndct": reference, **outputs}.items()} if slices else {}
    if label is not None and np.asarray(label).any():
        lesion = np.asarray(label) > 0
        background = lesion_background(reference, lesion, body, spacing_mm)
        result["lesion_cnr"] = {name: metrics.cnr(out, lesion, background)
                                for name, out in {"ndct": reference, **outputs}.items()}
    return result


@torch.no_grad()
def finest_words(model, hu: np.ndarray, batch_size: int = 4, device: str = "cpu") -> np.ndarray:
    """Top word id of every finest-level region, (Z, g_h, g_w), from the LangMamba's frozen LangAE."""
    langae = model.langae.to(device=device, dtype=torch.float32).eval()
    factor = langae.downsample_factor
    ids = []
    for start in range(0, hu.shape[0], batch_size):
        x = torch.from_numpy(hu_to_model(np.asarray(hu[start:start + batch_size], np.float32)))[:, None].to(device)
        pad_h, pad_w = -x.shape[-2] % factor, -x.shape[-1] % factor
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        out = langae.quantize(langae.encode(x), details=False)
        # The top word each finest region reads (for the averaging quantizer, its token).
        level = len(out.region_latents) - 1
        ids.append(langae.quantizer.word_probabilities(out.region_latents[level], level).argmax(-1).cpu().numpy())
    return np.concatenate(ids)


def explanation_stability(model, denoised: np.ndarray, reference: np.ndarray, device: str = "cpu") -> float:
    """Share of finest-level regions whose word for the denoised image equals that for the normal dose."""
    return float(np.mean(finest_words(model, denoised, device=device) == finest_words(model, reference, device=device)))


def bm3d_denoise(hu: np.ndarray, sigma_hu: float, progress: bool = False) -> np.ndarray:
    """BM3D (package ``bm3d``) slice by slice in the model's intensity range, noise σ given in HU."""
    import bm3d
    from tqdm.auto import tqdm

    sigma = sigma_hu / 3000.0  # the model range spans 3000 HU
    out = np.empty_like(hu, dtype=np.float32)
    for z in tqdm(range(hu.shape[0]), desc="BM3D", disable=not progress):
        out[z] = model_to_hu(bm3d.bm3d(hu_to_model(hu[z].astype(np.float64)), sigma).astype(np.float32))
    return out


def tune_bm3d_sigma(low: np.ndarray, normal: np.ndarray, candidates_hu=(10, 15, 20, 25, 30, 40, 50)
                    ) -> tuple[float, dict]:
    """The BM3D σ (HU) with the best PSNR ([-160, 240] window) on tuning slices; also every score tried."""
    scores = {float(s): metrics.psnr(bm3d_denoise(low, s), normal) for s in candidates_hu}
    return max(scores, key=scores.get), scores


def comparison_figure_all(images: dict[str, np.ndarray], slice_index: int, spacing_mm: tuple[float, float], path: Path,
                          crop: tuple[slice, slice] | None = None) -> Path:
    """One row per display window, one column per method, the same slice everywhere."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .visualize import CT_WINDOWS, save_figure

    names = list(images)
    windows = [("soft tissue", CT_WINDOWS["soft tissue"]), ("lung", CT_WINDOWS["lung"])]
    fig, axes = plt.subplots(len(windows), len(names), figsize=(3.2 * len(names), 3.4 * len(windows)), squeeze=False)
    for row, (window_name, window) in enumerate(windows):
        for col, name in enumerate(names):
            image = images[name][slice_index]
            if crop is not None:
                image = image[crop]
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=spacing_mm[0] / spacing_mm[1])
            ax.set_axis_off()
            if row == 0:
                ax.set_title(METHOD_TITLES.get(name, name), fontsize=10)
        axes[row, 0].text(-0.05, 0.5, window_name, transform=axes[row, 0].transAxes, rotation=90, va="center",
                          ha="right", fontsize=10)
    fig.suptitle(f"held-out lung2, slice {slice_index}, simulated quarter dose", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def write_json(data: dict, path: Path) -> Path:
    """Write JSON atomically (written beside ``path``, then renamed into place)."""
    from .io.atomic import atomic_output

    path = Path(path)
    with atomic_output(path, as_folder=False, overwrite=True) as staging:
        (staging / path.name).write_text(json.dumps(data, indent=2) + "\n")
    return path


EVALUATION_SEED = 20250707
TUNING_SLICES = (16, 24, 32)  # lung1 slices BM3D's σ is tuned on (training data; lung2 is never tuned on)


def explanation_metrics(weights: Path, model, normal: np.ndarray, low: np.ndarray, denoised: np.ndarray,
                        label: np.ndarray, *, device: str, max_slices: int | None) -> dict:
    """:func:`langmamba.evaluate_explanations.evaluate_explanations` of the LangMamba's words on lung2, with the
    reconstruction of the LangAE checkpoint ``weights/langae`` (the shipped LangMamba has no LangAE decoder)."""
    from .checkpoint import load_checkpoint
    from .evaluate_explanations import evaluate_explanations

    command = f"langmamba evaluate --weights {weights}" + (f" --slices {max_slices}" if max_slices else "")
    result = evaluate_explanations(model, normal, low, denoised, label, device=device, command=command)
    if (Path(weights) / "langae").is_dir():
        langae = evaluate_explanations(load_checkpoint(Path(weights) / "langae"), normal, low, device=device,
                                       flags=False)
        result["reconstruction"] = {"checkpoint": "langae", **langae["reconstruction"]}
    return result


def run_evaluation(weights: Path, output_json: Path, figure: Path, *, dose: float = 0.25,
                   seed: int = EVALUATION_SEED, bm3d_sigma_hu: float | None = None, device: str = "auto",
                   max_slices: int | None = None, progress: bool = True) -> dict:
    """Evaluate every method on the held-out lung2 volume and write ``output_json`` and ``figure``."""
    from .checkpoint import load_checkpoint
    from .infer import denoise_slices, resolve_device
    from .io import read_volume
    from .sample_data import sample_path
    from .simulate import simulate_volume

    device = str(resolve_device(device))
    normal = read_volume(sample_path("lung2", "image"))
    label = read_volume(sample_path("lung2", "label"), check_hu=False).hu > 0
    if max_slices is not None:
        start = (normal.shape[0] - max_slices) // 2
        normal, label = normal.with_hu(normal.hu[start:start + max_slices]), label[start:start + max_slices]
    spacing = (normal.spacing[1], normal.spacing[0])
    low = simulate_volume(normal, dose=dose, seed=seed, device=device, progress=progress).hu

    tried = {}
    if bm3d_sigma_hu is None:
        tuning = read_volume(sample_path("lung1", "image"))
        tuning_normal = tuning.hu[list(TUNING_SLICES)]
        tuning_low = simulate_volume(tuning.with_hu(tuning_normal), dose=dose, seed=seed + 1, device=device).hu
        bm3d_sigma_hu, tried = tune_bm3d_sigma(tuning_low, tuning_normal)
        logger.info("BM3D σ tuned on lung1: %s -> %.1f HU", tried, bm3d_sigma_hu)

    outputs = {"ldct": low, "bm3d": bm3d_denoise(low, bm3d_sigma_hu, progress=progress)}
    models = {}
    for name in ("redcnn", "langmamba_no_langda", "langmamba"):
        models[name] = load_checkpoint(Path(weights) / name)
        outputs[name] = denoise_slices(models[name], low, device=device, progress=progress)

    scores = score_methods(outputs, normal.hu, label=label, spacing_mm=spacing)
    result = {
        "test_volume": "lung2",
        "dose": dose,
        "seed": seed,
        "slices": int(normal.shape[0]),
        **{key: scores[key] for key in ("window_-160_240", "window_-1000_1000")},
        "explanation_stability": explanation_stability(models["langmamba"], outputs["langmamba"], normal.hu,
                                                       device=device),
        "explanation_stability_no_langda": explanation_stability(models["langmamba"],
                                                                 outputs["langmamba_no_langda"], normal.hu,
                                                                 device=device),
        "noise_sigma_hu": scores.get("noise_sigma_hu", {}),
        "lesion_cnr": scores.get("lesion_cnr", {}),
        "bm3d_sigma_hu": bm3d_sigma_hu,
        "bm3d_sigma_tuning_psnr": tried,
        "protocol": "PSNR/SSIM per slice in the window scaled to [0, 1] (data range 1), averaged; RMSE in HU after "
                    "window clipping; quarter dose simulated by langmamba.simulate (noise insertion) on lung2",
    }
    result["explanations"] = explanation_metrics(weights, models["langmamba"], normal.hu, low, outputs["langmamba"],
                                                 label, device=device, max_slices=max_slices)
    write_json(result, output_json)
    lesion_slices = np.nonzero(label.any(axis=(1, 2)))[0]
    shown = int(lesion_slices[len(lesion_slices) // 2]) if len(lesion_slices) else normal.shape[0] // 2
    comparison_figure_all({"ndct": normal.hu, **outputs}, shown, spacing, figure)
    return result


def markdown_table(result: dict) -> str:
    """The model card's results table (markdown) from a ``metrics.json`` document."""
    lines = ["| method | PSNR [-160,240] dB | SSIM [-160,240] | RMSE [-160,240] HU | PSNR [-1000,1000] dB | "
             "SSIM [-1000,1000] | noise σ HU | lesion CNR |", "|---|---|---|---|---|---|---|---|"]
    noise, cnr = result.get("noise_sigma_hu", {}), result.get("lesion_cnr", {})
    for name in METHOD_ORDER:
        narrow, wide = result["window_-160_240"][name], result["window_-1000_1000"][name]
        lines.append(f"| {METHOD_TITLES[name]} | {narrow['psnr']:.2f} | {narrow['ssim']:.4f} | {narrow['rmse']:.2f} | "
                     f"{wide['psnr']:.2f} | {wide['ssim']:.4f} | {noise.get(name, float('nan')):.2f} | "
                     f"{cnr.get(name, float('nan')):.2f} |")
    lines.append(f"| {METHOD_TITLES['ndct']} (reference) | – | – | – | – | – | "
                 f"{noise.get('ndct', float('nan')):.2f} | {cnr.get('ndct', float('nan')):.2f} |")
    return "\n".join(lines)
