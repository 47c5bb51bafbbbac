"""The error-code table shared by the wire protocol and the HTTP API.

Every error a client can see has a stable string code, a human message, whether a
retry of the same request may succeed (``retryable``) and, for throttling, a hint of
how long to wait (``retry_after_ms``). ``docs/protocol.md`` reproduces this table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorKind:
    code: str
    http_status: int
    retryable: bool
    meaning: str


_KINDS = [
    ErrorKind("bad_frame", 400, False, "The frame is not valid JSON/MessagePack or not an object."),
    ErrorKind("unknown_type", 400, False, "The frame's `t` names no frame type of this version."),
    ErrorKind("invalid", 400, False, "A field is missing, has the wrong type or a bad value."),
    ErrorKind("too_large", 413, False, "The frame, body or text exceeds a published limit."),
    ErrorKind("unsupported_version", 400, False, "The client's protocol version is not served."),
    ErrorKind("unauthenticated", 401, False, "A request came before authentication completed."),
    ErrorKind("auth_failed", 401, False, "The token or password is wrong, forged or malformed."),
    ErrorKind("token_expired", 401, False, "The token has expired; obtain a new one."),
    ErrorKind("token_revoked", 401, False, "The token (or its device) was revoked."),
    ErrorKind("forbidden", 403, False, "The caller may not perform this action."),
    ErrorKind("not_found", 404, False, "The user, conversation or resource does not exist."),
    ErrorKind("blocked", 403, False, "The recipient has blocked the sender."),
    ErrorKind(
        "muted",
        403,
        False,
        "The sender is muted in this group (until `retry_after_ms`), or the group is muted "
        "for everyone but its admins.",
    ),
    ErrorKind("group_full", 409, False, "The group is at its member limit."),
    ErrorKind("conflict", 409, False, "The client message id was already used for other content."),
    ErrorKind("rate_limited", 429, True, "Too many requests; wait `retry_after_ms` and retry."),
    ErrorKind("unavailable", 503, True, "The server cannot take the request now; retry later."),
    ErrorKind("internal", 500, True, "An unexpected server error; the request was not applied."),
]

KINDS: dict[str, ErrorKind] = {k.code: k for k in _KINDS}


class TidingsError(Exception):
    """An error that is reported to the client with a code from the table."""

    def __init__(self, code: str, message: str, *, retry_after_ms: int | None = None) -> None:
        if code not in KINDS:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms

    @property
    def retryable(self) -> bool:
        return KINDS[self.code].retryable

    @property
    def http_status(self) -> int:
        return KINDS[self.code].http_status

    def __repr__(self) -> str:
        return f"TidingsError({self.code!r}, {self.message!r})"
