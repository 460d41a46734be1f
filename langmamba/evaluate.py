"""The model-card evaluation: every method on the held-out lung2 and on every validation patient, at several
doses, several noise draws, with paired bootstrap confidence intervals.

Protocol (``langmamba evaluate``):

- cases: ``lung2`` (test; never trained or tuned on) and the validation patients of the prepared training set,
  normal dose, read from the sample cache and the prepared set, or from one ``.npz`` written by
  ``--export-npz`` (so a GPU host with only numpy, scipy, torch and bm3d can run it);
- for each dose (0.5, 0.25, 0.1) and noise draw (3, seeded), a low-dose scan is simulated
  (:func:`langmamba.simulate.simulate_batch`) and denoised by every method: the input itself (``ldct``, the
  trivial baseline), BM3D (σ tuned per dose on the validation cases only), RED-CNN, LangMamba without LangDA and
  LangMamba;
- per slice: PSNR and SSIM in the [-160, 240] and [-1000, 1000] HU windows (window scaled to [0, 1]); a case's
  score is the mean over slices and draws; each method's difference to LangMamba and each method's gain over the
  input are given with a paired percentile-bootstrap 95 % interval over slices (per-slice scores averaged over
  draws first);
- noise σ: standard deviation inside uniform soft-tissue squares chosen on a smoothed normal-dose image
  (:func:`noise_roi`), so the choice does not favour any method's output nor the reference's own noise.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import multiprocessing
import os
import time
import zlib
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import metrics
from .errors import InputError
from .eval_cases import TEST_CASE, EvalCase, spread_indices
from .io.atomic import write_npz, write_text
from .normalization import hu_to_model, model_to_hu
from .simulate.protocol import ScanProtocol

logger = logging.getLogger(__name__)

METHOD_ORDER = ("ldct", "bm3d", "redcnn", "langmamba_no_langda", "langmamba")
MODEL_METHODS = ("redcnn", "langmamba_no_langda", "langmamba")
METHOD_TITLES = {
    "ndct": "normal dose",
    "ldct": "low dose (input)",
    "bm3d": "BM3D",
    "redcnn": "RED-CNN",
    "langmamba_no_langda": "LangMamba w/o LangDA",
    "langmamba": "LangMamba",
}
REFERENCE_METHOD = "langmamba"
DOSES = (0.5, 0.25, 0.1)
DRAWS = 3
HEADLINE_DOSE = 0.25
NOISE_ROI_PX = 11
NOISE_ROIS_PER_SLICE = 4
BM3D_SIGMAS_HU = (10, 15, 20, 25, 30, 40, 50, 65, 80, 100, 130, 160, 200)
EVALUATION_SEED = 20250707
TUNING_SLICES = (16, 24, 32)  # lung1 (training) slices for BM3D's σ when no validation case is given
TUNING_SLICES_PER_CASE = 2


def noise_roi(
    normal: np.ndarray, body: np.ndarray, size: int = NOISE_ROI_PX, per_slice: int = NOISE_ROIS_PER_SLICE
) -> np.ndarray:
    """Up to ``per_slice`` non-overlapping uniform soft-tissue squares (``size`` px) per slice, (Z, H, W) bool.

    The squares are chosen on the normal-dose image smoothed by a Gaussian (σ = 2 px): inside the eroded body,
    local mean 0–100 HU, lowest local structure (standard deviation of the smoothed image). Smoothing removes
    most of the reference's own noise from the choice, so the ROIs are not picked where one image happens to be
    quiet, and σ measured in them is not biased towards any method or the reference.
    """
    roi = np.zeros(normal.shape, dtype=bool)
    half = size // 2
    for z in range(normal.shape[0]):
        smooth = ndimage.gaussian_filter(normal[z].astype(np.float64), 2.0)
        mean = ndimage.uniform_filter(smooth, size)
        structure = np.sqrt(np.maximum(ndimage.uniform_filter(smooth**2, size) - mean**2, 0))
        allowed = ndimage.binary_erosion(body[z], iterations=size) & (mean > 0) & (mean < 100)
        score = np.where(allowed, structure, np.inf)
        for _ in range(per_slice):
            index = int(np.argmin(score))
            if not np.isfinite(score.flat[index]):
                break
            row, col = np.unravel_index(index, score.shape)
            roi[z, row - half : row - half + size, col - half : col - half + size] = True
            score[max(0, row - size) : row + size + 1, max(0, col - size) : col + size + 1] = np.inf
    return roi


def lesion_background(
    reference: np.ndarray,
    lesion: np.ndarray,
    body: np.ndarray,
    spacing_mm: tuple[float, float],
    lung_hu: float = -400.0,
) -> np.ndarray:
    """The lesion's background: a 2–8 mm ring around it, restricted to its dominant tissue on the normal dose.

    A lung nodule's ring holds lung and chest wall; mixing them would make σ measure anatomy, not noise, so the
    ring keeps only its aerated (< ``lung_hu``) or only its dense part, whichever is larger.
    """
    ring = metrics.background_ring(lesion, 2.0, 8.0, spacing_mm, within=body)
    aerated = ring & (reference < lung_hu)
    dense = ring & (reference >= lung_hu)
    return aerated if aerated.sum() >= dense.sum() else dense


def _roi_sigma(image: np.ndarray, roi: np.ndarray) -> float:
    """Mean over slices of the per-square standard deviation inside ``roi`` (HU)."""
    values = []
    for z in range(image.shape[0]):
        labels, count = ndimage.label(roi[z])
        values += [np.std(image[z][labels == k], ddof=1) for k in range(1, count + 1)]
    return float(np.mean(values)) if values else float("nan")


def score_methods(
    outputs: dict[str, np.ndarray],
    reference: np.ndarray,
    *,
    label: np.ndarray | None = None,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
) -> dict:
    """Metrics of every method's output against the normal-dose ``reference`` (all (Z, H, W) HU).

    Returns ``{"window_-160_240": {method: {psnr, ssim, rmse}}, "window_-1000_1000": {...}, "noise_sigma_hu":
    {method: σ}, "lesion_cnr": {method: CNR}}``; noise σ is measured in the squares of :func:`noise_roi` (the
    normal-dose image's own σ is reported under ``"ndct"``).
    """
    body = metrics.body_mask(reference)
    roi = noise_roi(reference, body)
    result: dict = {}
    for window_name, window in metrics.WINDOWS.items():
        result[f"window_{window_name}"] = {
            name: {
                "psnr": metrics.psnr(out, reference, window),
                "ssim": metrics.ssim(out, reference, window),
                "rmse": metrics.rmse(out, reference, window),
            }
            for name, out in outputs.items()
        }
    result["noise_sigma_hu"] = (
        {name: _roi_sigma(out, roi) for name, out in {"ndct": reference, **outputs}.items()} if roi.any() else {}
    )
    if label is not None and np.asarray(label).any():
        lesion = np.asarray(label) > 0
        background = lesion_background(reference, lesion, body, spacing_mm)
        result["lesion_cnr"] = {
            name: metrics.cnr(out, lesion, background) for name, out in {"ndct": reference, **outputs}.items()
        }
    return result


def per_slice_scores(output: np.ndarray, reference: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """``{window: {"psnr": (Z,), "ssim": (Z,)}}`` of one output against the reference, one value per slice."""
    return {
        f"window_{name}": {
            "psnr": np.array([metrics.psnr(o, r, window) for o, r in zip(output, reference)]),
            "ssim": np.array([metrics.ssim(o, r, window) for o, r in zip(output, reference)]),
        }
        for name, window in metrics.WINDOWS.items()
    }


def _scores_job(args: tuple[np.ndarray, np.ndarray]) -> dict:
    return per_slice_scores(*args)


@torch.no_grad()
def finest_words(model, hu: np.ndarray, batch_size: int = 4, device: str = "cpu") -> np.ndarray:
    """Top word id of every finest-level region, (Z, g_h, g_w), from the LangMamba's frozen LangAE (for the
    averaging quantizer of the first LangAE, its token)."""
    langae = model.langae.to(device=device, dtype=torch.float32).eval()
    factor = langae.downsample_factor
    ids = []
    for start in range(0, hu.shape[0], batch_size):
        x = torch.from_numpy(hu_to_model(np.asarray(hu[start : start + batch_size], np.float32)))[:, None].to(device)
        pad_h, pad_w = -x.shape[-2] % factor, -x.shape[-1] % factor
        x = torch.nn.functional.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x
        out = langae.quantize(langae.encode(x), details=False)
        level = len(out.region_latents) - 1
        ids.append(langae.quantizer.word_probabilities(out.region_latents[level], level).argmax(-1).cpu().numpy())
    return np.concatenate(ids)


def explanation_stability(model, denoised: np.ndarray, reference: np.ndarray, device: str = "cpu") -> float:
    """Share of finest-level regions whose word for the denoised image equals that for the normal dose."""
    return float(np.mean(finest_words(model, denoised, device=device) == finest_words(model, reference, device=device)))


def explanation_metrics(
    weights: Path,
    model,
    normal: np.ndarray,
    low: np.ndarray,
    denoised: np.ndarray,
    label: np.ndarray,
    *,
    device: str,
    max_slices: int | None,
) -> dict:
    """The ``explanations`` section of metrics.json: :func:`langmamba.evaluate_explanations.evaluate_explanations`
    of the LangMamba's words on lung2 (headline dose, draw 0), with the reconstruction of the LangAE checkpoint
    ``weights/langae`` (the shipped LangMamba has no LangAE decoder)."""
    from .checkpoint import load_checkpoint
    from .evaluate_explanations import evaluate_explanations

    command = f"langmamba evaluate --weights {weights}" + (f" --slices {max_slices}" if max_slices else "")
    result = evaluate_explanations(model, normal, low, denoised, label, device=device, command=command)
    if (Path(weights) / "langae").is_dir():
        langae = evaluate_explanations(
            load_checkpoint(Path(weights) / "langae"), normal, low, device=device, flags=False
        )
        result["reconstruction"] = {"checkpoint": "langae", **langae["reconstruction"]}
    return result


def _bm3d_slice(args: tuple[np.ndarray, float]) -> np.ndarray:
    import bm3d

    image, sigma_hu = args
    sigma = sigma_hu / 3000.0  # the model range spans 3000 HU
    return model_to_hu(bm3d.bm3d(hu_to_model(image.astype(np.float64)), sigma).astype(np.float32))


def bm3d_denoise(
    hu: np.ndarray, sigma_hu: float, progress: bool = False, workers: int = 1, pool: Executor | None = None
) -> np.ndarray:
    """BM3D (package ``bm3d``) slice by slice in the model's intensity range, noise σ given in HU; the slices
    are shared by ``pool`` (or by ``workers`` new processes)."""
    from tqdm.auto import tqdm

    jobs = [(hu[z], float(sigma_hu)) for z in range(hu.shape[0])]
    if pool is None and workers > 1 and len(jobs) > 1:
        with bm3d_pool(min(workers, len(jobs))) as own:
            return bm3d_denoise(hu, sigma_hu, progress, pool=own)
    mapper = pool.map if pool is not None else map
    slices = list(tqdm(mapper(_bm3d_slice, jobs), total=len(jobs), desc="BM3D", disable=not progress))
    return np.stack(slices).astype(np.float32)


def bm3d_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for BM3D, started fresh (``spawn``): forking a process that holds CUDA is unsafe."""
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))


