"""Errors that reach the user as one line (the CLI prints them and exits with code 2)."""

from __future__ import annotations

import errno
import os
from typing import Optional, Union


class ConfigError(ValueError):
    """A user mistake in a config file, a ``--set`` override or a CLI flag.

    The message names the key (dotted), the value and what would be valid.
    """


class UserError(RuntimeError):
    """Any other mistake the user can fix (a missing file, an incompatible checkpoint, ...)."""


# Errors of writing that the user fixes outside the program (space, permissions, mounts), with
# what to do about each. A full disk must be *said*: torch reports it as "unexpected pos".
WRITE_ERRNOS = {
    errno.ENOSPC: "free some space or point run.out_dir at another filesystem",
    errno.EDQUOT: "free some space within your quota or point run.out_dir elsewhere",
    errno.EROFS: "the filesystem is mounted read-only: point run.out_dir at a writable one",
    errno.EACCES: "make it writable for this user or point run.out_dir elsewhere",
    errno.EPERM: "make it writable for this user or point run.out_dir elsewhere",
    errno.ENOTDIR: "a file stands where a directory is needed: move it or choose another run.out_dir",
    errno.EEXIST: "a file stands where a directory is needed: move it or choose another run.out_dir",
}


def write_error(e: OSError, path: Optional[Union[str, os.PathLike]] = None, what: str = "write") -> UserError:
    """One line for an OSError of a write: the path, the cause in the system's words, the fix."""
    where = e.filename if e.filename is not None else path
    cause = os.strerror(e.errno) if e.errno else str(e)
    name = errno.errorcode.get(e.errno or 0, "")
    hint = WRITE_ERRNOS.get(e.errno or 0, "")
    return UserError(f"cannot {what} {where}: {cause}{f' ({name})' if name else ''}{f'; {hint}' if hint else ''}")
