"""Settings: one frozen value built once in ``__main__`` and passed down explicitly.

Sources, later ones winning: built-in defaults; the TOML file (``--config``, else
``$INGESTD_CONFIG``, else ``./ingestd.toml`` if present) with ``${VAR}`` expanded from the
environment; ``INGESTD_<SECTION>__<KEY>`` overrides; and for the ``[tts]`` API key, when
nothing else sets it, systemd's ``$CREDENTIALS_DIRECTORY/tts_api_key``. Every problem is
collected and raised as one ``ConfigError`` naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_type_hints

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError

from ingestd.config.sources import (
    RawConfig,
    apply_env_overrides,
    load_toml,
    raw_from_toml,
    report_unresolved,
)
from ingestd.config.values import (
    Age,
    ApiKey,
    BaseUrl,
    DatabaseUrl,
    EventNames,
    ListenAddress,
    NonNegativeFloat,
    NonNegativeInt,
    Parse,
    Parser,
    PositiveFloat,
    PositiveInt,
    Problems,
    Raw,
    StreamName,
    TtsId,
    TtsIds,
    alternatives,
    check_order,
    choice,
    key_parsers,
    parse_entries,
    split_host_port,
)
from ingestd.errors import ConfigError
from ingestd.secrets import SECRET_MIN_CHARS, Secret, register_secrets

CONFIG_ENV = "INGESTD_CONFIG"
DEFAULT_CONFIG_FILE = "ingestd.toml"
CREDENTIAL_NAME = "tts_api_key"  # systemd LoadCredential=tts_api_key:/path

DATABASE_URL_DEFAULT = "sqlite:///ingestd.db"
BATCH_MAX_EVENTS = 500
BATCH_MAX_DELAY_S = 0.1
TTS_BASE_URL_DEFAULT = "https://eu1.cloud.thethings.network"
TAIL_EVENTS = 1000  # TTS keeps ~100 per entity; a larger tail costs nothing (TTS_WIRE 1.6)
OVERLAP_S = 2.0
ENTITY_TTL_S = 86400.0  # TTS forgets an entity's history this long after its last event
IDLE_TIMEOUT_S = 120.0  # TTS sends no heartbeats (TTS_WIRE 1.4)
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 60.0
AUTH_RETRY_S = 300.0
CONNECT_TIMEOUT_S = 10.0
METRICS_LISTEN_DEFAULT = "127.0.0.1:9464"
HEALTH_GRACE_S = 180.0  # three of the longest reconnect delays
RETENTION_INTERVAL_S = 86400.0  # prune once a day

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["auto", "json", "console"]
_LEVEL_ALIASES = {"warn": "warning", "fatal": "critical"}
# Checked in every section (and stream) that has both keys.
_ORDERED = (("reconnect_min_s", "reconnect_max_s"), ("retry_base_s", "retry_max_s"))

# Each field below is the one declaration of its key: the type (see ingestd.config.values:
# PositiveFloat, TtsId, ApiKey, ...) says how the key is parsed and checked, the default is
# the built-in default. config/ingestd.example.toml documents every key (a test checks).


@dataclass(frozen=True, kw_only=True, slots=True, repr=False)
class DatabaseSettings:
    """Where rows go, and how the ingest batches are cut (PERF_NOTES: batch commits)."""

    url: DatabaseUrl = DATABASE_URL_DEFAULT
    batch_max_events: PositiveInt = BATCH_MAX_EVENTS  # flush a batch at this many events
    batch_max_delay_s: NonNegativeFloat = BATCH_MAX_DELAY_S  # ... or at the latest this often

    @property
    def safe_url(self) -> str:
        """``url`` with any password replaced by ``***``, for logs and ``status``."""
        try:
            return sa.make_url(self.url).render_as_string(hide_password=True)
        except ArgumentError:
            return "<unparseable database url>"

    def __repr__(self) -> str:
        return (
            f"DatabaseSettings(url={self.safe_url!r}, batch_max_events={self.batch_max_events!r},"
            f" batch_max_delay_s={self.batch_max_delay_s!r})"
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class TtsSettings:
    """The Things Stack to talk to, and defaults that every stream inherits."""

    base_url: BaseUrl = TTS_BASE_URL_DEFAULT
    api_key: ApiKey = None  # or api_key_file: the key read from that file
    tail: NonNegativeInt = TAIL_EVENTS
    overlap_s: NonNegativeFloat = OVERLAP_S
    entity_ttl_s: NonNegativeFloat = ENTITY_TTL_S  # TTS entity-ttl; 0: do not assume one
    idle_timeout_s: PositiveFloat = IDLE_TIMEOUT_S
    reconnect_min_s: PositiveFloat = RECONNECT_MIN_S
    reconnect_max_s: PositiveFloat = RECONNECT_MAX_S
    auth_retry_s: PositiveFloat = AUTH_RETRY_S
    connect_timeout_s: PositiveFloat = CONNECT_TIMEOUT_S
    # HTTP/2 from the first byte, also on http:// (h2c); off: h2 by ALPN on https, else 1.1.
    http2_prior_knowledge: bool = False


_INHERITED = tuple(f.name for f in fields(TtsSettings))


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamSettings(TtsSettings):
    """One event subscription: an application, or some of its devices; ``name`` keys the cursor.

    The fields inherited from ``TtsSettings`` come from ``[tts]`` unless the stream sets its own.
    """

    name: StreamName
    application_id: TtsId
    device_ids: TtsIds = ()  # empty: the whole application
    names: EventNames = ()  # TTS event-name filter: exact names or "/regexp/"


@dataclass(frozen=True, kw_only=True, slots=True)
class DownlinkSettings:
    """The outbox worker: off unless enabled."""

    enabled: bool = False
    poll_interval_s: PositiveFloat = 1.0
    max_attempts: PositiveInt = 8
    retry_base_s: PositiveFloat = 2.0
    retry_max_s: PositiveFloat = 300.0
    request_timeout_s: PositiveFloat = 10.0
    shutdown_grace_s: NonNegativeFloat = 5.0
    workers: PositiveInt = 1
    require_stream: bool = True  # only push for applications that have a configured stream
    stale_claim_s: PositiveFloat = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsSettings:
    """``/metrics`` and ``/healthz``; ``listen = ""`` disables the endpoint."""

    listen: ListenAddress = METRICS_LISTEN_DEFAULT
    health_grace_s: PositiveFloat = HEALTH_GRACE_S  # /healthz fails once a stream retries this long

    @property
    def host_port(self) -> tuple[str, int] | None:
        """``(host, port)`` to bind (IPv6 brackets removed), or ``None`` when disabled."""
        if not self.listen:
            return None
        return split_host_port(self.listen)


@dataclass(frozen=True, kw_only=True, slots=True)
class LoggingSettings:
    """Log level and rendering; ``auto`` is console on a TTY, JSON otherwise."""

    level: Annotated[LogLevel, Parse(choice(get_args(LogLevel), _LEVEL_ALIASES))] = "info"
    format: LogFormat = "auto"


SPOOL_MAX_BYTES = 1 << 30  # 1 GiB, ~400k uplinks: hours of a busy application
SPOOL_DIR_NAME = "spool"  # under $STATE_DIRECTORY (systemd StateDirectory=)


@dataclass(frozen=True, kw_only=True, slots=True)
class SpoolSettings:
    """The local spool that takes a stream's frames while the database stalls."""

    enabled: bool = True
    dir: str = ""  # "": $STATE_DIRECTORY/spool, else <sqlite file>-spool, else ./ingestd-spool
    max_bytes: PositiveInt = SPOOL_MAX_BYTES

    def root(self, database_url: str, environ: Mapping[str, str] | None = None) -> Path:
        """The spool directory (one subdirectory per stream), defaults resolved."""
        if self.dir:
            return Path(self.dir).expanduser()
        env = os.environ if environ is None else environ
        state = env.get("STATE_DIRECTORY", "").split(":")[0]
        if state:
            return Path(state) / SPOOL_DIR_NAME
        try:
            url = sa.make_url(database_url)
        except ArgumentError:
            url = None
        db = url.database if url is not None and url.get_backend_name() == "sqlite" else None
        if db and db != ":memory:" and not db.startswith("file:"):
            return Path(db + "-spool")  # beside the file, like SQLite's own -wal
        return Path("ingestd-spool")