def tune_bm3d_sigma(
    low: np.ndarray, normal: np.ndarray, candidates_hu=BM3D_SIGMAS_HU, workers: int = 1
) -> tuple[float, dict]:
    """The BM3D σ (HU) with the best PSNR ([-160, 240] window) on tuning slices; also every score tried."""
    scores = {float(s): metrics.psnr(bm3d_denoise(low, s, workers=workers), normal) for s in candidates_hu}
    return max(scores, key=scores.get), scores


def case_seed(seed: int, case: str, dose: float, draw: int) -> int:
    """The simulation seed of one case, dose and draw (stable across runs and machines)."""
    return int(seed) + 1_000_003 * draw + 7919 * round(1000 * dose) + zlib.crc32(case.encode()) % 1_000_000


def simulate_case(case: EvalCase, dose: float, seed: int, device: str, chunk: int = 8) -> np.ndarray:
    """A low-dose realisation of ``case.hu`` (Z, H, W) HU; slice ``z`` always gets the same noise for a seed."""
    from .simulate import derive_slice_seeds, simulate_batch

    seeds = derive_slice_seeds(seed, case.hu.shape[0])
    return np.concatenate(
        [
            simulate_batch(case.hu[s : s + chunk], case.spacing_mm, dose, seed=seeds[s : s + chunk], device=device)
            for s in range(0, case.hu.shape[0], chunk)
        ]
    )


