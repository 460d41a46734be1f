"""Training end to end on a small crop of real CT, resume, and data-parallel replicas on 2 CPU processes."""

import csv
import os
import socket

import pytest
import torch

from langmamba.checkpoint import load_checkpoint
from langmamba.errors import ConfigError
from langmamba.models.denoiser import LangMamba
from langmamba.models.langae import LangAE
from langmamba.train import load_config, train
from langmamba.train.export import export_checkpoint

QUICK = [
    "data.crop=128",
    "data.patch_size=128",
    "data.max_slices_per_patient=3",
    "optim.batch_size=2",
    "optim.warmup_steps=2",
    "run.log_every=1",
    "run.validation_slices=1",
    "run.checkpoint_every=5",
    "data.validation_patients=['pydicom:explicit_VR-UN']",
    "data.include_pydicom=true",
]


def _losses(folder):
    return [float(r["loss"]) for r in csv.DictReader(open(folder / "log.csv")) if r["loss"]]


@pytest.mark.slow
def test_both_stages_train_and_reload(tmp_path):
    langae_dir = tmp_path / "langae"
    config = load_config(
        overrides=QUICK
        + ["model=langae", "optim.steps=16", "optim.lr=1e-3", "langae.base_channels=8", f"run.output={langae_dir}"]
    )
    final = train(config, progress=False)
    losses = _losses(langae_dir)
    assert sum(losses[-3:]) < sum(losses[:3])
    langae = load_checkpoint(final)
    assert isinstance(langae, LangAE) and langae.vocabulary and len(langae.vocabulary) == langae.codebook.shape[0]

    denoiser_dir = tmp_path / "langmamba"
    config = load_config(
        overrides=QUICK
        + [
            "model=langmamba",
            "optim.steps=6",
            "optim.lr=1e-3",
            f"denoiser.langae={final}",
            f"run.output={denoiser_dir}",
        ]
    )
    model = load_checkpoint(train(config, progress=False))
    assert isinstance(model, LangMamba)
    # Stage 2 trains only the decoder: the frozen LangAE is bit-identical to the stage-1 checkpoint.
    for name, tensor in langae.state_dict().items():
        assert torch.equal(model.langae.state_dict()[name], tensor), name
    assert any(r["val_psnr"] for r in csv.DictReader((denoiser_dir / "log.csv").read_text().splitlines()))


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(tmp_path):
    out = tmp_path / "red"
    settings = QUICK + ["model=redcnn", "redcnn.channels=4", f"run.output={out}"]
    train(load_config(overrides=settings + ["optim.steps=5"]), progress=False)
    first = load_checkpoint(out / "checkpoints" / "step-0000005" / "model")
    train(load_config(overrides=settings + ["optim.steps=10"]), progress=False)
    steps = [int(r["step"]) for r in csv.DictReader((out / "log.csv").read_text().splitlines()) if r["loss"]]
    assert steps == list(range(1, 11))  # steps 1-5 once, then 6-10 after the resume
    resumed = load_checkpoint(out / "model")
    assert resumed.checkpoint_config["extra"]["steps"] == 10
    assert any(not torch.equal(a, b) for a, b in zip(first.parameters(), resumed.parameters()))


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    out = tmp_path / "red"
    settings = QUICK + ["model=redcnn", "redcnn.channels=4", f"run.output={out}", "optim.steps=2"]
    train(load_config(overrides=settings), progress=False)
    (out / "checkpoints").rename(tmp_path / "moved")
    with pytest.raises(ConfigError, match="already holds a training run"):
        train(load_config(overrides=settings), progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, output: str, result_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    torch.set_num_threads(1)
    from langmamba.train.engine import run_training
    from langmamba.train.tasks import build_task

    tasks = []

    def capture(config, data, device):
        tasks.append(build_task(config, data, device))
        return tasks[-1]

    config = load_config(
        overrides=QUICK + ["model=redcnn", "redcnn.channels=4", "optim.steps=4", f"run.output={output}"]
    )
    run_training(config, capture, progress=False)
    flat = torch.cat([p.detach().flatten() for p in tasks[0].model.parameters()])
    torch.save(flat, os.path.join(result_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, _free_port(), str(tmp_path / "ddp"), str(tmp_path)), nprocs=2, join=True
    )
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0, rank1)
    saved = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step-0000004" / "model")
    assert torch.equal(torch.cat([p.flatten() for p in saved.parameters()]), rank0)


def test_training_needs_neither_pydicom_nor_simpleitk(tmp_path):
    """GPU machines train from a prepared .npz without DICOM or ITK packages: the loss plot once imported them."""
    import subprocess
    import sys

    log = tmp_path / "log.csv"
    log.write_text("step,loss,lr,seconds,val_psnr,val_ssim\n1,0.5,1e-4,1.0,,\n2,0.4,1e-4,2.0,20.0,0.5\n")
    script = (
        "import sys\n"
        "sys.modules['SimpleITK'] = None\n"
        "sys.modules['pydicom'] = None\n"
        "from pathlib import Path\n"
        "import langmamba.train, langmamba.losses, langmamba.models.denoiser\n"
        "from langmamba.train.engine import plot_log\n"
        f"plot_log(Path({str(log)!r}), Path({str(tmp_path / 'loss.png')!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "loss.png").stat().st_size > 1000


@pytest.mark.slow
def test_init_from_starts_a_fresh_run_from_exported_weights(tmp_path):
    settings = QUICK + ["model=redcnn", "redcnn.channels=4", "optim.steps=3"]
    first = train(load_config(overrides=settings + [f"run.output={tmp_path / 'first'}"]), progress=False)
    exported = export_checkpoint(first, tmp_path / "exported", half=True)
    seeded = train(
        load_config(
            overrides=settings
            + [
                "optim.steps=1",
                "optim.lr=1e-12",
                "optim.ema_decay=0",
                f"run.init_from={exported}",
                f"run.output={tmp_path / 'second'}",
            ]
        ),
        progress=False,
    )
    # One step at a negligible learning rate: the second run's weights are the (half-precision) first ones.
    for a, b in zip(load_checkpoint(exported).parameters(), load_checkpoint(seeded).parameters()):
        assert torch.allclose(a.float(), b.float(), atol=1e-3)

    wider = settings + ["redcnn.channels=6", f"run.init_from={exported}", f"run.output={tmp_path / 'wide'}"]
    with pytest.raises(ConfigError, match="does not fit this model"):
        train(load_config(overrides=wider), progress=False)
