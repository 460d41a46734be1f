"""LangMamba: language-guided low-dose CT denoising (arXiv 2507.06140) for MONAI Label and 3D Slicer."""

from langmamba.version import __version__


def load(directory, **kwargs):
    """Load a model checkpoint folder; see :func:`langmamba.checkpoint.load_checkpoint`.

    Imported lazily so ``import langmamba`` stays light (no torch import).
    """
    from langmamba.checkpoint import load_checkpoint

    return load_checkpoint(directory, **kwargs)


__all__ = ["__version__", "load"]