@dataclass(frozen=True, kw_only=True, slots=True)
class BackfillSettings:
    """Healing gaps from the Storage Integration (ingestd.backfill); on by default."""

    enabled: bool = True
    settle_s: NonNegativeFloat = 120.0  # wait this long after a gap's end: storage is batched
    recheck_s: PositiveFloat = 1800.0  # then fetch the window once more, this much after the first
    margin_s: NonNegativeFloat = 60.0  # widen each gap by this on both sides (event vs received)
    poll_interval_s: PositiveFloat = 30.0  # how often to look for due gaps
    retry_s: PositiveFloat = 3600.0  # after a 404/403 or a failure, retry a stream this much later
    page_limit: PositiveInt = 1000  # messages per storage request (TTN answers at most 1 000)


@dataclass(frozen=True, kw_only=True, slots=True)
class RetentionSettings:
    """``max_age`` set: the daemon prunes rows older than it once a day (``ingestd.prune``)."""

    max_age: Age = None
    interval_s: PositiveFloat = RETENTION_INTERVAL_S


@dataclass(frozen=True, kw_only=True, slots=True)
class Settings:
    """Everything ingestd is configured with; ``source`` says where it came from."""

    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    tts: TtsSettings = field(default_factory=TtsSettings)
    streams: tuple[StreamSettings, ...] = ()
    downlinks: DownlinkSettings = field(default_factory=DownlinkSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    source: str = "built-in defaults"
    # ``${VAR}`` problems of API keys, raised by require_credentials (run/check need a key;
    # migrate, status and import do not).
    credential_problems: tuple[str, ...] = ()
    # What `run` logs and `check` prints as warnings: secrets exposed by the config file.
    warnings: tuple[str, ...] = ()

    def secret_values(self) -> list[str]:
        """Every secret held: each API key (and a TTS key's secret part), the database
        password; longest first."""
        found: set[str] = set()
        for key in (self.tts.api_key, *(s.api_key for s in self.streams)):
            if key is not None:
                value = key.reveal()
                found |= {value, value.rpartition(".")[2]}
        try:
            password = sa.make_url(self.database.url).password
        except ArgumentError:
            password = None
        if password:
            found.add(str(password))
        return sorted((s for s in found if len(s) >= SECRET_MIN_CHARS), key=len, reverse=True)

    def credentials_for(self, application_id: str) -> tuple[str, Secret | None]:
        """``(base_url, api_key)`` of the first stream for ``application_id``, else ``[tts]``'s."""
        for stream in self.streams:
            if stream.application_id == application_id:
                return stream.base_url, stream.api_key
        return self.tts.base_url, self.tts.api_key

    def require_credentials(self) -> None:
        """Raise ``ConfigError`` naming every stream (and the downlink fallback) without a key."""
        problems = [*self.credential_problems]
        problems += [
            f"streams[{i}] (name {s.name!r}): no api_key; set api_key or api_key_file in [tts] "
            f"or in this stream (config from {self.source})"
            for i, s in enumerate(self.streams)
            if s.api_key is None
        ]
        if (
            self.downlinks.enabled
            and not self.downlinks.require_stream
            and self.tts.api_key is None
        ):
            problems.append(
                "tts.api_key: downlinks.require_stream = false pushes for applications without "
                f"a stream with the [tts] key, but [tts] has none (config from {self.source})"
            )
        if problems:
            raise ConfigError(problems)


def default_settings() -> Settings:
    """The built-in defaults: a local SQLite file, no streams."""
    return Settings()


def load_settings(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """Load, override, validate; raise one ``ConfigError`` listing every problem."""
    env = os.environ if environ is None else environ
    problems = Problems()
    file, label, origin = _locate(path, env, problems)
    raw = RawConfig(sections={name: {} for name in SECTIONS})
    warnings: list[str] = []
    if file is not None:
        doc = load_toml(file, label, problems)
        if doc is not None:
            raw = raw_from_toml(
                doc,
                label=label,
                sections=SECTIONS,
                environ=env,
                base_dir=file.parent,
                problems=problems,
            )
    apply_env_overrides(raw, env, exclusive=_KEY_FIELDS, problems=problems)
    if file is not None:
        warnings += _exposure_warnings(file, label, raw)
    key_problems = report_unresolved(raw, problems, defer=_KEY_FIELDS)
    credential = _systemd_credential(raw, env)
    settings = _build(raw, problems)
    if problems:
        raise ConfigError(problems.lines)
    source = origin
    if raw.env_used:
        source += " + env " + ", ".join(raw.env_used)
    if credential:
        source += f" + credential {CREDENTIAL_NAME}"
    settings = dataclasses.replace(
        settings,
        source=source,
        credential_problems=tuple(key_problems),
        warnings=tuple(warnings),
    )
    register_secrets(settings.secret_values())
    return settings


def _exposure_warnings(file: Path, label: str, raw: RawConfig) -> list[str]:
    """A world-readable config file that holds a secret literally (not as ``${VAR}``)."""
    try:
        mode = file.stat().st_mode
    except OSError:
        return []
    if not mode & stat.S_IROTH:
        return []
    held: list[str] = []
    for section, entries in [
        ("tts", raw.sections["tts"]),
        *((f"streams[{i}]", entries) for i, entries in enumerate(raw.streams)),
    ]:
        entry = entries.get("api_key")
        if entry is not None and _literal(entry, label) and str(entry.value).strip():
            held.append(f"an API key in {section}.api_key")
    url = raw.sections["database"].get("url")
    if url is not None and _literal(url, label) and isinstance(url.value, str):
        try:
            has_password = bool(sa.make_url(url.value.strip()).password)
        except ArgumentError:
            has_password = False
        if has_password:
            held.append("a password in database.url")
    if not held:
        return []
    return [
        f"{label} is readable by every user (mode {stat.S_IMODE(mode):o}) and holds "
        f"{' and '.join(held)}: move secrets to ${{VAR}} or api_key_file, or run "
        f"`chmod o-r {label}`"
    ]


def _literal(entry: Raw, label: str) -> bool:
    """Written in the file as is (not a ``${VAR}`` expansion, not an env override)."""
    return not entry.text and entry.where.startswith(f"{label}: ")


def _locate(
    path: str | os.PathLike[str] | None, env: Mapping[str, str], problems: Problems
) -> tuple[Path | None, str, str]:
    """``(file or None, problem label, human origin)`` following the documented order."""
    if path is not None:
        label = os.fspath(path)
        if not Path(label).is_file():
            problems.add(label, "config file not found (given with --config)")
            return None, label, label
        return Path(label), label, label
    if env.get(CONFIG_ENV):
        label = env[CONFIG_ENV]
        if not Path(label).is_file():
            problems.add(label, f"config file not found (named by ${CONFIG_ENV})")
            return None, label, label
        return Path(label), label, f"{label} (${CONFIG_ENV})"
    if Path(DEFAULT_CONFIG_FILE).is_file():
        return Path(DEFAULT_CONFIG_FILE), DEFAULT_CONFIG_FILE, DEFAULT_CONFIG_FILE
    return None, "built-in defaults", "built-in defaults"


def _systemd_credential(raw: RawConfig, env: Mapping[str, str]) -> bool:
    """Use ``$CREDENTIALS_DIRECTORY/tts_api_key`` for ``[tts]`` when no key is set anywhere."""
    tts = raw.sections["tts"]
    directory = env.get("CREDENTIALS_DIRECTORY")
    empty_key = "api_key" in tts and tts["api_key"].value == ""  # "${TTS_API_KEY:-}"
    if not directory or "api_key_file" in tts or ("api_key" in tts and not empty_key):
        return False
    candidate = Path(directory) / CREDENTIAL_NAME
    if not candidate.is_file():
        return False
    tts.pop("api_key", None)
    tts["api_key_file"] = Raw(str(candidate), f"$CREDENTIALS_DIRECTORY/{CREDENTIAL_NAME}")
    return True


# --- derived from the declarations above ---------------------------------------------------

# The [section] tables: every field of Settings whose type is a settings dataclass.
SECTIONS: dict[str, type[Any]] = {
    name: hint
    for name, hint in get_type_hints(Settings).items()
    if isinstance(hint, type) and dataclasses.is_dataclass(hint)
}
_PARSERS: dict[str, dict[str, Parser]] = {name: key_parsers(cls) for name, cls in SECTIONS.items()}
_STREAM_PARSERS = key_parsers(StreamSettings)
_ALTERNATIVES: dict[type[Any], dict[str, str]] = {
    cls: alternatives(cls) for cls in (*SECTIONS.values(), StreamSettings)
}
# api_key <-> api_key_file: an env override of one drops the file's other.
_KEY_FIELDS = {
    key: other
    for pairs in _ALTERNATIVES.values()
    for alternative, name in pairs.items()
    for key, other in ((alternative, name), (name, alternative))
}


# --- building ----------------------------------------------------------------------------


def _build(raw: RawConfig, problems: Problems) -> Settings:
    """Parse every section and stream; a bad value leaves its default so checks go on."""
    parts: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        entries = raw.sections[name]
        values = parse_entries(entries, _PARSERS[name], section=name, problems=problems)
        _merge_alternatives(values, entries, _ALTERNATIVES[cls], problems)
        parts[name] = cls(**values)
        for pair in _ORDERED:
            check_order(values, entries, pair, problems)
    tts: TtsSettings = parts["tts"]
    inherited = {name: getattr(tts, name) for name in _INHERITED}
    streams: list[StreamSettings] = []
    first_use: dict[str, int] = {}
    for index, entries in enumerate(raw.streams):
        section = f"streams[{index}]"
        values = parse_entries(entries, _STREAM_PARSERS, section=section, problems=problems)
        _merge_alternatives(values, entries, _ALTERNATIVES[StreamSettings], problems)
        missing = [key for key in ("name", "application_id") if key not in entries]
        for key in missing:
            problems.add(raw.stream_where[index], f"missing required key '{key}'")
        label = values.get("name")
        if isinstance(label, str):
            if label in first_use:
                where = entries["name"].where
                problems.add(where, f"{label!r} is already the name of streams[{first_use[label]}]")
            first_use.setdefault(label, index)
        resolved = {**inherited, **values}
        for pair in _ORDERED:
            check_order(resolved, entries, pair, problems)
        if "name" in values and "application_id" in values:
            streams.append(StreamSettings(**resolved))
    return Settings(streams=tuple(streams), **parts)


def _merge_alternatives(
    values: dict[str, object],
    entries: Mapping[str, Raw],
    pairs: Mapping[str, str],
    problems: Problems,
) -> None:
    """Fold each alternative key into its field (``api_key_file`` into ``api_key``); setting
    both is ambiguous, so an error."""
    for alternative, name in pairs.items():
        if name in entries and alternative in entries:
            where = entries[alternative].where
            problems.add(where, f"set either {name} or {alternative}, not both")
        value = values.pop(alternative, None)
        if value is not None and name not in entries:
            values[name] = value
