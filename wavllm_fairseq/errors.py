"""Errors raised for bad user input. Each names where the problem is (file, row, key) and what to do."""
from typing import Optional


class WavLLMInputError(ValueError):
    """Bad input from the user: a manifest row, an audio file, a config value or a checkpoint.

    ``str(err)`` always starts with the location (``file:row``) when one is known, so logs and the
    validation report can be grepped by file.

    Args:
        message (str): what is wrong and what to do.
        file (Optional[str]): the file the problem is in.
        row (Optional[int]): its line (or row) in ``file``.
        reason (Optional[str]): a short machine-readable reason (default ``bad_input``), counted by
            ``skip_bad_rows``.
    """

    def __init__(self, message: str, file: Optional[str] = None, row: Optional[int] = None,
                 reason: Optional[str] = None):
        self.file = file
        self.row = row
        self.reason = reason or "bad_input"
        where = ""
        if file is not None:
            where = f"{file}:{row}: " if row is not None else f"{file}: "
        super().__init__(where + message)


class AudioError(WavLLMInputError):
    """An audio file is missing, empty, corrupt, unsupported, silent or too long."""


class ManifestError(WavLLMInputError):
    """A manifest row is malformed (missing columns, bad numbers, empty or over-long text, duplicate id)."""


class CheckpointError(WavLLMInputError):
    """A checkpoint is truncated, unreadable, or its keys/shapes do not match the model."""
