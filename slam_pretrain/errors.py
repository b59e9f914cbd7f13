"""Errors that reach the user as one line (the CLI prints them and exits with code 2)."""


class ConfigError(ValueError):
    """A user mistake in a config file, a ``--set`` override or a CLI flag.

    The message names the key (dotted), the value and what would be valid.
    """


class UserError(RuntimeError):
    """Any other mistake the user can fix (a missing file, an incompatible checkpoint, ...)."""
