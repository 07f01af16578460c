"""The one exception tree of ingestd.

Retries are decided by class, never by message::

    IngestdError
    ├── ConfigError                 bad configuration (exit 2); names every bad key
    ├── UsageError                  a bad command line: a missing input file, … (exit 2)
    ├── TtsError                    mixin: TTS answered (``status_code``, ``error_name``)
    ├── TransientError              worth retrying with backoff
    │   ├── StreamDisconnected      transport error, timeout, closed, or not an event stream
    │   ├── ServerUnavailable       TTS answered 5xx, or 408/425/499 (ask again)
    │   ├── RateLimited             TTS answered 429 rate_limit_exceeded (``retry_after_s``)
    │   ├── StoreUnavailable        the database is unreachable or locked
    │   └── SpoolUnavailable        the local spool cannot take frames (full, io, locked)
    └── PermanentError              retrying the same thing will not help
        ├── AuthRejected            401/403 from TTS (``status_code``, ``error_name``)
        ├── RequestRejected         other 4xx from TTS (``status_code``, ``error_name``)
        ├── StreamError             an ``{"error": …}`` frame ended the stream
        ├── StorageNotEnabled       404 from the Storage Integration API (none on this server)
        ├── MalformedEvent          an event that cannot be normalized (goes to rejected_events)
        ├── EventNamesRejected      a ``names`` filter TTS would answer 400 (``error_name``)
        ├── SchemaNotReady          the database is not migrated to this version's head
        └── AlreadyRunning          another `ingestd run` holds this SQLite database
"""

from __future__ import annotations


class IngestdError(Exception):
    """Root of every error ingestd raises on purpose."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())


class ConfigError(IngestdError):
    """The configuration is invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


class UsageError(IngestdError):
    """The command line asks for something impossible (exit 2, one line)."""


class TransientError(IngestdError):
    """A failure that may go away when retried."""


class PermanentError(IngestdError):
    """A failure that retrying the same request will not fix."""


class TtsError(IngestdError):
    """An error answered by The Things Stack: HTTP status and TTS error name as attributes."""

    def __init__(
        self,
        message: str | None = None,
        *,
        status_code: int | None = None,
        error_name: str | None = None,
        tts_message: str | None = None,
    ) -> None:
        self.status_code = status_code
        self.error_name = error_name  # e.g. "api_key_not_found"; compare by name, never text
        self.tts_message = tts_message
        super().__init__(message)


class StreamDisconnected(TransientError):
    """The event stream ended or could not be read (``reason`` says how, for metrics)."""

    def __init__(self, message: str | None = None, *, reason: str = "transport") -> None:
        self.reason = reason
        super().__init__(message)


class ServerUnavailable(TransientError, TtsError):
    """The Things Stack answered with a server error."""


class RateLimited(TransientError, TtsError):
    """The Things Stack rate limiter rejected the request."""

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float,
        status_code: int | None = 429,
        error_name: str | None = "rate_limit_exceeded",
        tts_message: str | None = None,
    ) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            message, status_code=status_code, error_name=error_name, tts_message=tts_message
        )


class StoreUnavailable(TransientError):
    """The database could not be reached or was locked."""


class SpoolUnavailable(TransientError):
    """The local spool cannot take frames: full, a disk error, or locked by another process."""

    def __init__(self, message: str | None = None, *, reason: str) -> None:
        self.reason = reason
        super().__init__(message)


class AuthRejected(PermanentError, TtsError):
    """The Things Stack rejected the API key (401) or its rights (403)."""


class RequestRejected(PermanentError, TtsError):
    """The Things Stack rejected the request as invalid."""


class StreamError(PermanentError, TtsError):
    """The Things Stack ended the stream with an error frame."""


class StorageNotEnabled(PermanentError, TtsError):
    """The Storage Integration is not available here (404): open-source TTS has none, and
    on TTS Cloud/Enterprise it must be enabled for the application."""


class MalformedEvent(PermanentError):
    """An event that cannot be normalized."""


class SchemaNotReady(PermanentError):
    """The database schema is not at the revision this ingestd needs: run `ingestd migrate`."""


class EventNamesRejected(PermanentError):
    """A ``names`` filter The Things Stack would refuse with HTTP 400.

    ``error_name`` is TTS's (``unknown_event_name``, ``no_matching_events``, ``invalid_regexp``;
    lorawan-stack ``pkg/events/pattern.go``) and ``attributes`` its public attributes.
    """

    def __init__(self, message: str, *, error_name: str, attributes: dict[str, str]) -> None:
        self.error_name = error_name
        self.attributes = dict(attributes)
        super().__init__(message)


class AlreadyRunning(PermanentError):
    """Another ``ingestd run`` already writes to this SQLite database."""
