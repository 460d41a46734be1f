"""Micro-benchmarks of langmamba components (``langmamba bench <name>``)."""
