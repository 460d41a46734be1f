"""Errors raised by langmamba.

Every problem with a user's input raises a subclass of :class:`InputError` whose message names the
file and the problem in words a radiologist or an admin can act on; callers (the CLI, the MONAI Label
app) catch :class:`LangMambaError` and show the message instead of a traceback.
"""

from __future__ import annotations


class LangMambaError(Exception):
    """Base class of every error langmamba raises on purpose."""


class InputError(LangMambaError, ValueError):
    """The input (file, folder, array or request) cannot be used."""


class UnsupportedFormatError(InputError):
    """The path is not a format langmamba reads or writes (by extension or content)."""


class EmptyInputError(InputError):
    """The file is empty or the folder holds no readable image."""


class CorruptFileError(InputError):
    """The file exists but cannot be decoded (truncated, damaged, wrong content)."""


class NotAnImageError(InputError):
    """A DICOM object without pixel data (structured report, RT plan, presentation state ...)."""


class NotCTError(InputError):
    """The image is not a CT (e.g. MR, PET, an ordinary photograph)."""


class UnsupportedImageError(InputError):
    """An image langmamba cannot denoise: colour/RGB, 2-D picture, wrong dimensionality."""


class MixedSeriesError(InputError):
    """A DICOM folder mixes several series, orientations or slice sizes."""


class IrregularSpacingError(InputError):
    """Slices are missing or unevenly spaced, so the volume has no single slice spacing."""


class NonFiniteVoxelsError(InputError):
    """The volume contains NaN or infinite voxel values."""


class VolumeTooLargeError(InputError):
    """The input, or the volume its header declares, is larger than the limit it is read under."""


class UnsafeInputError(InputError):
    """The input refers to data outside itself (a detached data file, a symbolic link), refused where only the
    input itself may be read (uploads to a server)."""


class OverwriteError(LangMambaError):
    """Writing would replace the input, or an existing output without ``overwrite=True``."""


class CancelledError(LangMambaError):
    """The caller asked to stop (e.g. the client of a server request disconnected) before the work finished."""


class ConfigError(LangMambaError, ValueError):
    """A configuration (YAML, JSON or arguments) is invalid; the message names the key."""


class CheckpointError(LangMambaError):
    """A checkpoint is missing files or does not match the configuration it is loaded with."""
