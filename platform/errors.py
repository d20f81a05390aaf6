"""Errors caused by the user's input: the CLI prints their message (which says what to fix), no traceback."""


class UserError(ValueError):
    """Bad input: a config value, a file, a checkpoint. The message names it and how to fix it."""


class ConfigError(UserError):
    """A configuration value is wrong."""


class StorageError(UserError):
    """A path or URI cannot be read or written as needed."""


class CheckpointError(UserError):
    """A checkpoint is incomplete, corrupted or does not fit the model; the message says which and why."""


def yaml_position(err: Exception, unknown: str) -> str:
    """'line L, column C' of a YAML parser error (PyYAML's problem mark), else `unknown`."""
    mark = getattr(err, "problem_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else unknown
