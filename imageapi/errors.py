"""The errors a request can end in, each carrying the HTTP status the contract gives it.

Drivers and the object graph raise these; the HTTP layer turns every one into
`{"code": status, "message": text}`. Anything else that escapes is a 500.
"""

from __future__ import annotations

import errno
import os


class ApiError(Exception):
    status = 500

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def body(self) -> dict[str, object]:
        return {"code": self.status, "message": self.message}


class BadRequest(ApiError):
    status = 400


class NotFound(ApiError):
    status = 404


class Conflict(ApiError):
    status = 409


class SystemFault(ApiError):
    status = 500


def errno_name(err: int | None) -> str:
    return errno.errorcode.get(err or 0, f"errno {err}")


def describe_oserror(exc: OSError, what: str) -> str:
    """`ENOENT: <what>: No such file or directory (/path)`: the errno name first, to match on."""
    text = f"{errno_name(exc.errno)}: {what}: {exc.strerror or os.strerror(exc.errno or 0)}"
    if exc.filename:
        text += f" ({exc.filename})"
    return text
