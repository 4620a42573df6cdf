"""The errors ann2snn raises on purpose.

Every failure a user can cause (a bad path, a bad file, a bad option) is an
:class:`Ann2SnnError` with a one-line message that names the problem and what
to do; the CLI prints it and exits non-zero. Anything else is a bug.
"""


class Ann2SnnError(Exception):
    """Base class: a problem with the user's input or environment."""


class ModelNotFoundError(Ann2SnnError):
    """The model argument names no local folder and the hub cannot be reached."""


class UnsupportedModelError(Ann2SnnError):
    """The checkpoint's architecture has no recipe."""


class CheckpointError(Ann2SnnError):
    """A checkpoint or export is missing files, truncated, tampered or inconsistent."""


class CalibrationDataError(Ann2SnnError):
    """Calibration or evaluation text cannot be read or holds no usable text."""


class ConfigError(Ann2SnnError):
    """An option or a configuration value is out of range."""


class NumericalError(Ann2SnnError):
    """NaN or Inf met in weights or activations."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM after a command kept files to resume from: `kept` names them (a rerun resumes there)."""

    def __init__(self, kept: list):
        super().__init__()
        self.kept = kept