def comparison_figure_all(
    images: dict[str, np.ndarray],
    slice_index: int,
    spacing_mm: tuple[float, float],
    path: Path,
    crop: tuple[slice, slice] | None = None,
    title: str | None = None,
) -> Path:
    """Rows: the whole slice in the soft-tissue and lung windows, then (with ``crop``) the zoomed crop in both;
    one column per method, the same slice everywhere. The crop is outlined on the whole-slice rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from .visualize import CT_WINDOWS, save_figure

    names = list(images)
    windows = [("soft tissue", CT_WINDOWS["soft tissue"]), ("lung", CT_WINDOWS["lung"])]
    rows = [(w, None) for w in windows] + ([(w, crop) for w in windows] if crop is not None else [])
    fig, axes = plt.subplots(len(rows), len(names), figsize=(3.0 * len(names), 3.1 * len(rows)), squeeze=False)
    for row, ((window_name, window), region) in enumerate(rows):
        for col, name in enumerate(names):
            image = images[name][slice_index]
            image = image[region] if region is not None else image
            ax = axes[row, col]
            ax.imshow(
                image,
                cmap="gray",
                vmin=window[0],
                vmax=window[1],
                aspect=spacing_mm[0] / spacing_mm[1],
                interpolation="nearest" if region is not None else "antialiased",
            )
            if region is None and crop is not None:
                ax.add_patch(
                    Rectangle(
                        (crop[1].start, crop[0].start),
                        crop[1].stop - crop[1].start,
                        crop[0].stop - crop[0].start,
                        fill=False,
                        edgecolor="yellow",
                        linewidth=1,
                    )
                )
            ax.set_axis_off()
            if row == 0:
                ax.set_title(METHOD_TITLES.get(name, name), fontsize=10)
        axes[row, 0].text(
            -0.05,
            0.5,
            window_name + (" (zoom)" if region is not None else ""),
            transform=axes[row, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=10,
        )
    fig.suptitle(title or f"held-out lung2, slice {slice_index}", fontsize=12)
    fig.tight_layout()
    return save_figure(fig, path)


def lesion_crop(label: np.ndarray, margin_px: int = 40) -> tuple[slice, slice] | None:
    """A square around the lesion of a 2-D mask, ``margin_px`` beyond its extent (``None`` without a lesion)."""
    rows, cols = np.nonzero(label)
    if rows.size == 0:
        return None
    centre_r, centre_c = (rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2
    half = max(rows.max() - rows.min(), cols.max() - cols.min()) // 2 + margin_px
    top = int(np.clip(centre_r - half, 0, max(0, label.shape[0] - 2 * half)))
    left = int(np.clip(centre_c - half, 0, max(0, label.shape[1] - 2 * half)))
    return slice(top, top + 2 * half), slice(left, left + 2 * half)


def draw_figure(figure_data: str | Path, figure: str | Path) -> Path:
    """Draw the comparison figure from the ``.npz`` that :func:`run_evaluation` writes beside metrics.json (for
    hosts without matplotlib: evaluate there, draw here)."""
    with np.load(figure_data, allow_pickle=False) as archive:
        names = [str(n) for n in archive["names"]]
        images = {n: archive[f"image/{n}"].astype(np.float32)[None] for n in names}
        crop = tuple(slice(int(a), int(b)) for a, b in archive["crop"]) if "crop" in archive else None
        spacing = tuple(float(v) for v in archive["spacing_mm"])
        title = str(archive["title"])
    return comparison_figure_all(images, 0, spacing, Path(figure), crop=crop, title=title)


def write_json(data: dict, path: Path) -> Path:
    """Write JSON atomically (written beside ``path``, then renamed into place)."""
    return write_text(path, json.dumps(data, indent=2) + "\n")


def _mean(values) -> float:
    return float(np.mean(values))


def summarise(per_slice: dict[str, dict], *, resamples: int = 2000, seed: int = 0) -> dict:
    """Case/dose summary from ``per_slice[method][window][metric]`` = (draws, Z) arrays: means, per-draw means,
    differences to LangMamba and gains over the input with paired bootstrap 95 % intervals over slices."""
    out: dict = {}
    methods = list(per_slice)
    for window in next(iter(per_slice.values())):
        section: dict = {}
        for method in methods:
            section[method] = {}
            for metric, values in per_slice[method][window].items():
                section[method][metric] = _mean(values)
                section[method][f"{metric}_per_draw"] = [float(v) for v in np.mean(values, axis=1)]
        differences: dict = {}
        gains: dict = {}
        for method in methods:
            for metric in ("psnr", "ssim"):
                mine = np.mean(per_slice[method][window][metric], axis=0)
                if REFERENCE_METHOD in per_slice and method != REFERENCE_METHOD:
                    reference = np.mean(per_slice[REFERENCE_METHOD][window][metric], axis=0)
                    differences.setdefault(method, {})[metric] = metrics.paired_bootstrap_ci(
                        mine, reference, resamples=resamples, seed=seed
                    )
                if "ldct" in per_slice and method != "ldct":
                    baseline = np.mean(per_slice["ldct"][window][metric], axis=0)
                    gains.setdefault(method, {})[metric] = metrics.paired_bootstrap_ci(
                        mine, baseline, resamples=resamples, seed=seed
                    )
        section["difference_to_langmamba"] = differences
        section["gain_over_input"] = gains
        out[window] = section
    return out


def _pool(blocks: list[dict]) -> dict:
    """Concatenate per-slice arrays of several cases along the slice axis."""
    pooled: dict = {}
    for method in blocks[0]:
        pooled[method] = {
            window: {
                metric: np.concatenate([b[method][window][metric] for b in blocks], axis=1)
                for metric in blocks[0][method][window]
            }
            for window in blocks[0][method]
        }
    return pooled


def _tuning_set(cases: list[EvalCase]) -> tuple[list[EvalCase], str]:
    validation = [c for c in cases if c.role == "validation"]
    if validation:
        picked = []
        for c in validation:
            index = spread_indices(c.hu.shape[0], TUNING_SLICES_PER_CASE)
            picked.append(EvalCase(c.name, c.hu[index], c.spacing_mm, c.role))
        return picked, "validation cases " + ", ".join(c.name for c in validation)
    from .io import read_volume
    from .sample_data import sample_path

    tuning = read_volume(sample_path("lung1", "image"))
    return (
        [
            EvalCase(
                "lung1",
                tuning.hu[list(TUNING_SLICES)].astype(np.float32),
                (float(tuning.spacing[1]), float(tuning.spacing[0])),
                "training",
            )
        ],
        "lung1 training slices (no validation case given)",
    )


def tune_bm3d_per_dose(
    cases: list[EvalCase],
    doses,
    seed: int,
    device: str,
    pool: Executor | None = None,
    candidates_hu=BM3D_SIGMAS_HU,
    known: dict | None = None,
) -> tuple[dict, str]:
    """BM3D σ per dose, tuned on the validation cases only (never on lung2); returns ``({dose: {"sigma_hu",
    "psnr_tried"}}, source)``. ``known`` (an earlier result) supplies the scores of σ values already tried, so
    only new candidates are run; the best of ``candidates_hu`` is chosen."""
    tuning, source = _tuning_set(cases)
    tuned = {}
    mapper = pool.map if pool is not None else map
    for dose in doses:
        tried = {float(k): v for k, v in ((known or {}).get(dose) or {}).get("psnr_tried", {}).items()}
        missing = [float(s) for s in candidates_hu if float(s) not in tried]
        if missing:
            lows = [simulate_case(c, dose, case_seed(seed + 1, c.name, dose, 0), device) for c in tuning]
            jobs = [
                (low[z], sigma, k, z) for sigma in missing for k, low in enumerate(lows) for z in range(low.shape[0])
            ]
            outputs = list(mapper(_bm3d_slice, [job[:2] for job in jobs]))
            scores: dict[float, list] = {}
            for (_, sigma, k, z), out in zip(jobs, outputs):
                scores.setdefault(sigma, []).append(metrics.psnr(out, tuning[k].hu[z]))
            tried |= {sigma: _mean(v) for sigma, v in scores.items()}
        candidates = {float(s): tried[float(s)] for s in candidates_hu}
        best = max(candidates, key=candidates.get)
        tuned[dose] = {"sigma_hu": best, "psnr_tried": {str(k): v for k, v in sorted(tried.items())}}
        logger.info("BM3D σ at dose %s tuned on %s: %.1f HU", dose, source, best)
    return tuned, source


class EvaluationIncomplete(Exception):
    """The time budget ran out; the finished parts are in the cache folder: run again with the same cache."""


BASELINE_METHODS = ("ldct", "bm3d")
"""Methods whose results depend on the cases, doses, draws, seed and BM3D settings but not on the weights."""


def _is_shared(method: str) -> bool:
    """Whether a unit's entry of ``method`` is shared by all weights: the baselines and the normal dose."""
    return method in BASELINE_METHODS or method == "ndct"


