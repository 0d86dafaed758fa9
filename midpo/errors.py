"""The base class of the errors a user can fix; imports nothing (every layer can use it).

A stage raises a subclass of `MidpoError` for a bad recipe, a missing or foreign input, an output in the way:
the command line (`midpo.cli.main`, `midpo.runtime.launch.stage_cli` under torchrun) prints it as one line,
`midpo <stage>: error: <message>`, and exits 1. Anything else is a bug and keeps its traceback.
The existing error classes keep their standard bases too (ConfigError is still a ValueError, DataNotReady a
FileNotFoundError...), so code that catches those goes on working.
"""

from __future__ import annotations


class MidpoError(Exception):
    """An error the user can fix; the message says what is wrong and where (file, row, key)."""


class MissingPathError(MidpoError, FileNotFoundError):
    """A file or folder a stage needs does not exist (a model folder, a checkpoint)."""


class UnusableInputError(MidpoError, ValueError):
    """An input that exists but that midpo refuses to use (e.g. a model folder without safetensors weights)."""


class ConfigError(MidpoError, ValueError):
    """A recipe, override or setting that cannot be turned into a valid config (the message names the key)."""
