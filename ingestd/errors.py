"""The one exception tree of ingestd.

Retries are decided by class, never by message::

    IngestdError
    ├── ConfigError                 bad configuration (exit 2); names every bad key
    ├── TtsError                    mixin: TTS answered (``status_code``, ``error_name``)
    ├── TransientError              worth retrying with backoff
    │   ├── StreamDisconnected      transport error, idle timeout, server closed the stream
    │   ├── ServerUnavailable       TTS answered 5xx
    │   ├── RateLimited             TTS answered 429 rate_limit_exceeded (``retry_after_s``)
    │   └── StoreUnavailable        the database is unreachable or locked
    └── PermanentError              retrying the same thing will not help
        ├── AuthRejected            401/403 from TTS (``status_code``, ``error_name``)
        ├── RequestRejected         other 4xx from TTS (``status_code``, ``error_name``)
        ├── StreamError             an ``{"error": …}`` frame ended the stream
        ├── StorageNotEnabled       404 from the Storage Integration API (none on this server)
        ├── MalformedEvent          an event that cannot be normalized (goes to rejected_events)
        └── SchemaNotReady          the database is not migrated to this version's head
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
    """The event stream ended or could not be read."""

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
