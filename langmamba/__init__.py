"""LangMamba: language-guided low-dose CT denoising (arXiv 2507.06140) for MONAI Label and 3D Slicer."""

__version__ = "0.1.0"
