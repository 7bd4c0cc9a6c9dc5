"""The one bad-input error: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations

import errno


class BadInputError(Exception):
    """Bad input or usage: the CLI prints the message on one line and exits with code 2."""


# OSErrors that are the user's environment, not a bug: shown as one line, exit 2.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST, errno.EISDIR}


def environment_error(err: OSError, doing: str) -> BadInputError | None:
    """A one-line BadInputError for a full disk, a read-only or unwritable path, or a file in the way; None for anything else."""
    if err.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f" {err.filename}:" if err.filename else ""
    return BadInputError(f"{doing}:{where} {err.strerror or err}")