class UnitCache:
    """Finished (case, dose, draw) units of an evaluation on disk, so a run can stop and continue later.

    Without a folder nothing is kept. One folder serves any weights: the parts that do not depend on them (the
    low-dose input and BM3D: ``unit-<key>.npz``, ``bm3d.json``) sit at the top and are shared, and each set of
    denoisers (:func:`denoiser_fingerprint`) has its own subfolder ``denoisers-<digest>/`` with its models'
    ``unit-<key>.npz``, ``headline.json`` and figure data. ``settings.json`` holds the rest of the settings (a
    folder made with other settings is refused). A folder of the earlier layout (everything at the top, the
    digest in ``settings.json``) is moved into this one when it is opened.
    """

    def __init__(self, folder: Path | None, settings: dict, denoisers: str = "") -> None:
        self.folder = None if folder is None else Path(folder)
        self.models: Path | None = None
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        stored = self.folder / "settings.json"
        if stored.exists():
            before = json.loads(stored.read_text())
            earlier = dict(before)
            if "denoisers" in before:
                self._migrate(str(before.pop("denoisers")) + ("-tta" if before.pop("tta", False) else ""))
            if before.pop("candidates", None) is not None:  # BM3D's candidates now live in bm3d.json
                self._stamp_bm3d_sigmas()
            if before != earlier:
                write_text(stored, json.dumps(before, sort_keys=True))
        text = json.dumps(settings, sort_keys=True)
        if stored.exists() and stored.read_text() != text:
            raise InputError(f"the evaluation cache {self.folder} was made with other settings; use a new folder")
        write_text(stored, text)
        self.models = self.folder / f"denoisers-{denoisers}"
        self.models.mkdir(exist_ok=True)

    def _migrate(self, digest: str) -> None:
        """Split the units of the earlier layout into the shared part and the part of the weights ``digest``."""
        assert self.folder is not None
        models = self.folder / f"denoisers-{digest}"
        models.mkdir(exist_ok=True)
        for unit in sorted(self.folder.glob("unit-*.npz")):
            arrays = _read_unit_arrays(unit)
            write_npz(models / unit.name, {k: v for k, v in arrays.items() if not _shared_array(k)}, compressed=False)
            write_npz(unit, {k: v for k, v in arrays.items() if _shared_array(k)}, compressed=False)
        for name in ("headline.json", "metrics_figure.npz"):
            if (self.folder / name).exists():
                (self.folder / name).replace(models / name)
        logger.info("evaluation cache %s: moved the parts of weights %s into %s", self.folder, digest, models.name)

    def _stamp_bm3d_sigmas(self) -> None:
        """Units made before they recorded their BM3D σ were made with the σ of their dose in ``bm3d.json``."""
        assert self.folder is not None
        tuning = self.folder / "bm3d.json"
        if not tuning.exists():
            return
        sigma_of_dose = {
            round(1000 * float(d)): float(v["sigma_hu"]) for d, v in json.loads(tuning.read_text())["tuned"].items()
        }
        for unit in sorted(self.folder.glob("unit-*.npz")):
            arrays = _read_unit_arrays(unit)
            dose_key = int(unit.stem.split("-")[2])
            if "bm3d_sigma" not in arrays and dose_key in sigma_of_dose:
                write_npz(unit, {**arrays, "bm3d_sigma": np.array(sigma_of_dose[dose_key])}, compressed=False)

    def _path(self, name: str, shared: bool) -> Path:
        assert self.folder is not None and self.models is not None
        return (self.folder if shared else self.models) / name

    def load_json(self, name: str, shared: bool = False):
        """``bm3d.json`` is shared (``shared=True``); ``headline.json`` belongs to the weights."""
        if self.folder is None or not self._path(name, shared).exists():
            return None
        return json.loads(self._path(name, shared).read_text())

    def save_json(self, name: str, value, shared: bool = False) -> None:
        if self.folder is not None:
            write_text(self._path(name, shared), json.dumps(value))

    @staticmethod
    def key(case: str, dose: float, draw: int) -> str:
        return f"{zlib.crc32(case.encode()):08x}-{round(1000 * dose):04d}-{draw}"

    @staticmethod
    def _parse(arrays: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
        """``(scores, noise σ, seconds)`` from a unit file's arrays."""
        scores: dict = {}
        sigmas: dict = {}
        seconds: dict = {}
        for name, value in arrays.items():
            if name == "bm3d_sigma":
                continue
            kind, method, *rest = name.split("/")
            if kind == "sigma":
                sigmas[method] = float(value)
            elif kind == "seconds":
                seconds[method] = float(value)
            else:
                scores.setdefault(method, {}).setdefault(rest[0], {})[rest[1]] = value
        return scores, sigmas, seconds

    def load_baseline(self, key: str, bm3d_sigma: float) -> tuple[dict, dict, dict] | None:
        """``(scores, noise σ, seconds)`` of the low dose and BM3D of a unit, or ``None`` (also when its BM3D ran
        with another σ than ``bm3d_sigma`` HU)."""
        if self.folder is None:
            return None
        path = self._path(f"unit-{key}.npz", shared=True)
        if not path.exists():
            return None
        arrays = _read_unit_arrays(path)
        return self._parse(arrays) if arrays.get("bm3d_sigma") == float(bm3d_sigma) else None

    def load_models(self, key: str) -> tuple[dict, dict, dict] | None:
        """``(scores, noise σ, seconds)`` of the models of these weights in a unit, or ``None``."""
        if self.folder is None or not (path := self._path(f"unit-{key}.npz", shared=False)).exists():
            return None
        return self._parse(_read_unit_arrays(path))

    @staticmethod
    def merge(
        baseline: tuple[dict, dict, dict] | None, models: tuple[dict, dict, dict] | None
    ) -> tuple[dict, dict, dict] | None:
        """A whole unit from its shared and its models' parts, or ``None`` when either is missing."""
        if baseline is None or models is None:
            return None
        return tuple(a | b for a, b in zip(baseline, models))  # type: ignore[return-value]

    def load_unit(self, key: str, bm3d_sigma: float) -> tuple[dict, dict, dict] | None:
        """``(scores, noise σ, seconds)`` of a unit finished for these weights and this BM3D σ, or ``None``."""
        return self.merge(self.load_baseline(key, bm3d_sigma), self.load_models(key))

    def save_unit(self, key: str, scores: dict, sigmas: dict, seconds: dict, bm3d_sigma: float) -> None:
        if self.folder is None:
            return
        for shared in (True, False):
            parts = [
                {m: v for m, v in values.items() if _is_shared(m) == shared} for values in (scores, sigmas, seconds)
            ]
            arrays = {
                f"score/{m}/{w}/{k}": v for m, ws in parts[0].items() for w, ks in ws.items() for k, v in ks.items()
            }
            arrays |= {f"sigma/{m}": np.array(v) for m, v in parts[1].items()}
            arrays |= {f"seconds/{m}": np.array(v) for m, v in parts[2].items()}
            if shared:
                arrays["bm3d_sigma"] = np.array(float(bm3d_sigma))
            write_npz(self._path(f"unit-{key}.npz", shared), arrays, compressed=False)


def _read_unit_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def _shared_array(array_name: str) -> bool:
    """Whether a unit array (``score/<method>/...``, ``sigma/<method>``, ``seconds/<method>``, ``bm3d_sigma``) is
    shared by all weights."""
    return array_name == "bm3d_sigma" or _is_shared(array_name.split("/")[1])


def denoiser_fingerprint(weights: Path) -> str:
    """A digest of every tensor of the evaluated models in ``weights`` that shapes their denoised images: all
    of them but the word calibration (``quantizer.calibration``), which only changes the explanations (see
    ``refresh_explanations`` of :func:`run_evaluation`). Guards the cache against new weights in an old folder."""
    from .checkpoint import read_weights

    digest = hashlib.sha256()
    for name in MODEL_METHODS:
        for key, tensor in sorted(read_weights(Path(weights) / name).items()):
            if key.endswith("quantizer.calibration"):
                continue
            digest.update(f"{name}/{key}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def run_evaluation(
    weights: Path,
    output_json: Path,
    figure: Path,
    *,
    cases: list[EvalCase] | None = None,
    doses=DOSES,
    draws: int = DRAWS,
    seed: int = EVALUATION_SEED,
    bm3d_sigma_hu: float | None = None,
    device: str = "auto",
    max_slices: int | None = None,
    progress: bool = True,
    workers: int | None = None,
    tta: bool = False,
    resamples: int = 2000,
    bm3d_candidates_hu=BM3D_SIGMAS_HU,
    cache: Path | None = None,
    max_minutes: float | None = None,
    partial: bool = False,
    refresh_explanations: bool = False,
) -> dict:
    """Evaluate every method on every case, dose and draw; write ``output_json``, ``figure`` and the figure's
    data (``<output_json stem>_figure.npz``, to draw elsewhere when matplotlib is missing).

    With ``cache``, finished (case, dose, draw) units are kept in that folder and skipped by a later call with
    the same settings; new weights reuse the folder's low-dose and BM3D results and compute only their models
    (:class:`UnitCache`); with ``max_minutes`` the call stops between units once the budget is spent and raises
    :class:`EvaluationIncomplete` (call again to continue). With ``partial`` nothing new is computed: the
    result holds the (case, dose) pairs whose draws are all in the cache, ``evaluation.complete`` is false and
    ``evaluation.missing`` lists the rest. With ``refresh_explanations`` the ``explanations`` section of a cached
    headline is computed again from the current weights (after a change that leaves the denoised images as they
    are, such as a new word calibration): the headline's low dose is simulated and denoised again for it.
    """
    from .checkpoint import load_checkpoint
    from .infer import denoise_hu_array
    from .runtime import default_batch_size, resolve_device

    started = time.time()
    device = str(resolve_device(device))
    workers = workers or max(1, len(os.sched_getaffinity(0)))
    if cases is None:
        from .eval_cases import held_out_case

        cases = [held_out_case(max_slices)]
    elif max_slices is not None:
        cases = [
            EvalCase(c.name, c.hu[:max_slices], c.spacing_mm, c.role, None if c.label is None else c.label[:max_slices])
            for c in cases
        ]
    if not any(c.name == TEST_CASE for c in cases):
        logger.warning("no %s among the cases: no headline numbers", TEST_CASE)
    doses = [float(d) for d in doses]
    headline = HEADLINE_DOSE if HEADLINE_DOSE in doses else doses[0]
    store = UnitCache(
        cache,
        {
            "cases": [[c.name, list(c.hu.shape)] for c in cases],
            "doses": doses,
            "draws": draws,
            "seed": seed,
            "bm3d_sigma": bm3d_sigma_hu,
        },
        denoisers=denoiser_fingerprint(Path(weights)) + ("-tta" if tta else ""),
    )
    figure_data = (store.models or Path(output_json).parent) / (Path(output_json).stem + "_figure.npz")
    pool = bm3d_pool(workers) if workers > 1 else None
    # The runtime's batch size (one slice on the CPU, where the paper-size decoder's full-resolution scans take about
    # 2 GB per 512² slice: batches of 8 ran a 24 GB machine out of memory on a 61-slice case).
    batch_size = default_batch_size(device)
    try:
        stored_tuning = store.load_json("bm3d.json", shared=True)
        known = None
        if stored_tuning is not None:
            known = {float(d): v for d, v in stored_tuning["tuned"].items()}
            tuning_source = stored_tuning["source"]
        elif partial:
            raise InputError(f"the evaluation cache {cache} holds no finished part yet: nothing to report")
        if bm3d_sigma_hu is not None:
            bm3d_tuned = {d: {"sigma_hu": float(bm3d_sigma_hu), "psnr_tried": {}} for d in doses}
            tuning_source = "given on the command line"
        elif partial:  # computes nothing: the stored tuning as it is
            bm3d_tuned = known
        else:  # only σ values not tried before are run
            bm3d_tuned, tuning_source = tune_bm3d_per_dose(
                cases, doses, seed, device, pool, bm3d_candidates_hu, known=known
            )
        store.save_json(
            "bm3d.json", {"tuned": {str(d): v for d, v in bm3d_tuned.items()}, "source": tuning_source}, shared=True
        )
        models = {name: load_checkpoint(Path(weights) / name) for name in MODEL_METHODS}
        headline_result = store.load_json("headline.json") or {}
        kept_explanations = None
        if headline_result and headline_result.get("bm3d_sigma_hu") != bm3d_tuned[headline]["sigma_hu"]:
            # BM3D of the headline changed: its tables and figure are made again, its explanations (which
            # depend on the weights alone) are kept.
            kept_explanations, headline_result = headline_result.get("explanations"), {}
        elif headline_result and headline_result.get("bm3d_sigma_tuning_psnr") != bm3d_tuned[headline]["psnr_tried"]:
            headline_result["bm3d_sigma_tuning_psnr"] = bm3d_tuned[headline]["psnr_tried"]
            store.save_json("headline.json", headline_result)

        def explain_headline(case: EvalCase, low: np.ndarray, denoised: np.ndarray) -> dict:
            return explanation_metrics(
                Path(weights),
                models["langmamba"],
                case.hu,
                low,
                denoised,
                case.label,
                device=device,
                max_slices=max_slices,
            )

        if refresh_explanations and headline_result:
            test_case = next(c for c in cases if c.name == TEST_CASE)
            low = simulate_case(test_case, headline, case_seed(seed, test_case.name, headline, 0), device)
            denoised = denoise_hu_array(models["langmamba"], low, device=device, batch_size=batch_size, tta=tta)
            headline_result["explanations"] = explain_headline(test_case, low, denoised)
            store.save_json("headline.json", headline_result)
        units: dict[tuple, tuple[dict, dict]] = {}
        for case in cases:
            roi = noise_roi(case.hu, metrics.body_mask(case.hu))
            for dose in doses:
                sigma = bm3d_tuned[dose]["sigma_hu"]
                for draw in range(draws):
                    key = store.key(case.name, dose, draw)
                    is_headline = case.name == TEST_CASE and dose == headline and draw == 0
                    baseline, own = store.load_baseline(key, sigma), store.load_models(key)
                    done = store.merge(baseline, own)
                    if done is not None and (headline_result or not is_headline):
                        units[case.name, dose, draw] = done
                        continue
                    if partial:
                        continue
                    if max_minutes is not None and time.time() - started > 60 * max_minutes:
                        raise EvaluationIncomplete(f"stopped after {max_minutes} min with {len(units)} units done")
                    low = simulate_case(case, dose, case_seed(seed, case.name, dose, draw), device)
                    # A unit's low dose and BM3D are shared by all weights and its models' part belongs to these
                    # weights: only the missing part is computed, except for the headline, whose figure and
                    # tables need every image.
                    if is_headline:
                        baseline = own = None
                    outputs = {"ldct": low}
                    seconds = {}
                    if baseline is None:
                        clock = time.perf_counter()
                        outputs["bm3d"] = bm3d_denoise(low, sigma, pool=pool)
                        seconds["bm3d"] = time.perf_counter() - clock
                    for name, model in models.items() if own is None else ():
                        clock = time.perf_counter()
                        outputs[name] = denoise_hu_array(model, low, device=device, batch_size=batch_size, tta=tta)
                        if device.startswith("cuda"):
                            torch.cuda.synchronize()
                        seconds[name] = time.perf_counter() - clock
                    if baseline is not None:
                        outputs.pop("ldct")
                    mapper = pool.map if pool is not None else map
                    scores = dict(zip(outputs, mapper(_scores_job, [(out, case.hu) for out in outputs.values()])))
                    reference = {"ndct": case.hu} if baseline is None else {}
                    sigmas = (
                        {name: _roi_sigma(out, roi) for name, out in {**reference, **outputs}.items()}
                        if roi.any()
                        else {}
                    )
                    for cached in (baseline, own):
                        if cached is not None:
                            scores, sigmas, seconds = (
                                {**part, **fresh} for part, fresh in zip(cached, (scores, sigmas, seconds))
                            )
                    if is_headline:
                        headline_result = _headline(case, outputs, models, device, bm3d_tuned[dose], tuning_source)
                        headline_result["explanations"] = (
                            kept_explanations
                            if kept_explanations is not None
                            else explain_headline(case, low, outputs["langmamba"])
                        )
                        _save_figure_data({"ndct": case.hu, **outputs}, case, figure_data, dose)
                        store.save_json("headline.json", headline_result)
                    store.save_unit(key, scores, sigmas, seconds, sigma)
                    units[case.name, dose, draw] = scores, sigmas, seconds
                    logger.info("%s dose %s draw %d done", case.name, dose, draw)
    finally:
        if pool is not None:
            pool.shutdown()

    per_case: dict = {}
    missing: list[dict] = []
    pooled_blocks: dict[float, list] = {d: [] for d in doses}
    for case in cases:
        per_case[case.name] = {"role": case.role, "slices": int(case.hu.shape[0]), "doses": {}}
        for dose in doses:
            if any((case.name, dose, draw) not in units for draw in range(draws)):
                missing.append(
                    {
                        "case": case.name,
                        "dose": dose,
                        "draws_done": sum((case.name, dose, d) in units for d in range(draws)),
                    }
                )
                continue
            draws_of = [units[case.name, dose, draw] for draw in range(draws)]
            per_slice = {
                m: {w: {k: np.stack([d[0][m][w][k] for d in draws_of]) for k in ks} for w, ks in ws.items()}
                for m, ws in draws_of[0][0].items()
            }
            summary = summarise(per_slice, resamples=resamples, seed=seed)
            summary["noise_sigma_hu"] = {m: _mean([d[1][m] for d in draws_of]) for m in draws_of[0][1]}
            summary["bm3d_sigma_hu"] = bm3d_tuned[dose]["sigma_hu"]
            per_case[case.name]["doses"][str(dose)] = summary
            if case.role == "validation":
                pooled_blocks[dose].append(per_slice)
    pooled = {
        str(d): summarise(_pool(blocks), resamples=resamples, seed=seed)
        for d, blocks in pooled_blocks.items()
        if blocks
    }
    result = {
        "test_volume": TEST_CASE,
        "dose": headline,
        "seed": seed,
        **headline_result,
        "evaluation": {
            "complete": not missing,
            "missing": missing,
            "doses": doses,
            "draws": draws,
            "tta": tta,
            "methods": list(METHOD_ORDER),
            "reference_method": REFERENCE_METHOD,
            "bm3d": {str(d): v for d, v in bm3d_tuned.items()},
            "bm3d_tuned_on": tuning_source,
            "per_case": per_case,
            "validation_pooled": pooled,
            "seconds_per_slice": _seconds_per_slice(units, cases),
            "scan_protocol": ScanProtocol().to_dict(),  # the simulator's settings of every low dose above
            "timing_note": "wall time per slice of each method on this host (BM3D over all worker processes, "
            "models in the runtime's default batches (units made before 2026-12-01 on a GPU: 8) incl. "
            "host-device copies; the first model call includes warm-up); with --tta the models run 8 times",
        },
        "protocol": "per slice PSNR/SSIM in the window scaled to [0, 1] (data range 1), averaged over slices and "
        f"{draws} noise draws; RMSE in HU after window clipping; low dose simulated by "
        "langmamba.simulate (noise insertion) with seeds from evaluate.case_seed; differences and "
        "gains: paired percentile bootstrap 95 % intervals over slices (scores averaged over draws "
        "first); noise σ in uniform soft-tissue squares chosen on the smoothed normal dose; BM3D σ "
        "per dose tuned on the validation cases only; the top-level tables: lung2, headline dose, "
        "draw 0",
    }
    if "explanations" in result:  # the language-space section goes last, after the denoising results
        result["explanations"] = result.pop("explanations")
    write_json(result, output_json)
    if figure_data.exists():
        beside = Path(output_json).with_name(figure_data.name)
        if beside != figure_data:
            beside.write_bytes(figure_data.read_bytes())
        if importlib.util.find_spec("matplotlib") is None:
            logger.warning(
                "matplotlib is not installed: draw the figure elsewhere with `langmamba evaluate --draw-figure %s`",
                beside,
            )
        else:
            draw_figure(beside, figure)
    return result


def _seconds_per_slice(units: dict, cases: list[EvalCase]) -> dict[str, float]:
    slices = {c.name: c.hu.shape[0] for c in cases}
    total: dict[str, float] = {}
    count = 0
    for (name, _, _), (_, _, seconds) in units.items():
        count += slices[name]
        for method, value in seconds.items():
            total[method] = total.get(method, 0.0) + value
    return {method: value / count for method, value in total.items()} if count else {}


def _headline(case: EvalCase, outputs: dict, models: dict, device: str, bm3d: dict, tuning_source: str) -> dict:
    """The legacy top-level keys (lung2, headline dose, first draw) the model card and older tools read."""
    scores = score_methods(outputs, case.hu, label=case.label, spacing_mm=case.spacing_mm)
    langmamba = models["langmamba"]
    return {
        "slices": int(case.hu.shape[0]),
        **{key: scores[key] for key in ("window_-160_240", "window_-1000_1000")},
        "explanation_stability": explanation_stability(langmamba, outputs["langmamba"], case.hu, device=device),
        "explanation_stability_no_langda": explanation_stability(
            langmamba, outputs["langmamba_no_langda"], case.hu, device=device
        ),
        "explanation_stability_input": explanation_stability(langmamba, outputs["ldct"], case.hu, device=device),
        "noise_sigma_hu": scores.get("noise_sigma_hu", {}),
        "lesion_cnr": scores.get("lesion_cnr", {}),
        "bm3d_sigma_hu": bm3d["sigma_hu"],
        "bm3d_sigma_tuning_psnr": bm3d["psnr_tried"],
        "bm3d_sigma_tuned_on": tuning_source,
    }


def _save_figure_data(images: dict, case: EvalCase, path: Path, dose: float) -> None:
    """The shown slice of every method (the tumour's middle slice) and the zoom box, for :func:`draw_figure`."""
    label = case.label if case.label is not None else np.zeros(case.hu.shape, bool)
    lesion_slices = np.nonzero(label.any(axis=(1, 2)))[0]
    shown = int(lesion_slices[len(lesion_slices) // 2]) if len(lesion_slices) else case.hu.shape[0] // 2
    crop = lesion_crop(label[shown])
    title = f"held-out {TEST_CASE}, slice {shown}, simulated dose {dose:g}, draw 0"
    data = {
        "names": np.array(list(images)),
        "spacing_mm": np.asarray(case.spacing_mm),
        "title": np.array(title),
        **{f"image/{n}": np.asarray(im[shown], np.float32) for n, im in images.items()},
    }
    if crop is not None:
        data["crop"] = np.array([[crop[0].start, crop[0].stop], [crop[1].start, crop[1].stop]])
    write_npz(path, data)


def markdown_table(result: dict) -> str:
    """The model card's results table (markdown) from a ``metrics.json`` document (lung2, headline dose)."""
    lines = [
        "| method | PSNR [-160,240] dB | SSIM [-160,240] | RMSE [-160,240] HU | PSNR [-1000,1000] dB | "
        "SSIM [-1000,1000] | noise σ HU | lesion CNR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    noise, cnr = result.get("noise_sigma_hu", {}), result.get("lesion_cnr", {})
    for name in METHOD_ORDER:
        narrow, wide = result["window_-160_240"][name], result["window_-1000_1000"][name]
        lines.append(
            f"| {METHOD_TITLES[name]} | {narrow['psnr']:.2f} | {narrow['ssim']:.4f} | {narrow['rmse']:.2f} | "
            f"{wide['psnr']:.2f} | {wide['ssim']:.4f} | {noise.get(name, float('nan')):.2f} | "
            f"{cnr.get(name, float('nan')):.2f} |"
        )
    lines.append(
        f"| {METHOD_TITLES['ndct']} (reference) | – | – | – | – | – | "
        f"{noise.get('ndct', float('nan')):.2f} | {cnr.get('ndct', float('nan')):.2f} |"
    )
    return "\n".join(lines)


def difference_table(result: dict, window: str = "window_-160_240") -> str:
    """Markdown: per case and dose, every method's PSNR/SSIM (mean over slices and draws) and its PSNR
    difference to LangMamba with the 95 % interval."""
    evaluation = result["evaluation"]
    lines = [
        "| case | dose | method | PSNR dB | SSIM | ΔPSNR vs LangMamba [95 % CI] | gain over input dB |",
        "|---|---|---|---|---|---|---|",
    ]
    for case, entry in evaluation["per_case"].items():
        for dose, summary in entry["doses"].items():
            section = summary[window]
            for method in METHOD_ORDER:
                diff = section["difference_to_langmamba"].get(method, {}).get("psnr")
                gain = section["gain_over_input"].get(method, {}).get("psnr")
                diff_text = f"{diff['mean']:+.2f} [{diff['low']:+.2f}, {diff['high']:+.2f}]" if diff else "–"
                gain_text = f"{gain['mean']:+.2f} [{gain['low']:+.2f}, {gain['high']:+.2f}]" if gain else "–"
                lines.append(
                    f"| {case} | {dose} | {METHOD_TITLES[method]} | {section[method]['psnr']:.2f} | "
                    f"{section[method]['ssim']:.4f} | {diff_text} | {gain_text} |"
                )
    return "\n".join(lines)
