"""Configuration: file resolution, ${VAR}, overrides, secrets, and all-at-once validation."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta
from pathlib import Path

import pytest

from ingestd.config import (
    DatabaseSettings,
    DownlinkSettings,
    LoggingSettings,
    MetricsSettings,
    RetentionSettings,
    Settings,
    StreamSettings,
    TtsSettings,
    default_settings,
    load_settings,
)
from ingestd.config.values import Invalid, parse_age
from ingestd.errors import ConfigError
from ingestd.secrets import Secret

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "ingestd.example.toml"
KEY = "NNSXS." + "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFG" + "." + "Z" * 52
OTHER_KEY = "NNSXS." + "Q" * 39 + "." + "R" * 52
DB_PASSWORD = "hunter2-db-pass"

STREAM = """
[[streams]]
name = "water"
application_id = "acme-water"
"""


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests see none of the caller's INGESTD_* or key variables and run in an empty dir."""
    import os

    for name in list(os.environ):
        if name.startswith("INGESTD_") or name in ("TTS_API_KEY", "CREDENTIALS_DIRECTORY"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.problems


# --- where the file comes from ---------------------------------------------------------


def test_no_file_anywhere_gives_builtin_defaults() -> None:
    settings = load_settings(environ={})
    assert settings == default_settings()
    assert settings.source == "built-in defaults"
    assert settings.streams == ()
    assert settings.database.url == "sqlite:///ingestd.db"


def test_ingestd_toml_in_working_directory_is_picked_up(tmp_path: Path) -> None:
    write(tmp_path / "ingestd.toml", '[logging]\nlevel = "debug"\n')
    settings = load_settings(environ={})
    assert settings.logging.level == "debug"
    assert settings.source == "ingestd.toml"


def test_ingestd_config_env_wins_over_working_directory_file(tmp_path: Path) -> None:
    write(tmp_path / "ingestd.toml", '[logging]\nlevel = "debug"\n')
    other = write(tmp_path / "other.toml", '[logging]\nlevel = "error"\n')
    settings = load_settings(environ={"INGESTD_CONFIG": str(other)})
    assert settings.logging.level == "error"
    assert str(other) in settings.source


def test_missing_explicit_or_env_named_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: config file not found"):
        load_settings(tmp_path / "nope.toml", environ={})
    with pytest.raises(ConfigError, match=r"gone\.toml: config file not found.*INGESTD_CONFIG"):
        load_settings(environ={"INGESTD_CONFIG": "gone.toml"})


def test_toml_syntax_error_is_a_config_error_with_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.toml", '[database]\nurl = "sqlite:///x.db"\nbatch_max_events = \n')
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, environ={})
    [problem] = problems_of(excinfo)
    assert problem.startswith(f"{path}: TOML syntax error")
    assert "line 3" in problem


# --- values --------------------------------------------------------------------------------


def test_streams_inherit_tts_defaults_unless_they_set_their_own(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        f"""
[tts]
base_url = "https://tenant.eu1.cloud.thethings.industries/"
api_key = "{KEY}"
tail = 50
[[streams]]
name = "water"
application_id = "acme-water"
[[streams]]
name = "other-tenant"
application_id = "gas-meters"
device_ids = ["meter-1", "meter-2"]
names = ["as.up.data.forward", "/^as\\\\.down\\\\..*$/"]
base_url = "http://localhost:1885"
api_key = "{OTHER_KEY}"
idle_timeout_s = 30
""",
    )
    settings = load_settings(path, environ={})
    water, other = settings.streams
    assert water == StreamSettings(
        name="water",
        application_id="acme-water",
        base_url="https://tenant.eu1.cloud.thethings.industries",  # trailing "/" dropped
        api_key=Secret(KEY),
        tail=50,
    )
    assert other.device_ids == ("meter-1", "meter-2")
    assert other.names == ("as.up.data.forward", "/^as\\.down\\..*$/")
    assert (other.base_url, other.api_key, other.tail) == (
        "http://localhost:1885",
        Secret(OTHER_KEY),
        50,
    )
    assert other.idle_timeout_s == 30.0
    assert isinstance(other.idle_timeout_s, float)


def test_credentials_for_uses_first_stream_of_application_else_tts(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        f"""
[tts]
api_key = "{KEY}"
[[streams]]
name = "a"
application_id = "app-one"
base_url = "http://one.example:1885"
api_key = "{OTHER_KEY}"
[[streams]]
name = "b"
application_id = "app-one"
""",
    )
    settings = load_settings(path, environ={})
    assert settings.credentials_for("app-one") == ("http://one.example:1885", Secret(OTHER_KEY))
    assert settings.credentials_for("unknown-app") == (
        "https://eu1.cloud.thethings.network",
        Secret(KEY),
    )


def test_dollar_var_is_read_from_environment_with_optional_default(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        """
[database]
url = "postgresql+psycopg://ingestd:${PGPASS}@${PGHOST:-localhost}/ingestd"
[tts]
api_key = "${TTS_API_KEY}"
[metrics]
listen = "${METRICS_LISTEN:-}"
[downlinks]
workers = "${WORKERS}"
""",
    )
    settings = load_settings(
        path, environ={"PGPASS": DB_PASSWORD, "TTS_API_KEY": KEY, "WORKERS": "3"}
    )
    assert settings.database.url == f"postgresql+psycopg://ingestd:{DB_PASSWORD}@localhost/ingestd"
    assert settings.tts.api_key == Secret(KEY)
    assert settings.metrics.listen == ""
    assert settings.metrics.host_port is None
    assert settings.downlinks.workers == 3  # an expanded string is parsed to the field's type


def test_missing_variable_names_the_key_and_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[tts]\napi_key = "${TTS_API_KEY}"\n' + STREAM)
    settings = load_settings(path, environ={})  # commands without TTS calls still work
    with pytest.raises(ConfigError) as excinfo:
        settings.require_credentials()  # run and check name the key and the variable
    assert problems_of(excinfo)[0] == (
        f"{path}: tts.api_key: environment variable TTS_API_KEY is not set"
    )


def test_api_key_file_is_read_and_stripped(tmp_path: Path) -> None:
    write(tmp_path / "key.txt", f"  {KEY}\n")
    path = write(tmp_path / "c.toml", '[tts]\napi_key_file = "key.txt"\n' + STREAM)
    settings = load_settings(path, environ={})  # relative to the config file's directory
    assert settings.tts.api_key == Secret(KEY)
    assert settings.streams[0].api_key == Secret(KEY)


def test_api_key_and_api_key_file_together_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "key.txt", KEY)
    path = write(
        tmp_path / "c.toml",
        f'[tts]\napi_key = "{OTHER_KEY}"\napi_key_file = "{tmp_path / "key.txt"}"\n',
    )
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, environ={})
    assert problems_of(excinfo) == [
        f"{path}: tts.api_key_file: set either api_key or api_key_file, not both"
    ]


def test_unreadable_api_key_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[tts]\napi_key_file = "/nonexistent/key"\n')
    with pytest.raises(ConfigError, match=r"tts\.api_key_file: cannot read '/nonexistent/key'"):
        load_settings(path, environ={})


def test_systemd_credential_is_used_when_no_key_is_configured(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "tts_api_key", KEY + "\n")
    path = write(tmp_path / "c.toml", STREAM)
    settings = load_settings(path, environ={"CREDENTIALS_DIRECTORY": str(creds)})
    assert settings.tts.api_key == Secret(KEY)
    assert settings.streams[0].api_key == Secret(KEY)
    assert "credential tts_api_key" in settings.source
    # A configured key wins over the credential.
    settings = load_settings(
        path, environ={"CREDENTIALS_DIRECTORY": str(creds), "INGESTD_TTS__API_KEY": OTHER_KEY}
    )
    assert settings.tts.api_key == Secret(OTHER_KEY)


# --- environment overrides -----------------------------------------------------------------


def test_env_overrides_are_parsed_to_the_field_type(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", STREAM + "[downlinks]\nenabled = false\n")
    settings = load_settings(
        path,
        environ={
            "INGESTD_DATABASE__URL": "sqlite:///elsewhere.db",
            "INGESTD_DATABASE__BATCH_MAX_EVENTS": "250",
            "INGESTD_DATABASE__BATCH_MAX_DELAY_S": "0.5",
            "INGESTD_TTS__API_KEY": KEY,
            "INGESTD_DOWNLINKS__ENABLED": "yes",
            "INGESTD_LOGGING__LEVEL": "WARNING",
            "INGESTD_STREAMS__0__DEVICE_IDS": "meter-1, meter-2",
            "INGESTD_STREAMS__0__NAMES": '["/as\\\\.up\\\\..{1,3}/"]',
            "INGESTD_CONFIG_UNRELATED": "ignored: no __ after the prefix",
        },
    )
    assert settings.database == DatabaseSettings(
        url="sqlite:///elsewhere.db", batch_max_events=250, batch_max_delay_s=0.5
    )
    assert settings.tts.api_key == Secret(KEY)
    assert settings.streams[0].api_key == Secret(KEY)
    assert settings.downlinks.enabled is True
    assert settings.logging.level == "warning"
    assert settings.streams[0].device_ids == ("meter-1", "meter-2")
    assert settings.streams[0].names == ("/as\\.up\\..{1,3}/",)
    assert " + env INGESTD_DATABASE__BATCH_MAX_DELAY_S, INGESTD_DATABASE__BATCH_MAX_EVENTS" in (
        settings.source
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False), ("no", False)],
)
def test_env_booleans(text: str, *, expected: bool) -> None:
    settings = load_settings(environ={"INGESTD_DOWNLINKS__ENABLED": text})
    assert settings.downlinks.enabled is expected


def test_env_key_override_replaces_a_key_file_from_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.toml", '[tts]\napi_key_file = "/nonexistent/key"\n')
    settings = load_settings(path, environ={"INGESTD_TTS__API_KEY": KEY})
    assert settings.tts.api_key == Secret(KEY)


def test_bad_env_overrides_are_all_reported() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_settings(
            environ={
                "INGESTD_DATABASE__BATCH_MAX_EVENTS": "lots",
                "INGESTD_DATABSE__URL": "sqlite://",
                "INGESTD_TTS__API_KYE": KEY,
                "INGESTD_STREAMS__0__TAIL": "5",
                "INGESTD_DOWNLINKS__ENABLED": "maybe",
            }
        )
    assert sorted(problems_of(excinfo)) == sorted(
        [
            "env INGESTD_DATABASE__BATCH_MAX_EVENTS: expected an integer, got 'lots'",
            "env INGESTD_DATABSE__URL: unknown section 'databse' (did you mean 'database'?)",
            "env INGESTD_TTS__API_KYE: unknown key 'api_kye' in [tts] (did you mean 'api_key'?)",
            "env INGESTD_STREAMS__0__TAIL: there is no streams[0] to override "
            "(0 stream(s) configured; streams come from the file)",
            "env INGESTD_DOWNLINKS__ENABLED: expected true or false, got 'maybe'",
        ]
    )


# --- validation ----------------------------------------------------------------------------


def test_validation_reports_every_problem_at_once(tmp_path: Path) -> None:
    write(
        tmp_path / "ingestd.toml",
        """
[database]
url = "mysql://u@h/db"
batch_max_event = 10

[tts]
base_url = "ftp://eu1.cloud.thethings.network"
tail = "lots"
reconnect_min_s = 10.0
reconnect_max_s = 5.0

[loging]
level = "debug"

[logging]
level = "verbose"
format = "xml"

[metrics]
listen = "9464"

[downlinks]
workers = 0
enabled = "true"

[[streams]]
name = "water"
application_id = "acme-water"
device_ids = ["ok-device", "Bad_Device"]
names = ["as.up.data.forward", "/[unclosed/", "Uplink"]

[[streams]]
name = "water"
application_id = "Bad_App"

[[streams]]
application_id = "acme-gas"
""",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_settings(environ={})
    got = problems_of(excinfo)
    expected = [
        "ingestd.toml: database.url: unsupported database 'mysql' (expected sqlite or postgresql)",
        "ingestd.toml: database.batch_max_event: unknown key 'batch_max_event' in [database]"
        " (did you mean 'batch_max_events'?)",
        "ingestd.toml: tts.base_url: expected an http(s) URL"
        " (e.g. https://eu1.cloud.thethings.network), got 'ftp://eu1.cloud.thethings.network'",
        "ingestd.toml: tts.tail: expected an integer, got 'lots'",
        "ingestd.toml: tts.reconnect_max_s: reconnect_min_s (10.0) must not exceed"
        " reconnect_max_s (5.0)",
        "ingestd.toml: loging: unknown section (did you mean 'logging'?)",
        "ingestd.toml: logging.level: expected one of debug, info, warning, error, critical,"
        " got 'verbose'",
        "ingestd.toml: logging.format: expected one of auto, json, console, got 'xml'",
        'ingestd.toml: metrics.listen: expected host:port (e.g. 127.0.0.1:9464) or "" to'
        " disable, got '9464'",
        "ingestd.toml: downlinks.workers: must be greater than 0, got 0",
        "ingestd.toml: downlinks.enabled: expected true or false, got 'true'",
        "ingestd.toml: streams[0].device_ids: 'Bad_Device' is not a valid TTS id"
        " (lowercase a-z0-9 and single dashes, 3-36 chars)",
        "ingestd.toml: streams[0].names: '/[unclosed/' would be refused by TTS with"
        " invalid_regexp (invalid regexp: missing ]: [unclosed (TTS uses Go RE2 syntax));"
        " 'Uplink' would be refused by TTS with unknown_event_name (unknown event `Uplink`"
        " among the 248 event names of TTS v3.32)",
        "ingestd.toml: streams[1].name: 'water' is already the name of streams[0]",
        "ingestd.toml: streams[1].application_id: 'Bad_App' is not a valid TTS id"
        " (lowercase a-z0-9 and single dashes, 3-36 chars)",
        "ingestd.toml: streams[2]: missing required key 'name'",
    ]
    assert sorted(got) == sorted(expected)
    assert str(excinfo.value).count("\n  - ") == len(expected)


@pytest.mark.parametrize(
    "app_id",
    ["ab", "-abc", "abc-", "a--b", "ABC", "a_b", "a" * 37],
)
def test_invalid_application_ids_are_rejected(tmp_path: Path, app_id: str) -> None:
    path = write(tmp_path / "c.toml", f'[[streams]]\nname = "s"\napplication_id = "{app_id}"\n')
    with pytest.raises(ConfigError, match="is not a valid TTS id"):
        load_settings(path, environ={})


def test_valid_edge_case_ids_and_listen_addresses(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        f"""
[metrics]
listen = "[::1]:0"
[[streams]]
name = "s"
application_id = "{"a" * 36}"
device_ids = ["a-b-c", "0ab"]
""",
    )
    settings = load_settings(path, environ={})
    assert settings.metrics.host_port == ("::1", 0)
    assert settings.streams[0].device_ids == ("a-b-c", "0ab")


def test_postgres_url_without_driver_uses_psycopg3() -> None:
    settings = load_settings(environ={"INGESTD_DATABASE__URL": "postgresql://u@db/ingestd"})
    assert settings.database.url == "postgresql+psycopg://u@db/ingestd"


def test_unparseable_database_url_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"DATABASE__URL: is not a valid database URL"):
        load_settings(environ={"INGESTD_DATABASE__URL": "not a url"})


def test_require_credentials_names_every_stream_without_a_key(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        f"""
[[streams]]
name = "a"
application_id = "app-one"
[[streams]]
name = "b"
application_id = "app-two"
api_key = "{KEY}"
[[streams]]
name = "c"
application_id = "app-three"
""",
    )
    settings = load_settings(path, environ={})  # loading alone does not require a key (import)
    with pytest.raises(ConfigError) as excinfo:
        settings.require_credentials()
    got = problems_of(excinfo)
    assert len(got) == 2
    assert got[0].startswith("streams[0] (name 'a'): no api_key")
    assert got[1].startswith("streams[2] (name 'c'): no api_key")
    load_settings(path, environ={"INGESTD_TTS__API_KEY": KEY}).require_credentials()


# --- secrets ---------------------------------------------------------------------------------


def test_secret_hides_itself_but_compares_and_hashes_by_value() -> None:
    secret = Secret(KEY)
    assert repr(secret) == str(secret) == "Secret('***')"
    assert f"{secret}" == "Secret('***')"
    assert secret.reveal() == KEY
    assert secret == Secret(KEY)
    assert secret != Secret(OTHER_KEY)
    assert secret != KEY
    assert len({secret, Secret(KEY)}) == 1


def test_secrets_never_appear_in_reprs(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        f"""
[database]
url = "postgresql+psycopg://ingestd:{DB_PASSWORD}@db/ingestd"
[tts]
api_key = "{KEY}"
"""
        + STREAM,
    )
    settings = load_settings(path, environ={})
    text = repr(settings) + str(settings)
    assert KEY not in text
    assert DB_PASSWORD not in text
    assert "postgresql+psycopg://ingestd:***@db/ingestd" in text
    assert settings.database.safe_url == "postgresql+psycopg://ingestd:***@db/ingestd"
    assert settings.database.url.count(DB_PASSWORD) == 1  # the real URL is still usable


def test_secrets_never_appear_in_config_errors(tmp_path: Path) -> None:
    """A key or password in the wrong place, or beside another error, is never echoed."""
    path = write(
        tmp_path / "c.toml",
        f"""
[database]
url = "postgresql+psycopg://ingestd:{DB_PASSWORD}@db/ingestd"
batch_max_events = "{KEY}"
[tts]
api_kye = "{KEY}"
base_url = "{KEY}"
api_key = 5
[[streams]]
name = "s"
application_id = "app-one"
tail = "{OTHER_KEY}"
api_key = ["{KEY}"]
""",
    )
    with pytest.raises(ConfigError) as excinfo:
        load_settings(
            path,
            environ={
                "INGESTD_DATABASE__BATCH_MAX_DELAY_S": f"https://u:{DB_PASSWORD}@x",
                "INGESTD_TTS__TAIL": f"Bearer {KEY}",
                "INGESTD_LOGGING__LEVEL": f"postgresql://ingestd:{DB_PASSWORD}@db",
            },
        )
    text = str(excinfo.value) + repr(excinfo.value) + "\n".join(problems_of(excinfo))
    assert len(problems_of(excinfo)) == 9
    # Not even a part: long values are shortened for display only after masking.
    for secret in (KEY[6:], OTHER_KEY[6:], DB_PASSWORD, "ZZZZ", "RRRR", "QQQQ"):
        assert secret not in text
    assert "tts.api_key: expected a string, got a number" in text


def test_settings_are_frozen() -> None:
    settings = default_settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.database = DatabaseSettings()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.logging.level = "debug"  # type: ignore[misc]
    assert hash(settings) == hash(default_settings())


# --- the example file ------------------------------------------------------------------------


def test_example_config_is_valid_and_documents_every_field_with_its_default() -> None:
    settings = load_settings(EXAMPLE, environ={"TTS_API_KEY": KEY})
    settings.require_credentials()
    assert settings.tts.api_key == Secret(KEY)
    assert [s.name for s in settings.streams] == ["water-meters"]
    # Shown values are the defaults, so the file cannot drift from the code.
    defaults = default_settings()
    assert settings.database == defaults.database
    assert dataclasses.replace(settings.tts, api_key=None) == defaults.tts
    assert settings.downlinks == defaults.downlinks
    assert settings.metrics == defaults.metrics
    assert settings.logging == defaults.logging
    assert settings.retention == defaults.retention

    text = EXAMPLE.read_text(encoding="utf-8")
    assert KEY not in text
    documented = set(re.findall(r"^[#\s]*([a-z0-9_]+)\s*=", text, flags=re.MULTILINE))
    every_class = (
        DatabaseSettings,
        TtsSettings,
        StreamSettings,
        DownlinkSettings,
        MetricsSettings,
        LoggingSettings,
        RetentionSettings,
    )
    missing = {
        f"{cls.__name__}.{f.name}"
        for cls in every_class
        for f in dataclasses.fields(cls)
        if f.name not in documented
    }
    assert missing == set()
    assert "api_key_file" in documented
    assert {f.name for f in dataclasses.fields(Settings)} - {
        "source",
        "credential_problems",
        "warnings",
    } <= set(re.findall(r"^#?\s*\[+([a-z]+)\]+", text, flags=re.MULTILINE))


def test_example_config_without_the_key_variable_says_which_variable() -> None:
    with pytest.raises(ConfigError, match=r"tts\.api_key: environment variable TTS_API_KEY"):
        load_settings(EXAMPLE, environ={}).require_credentials()


def test_an_env_key_file_stands_in_for_an_unset_var_in_the_file(tmp_path: Path) -> None:
    """The example config says api_key = "${TTS_API_KEY}"; a container that passes
    INGESTD_TTS__API_KEY_FILE instead must not fail on the unset variable."""
    key = "NNSXS." + "C" * 39 + "." + "D" * 52
    (tmp_path / "key").write_text(key + "\n")
    cfg = tmp_path / "ingestd.toml"
    cfg.write_text('[tts]\napi_key = "${TTS_API_KEY}"\n')
    settings = load_settings(cfg, environ={"INGESTD_TTS__API_KEY_FILE": str(tmp_path / "key")})
    assert settings.tts.api_key is not None
    assert settings.tts.api_key.reveal() == key
    without = load_settings(cfg, environ={})  # migrate/status/import need no key
    assert without.tts.api_key is None
    with pytest.raises(ConfigError, match="TTS_API_KEY is not set"):
        without.require_credentials()  # run and check do


# --- values that used to pass and then broke at run time -----------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("application_id", "acme-water\\n"),
        ("device_ids", ["wm-0001\\n"]),
        ("names", ["as.up.data.forward\\n"]),
    ],
)
def test_a_trailing_newline_does_not_pass_the_id_and_name_checks(
    tmp_path: Path, key: str, value: object
) -> None:
    """`$` matched before a final newline; TTS then refused every request for the id."""
    rendered = f'"{value}"' if isinstance(value, str) else f'["{value[0]}"]'  # type: ignore[index]
    lines = ['name = "s"', 'application_id = "acme-water"']
    lines = [line for line in lines if not line.startswith(key)] + [f"{key} = {rendered}"]
    path = write(tmp_path / "c.toml", "[[streams]]\n" + "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, environ={})
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{path}: streams[0].{key}: ")
    assert "\\n" in problem  # the value is shown with its newline visible


@pytest.mark.parametrize(
    "url",
    [
        "https://eu1.cloud.thethings.network/api/v3",
        "https://eu1.cloud.thethings.network/console/",
        "https://eu1.cloud.thethings.network?tenant=x",
        "https://eu1.cloud.thethings.network/?",
        "https://eu1.cloud.thethings.network#frag",
    ],
)
def test_base_url_with_a_path_query_or_fragment_is_rejected(url: str) -> None:
    """ingestd appends /api/v3/...: a path doubled it, a query or fragment swallowed it."""
    with pytest.raises(ConfigError) as excinfo:
        load_settings(environ={"INGESTD_TTS__BASE_URL": url})
    (problem,) = problems_of(excinfo)
    assert problem.startswith("env INGESTD_TTS__BASE_URL: must be the server's root URL")
    assert repr(url) in problem


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("https://eu1.cloud.thethings.network:99999", "has an invalid port"),
        ("https://eu1.cloud.thethings.network:x", "has an invalid port"),
        ("https://eu1.cloud.thethings.network\t", None),  # surrounding whitespace is trimmed
        ("https://eu1.cloud\n.thethings.network", "must not contain spaces or control"),
    ],
)
def test_base_url_ports_and_whitespace(url: str, why: str | None) -> None:
    environ = {"INGESTD_TTS__BASE_URL": url}
    if why is None:
        assert load_settings(environ=environ).tts.base_url == url.strip()
        return
    with pytest.raises(ConfigError, match=why):
        load_settings(environ=environ)


def test_base_url_trailing_slash_is_dropped() -> None:
    settings = load_settings(environ={"INGESTD_TTS__BASE_URL": "http://127.0.0.1:1885/"})
    assert settings.tts.base_url == "http://127.0.0.1:1885"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "must not be empty"),
        ("   ", "must not be empty"),
        ("s" * 201, "is 201 characters long; at most 200 fit the database's stream columns"),
        ("water\\u0000", "must not contain control characters, got 'water\\x00'"),
        ("wa\\nter", "must not contain control characters, got 'wa\\nter'"),
        ("water\\u001b[31m", "must not contain control characters, got 'water\\x1b[31m'"),
    ],
)
def test_stream_names_must_fit_the_stream_columns(tmp_path: Path, name: str, problem: str) -> None:
    """A name over 200 characters made PostgreSQL refuse every batch of the stream."""
    path = write(tmp_path / "c.toml", f'[[streams]]\nname = "{name}"\napplication_id = "acme"\n')
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, environ={})
    assert problems_of(excinfo) == [f"{path}: streams[0].name: {problem}"]


def test_the_longest_stream_name_is_the_stream_columns_size(tmp_path: Path) -> None:
    from ingestd import schema
    from ingestd.config.values import STREAM_NAME_MAX_CHARS

    sizes = {
        t.c.stream.type.length  # type: ignore[attr-defined]
        for t in (schema.events, schema.stream_cursors, schema.stream_gaps, schema.rejected_events)
    }
    assert sizes == {STREAM_NAME_MAX_CHARS}
    name = "ü" * STREAM_NAME_MAX_CHARS  # characters, not bytes, on both databases
    path = write(tmp_path / "c.toml", f'[[streams]]\nname = "{name}"\napplication_id = "acme"\n')
    assert load_settings(path, environ={}).streams[0].name == name


# --- secrets: masked by value, and a file that shows them to every user --------------------


def test_loading_settings_registers_their_secrets_for_masking(tmp_path: Path) -> None:
    from ingestd.secrets import redact

    path = write(
        tmp_path / "c.toml",
        f'[database]\nurl = "postgresql://u:{DB_PASSWORD}@db/x"\n[tts]\napi_key = "plain-key-1"\n'
        f'{STREAM}api_key = "${{OTHER}}"\n',
    )
    path.chmod(0o600)
    settings = load_settings(path, environ={"OTHER": "other-key-2"})
    assert settings.warnings == ()
    text = f"401: plain-key-1 / other-key-2 / {DB_PASSWORD} / {KEY}"
    assert redact(text) == "401: *** / *** / *** / NNSXS.***"


@pytest.mark.parametrize(
    ("body", "environ", "held"),
    [
        ('[tts]\napi_key = "literal-key"\n', {}, "an API key in tts.api_key"),
        (f'{STREAM}api_key = "literal-key"\n', {}, "an API key in streams[0].api_key"),
        (
            f'[database]\nurl = "postgresql://u:{DB_PASSWORD}@db/x"\n',
            {},
            "a password in database.url",
        ),
        ('[tts]\napi_key = "${K}"\n', {"K": "from-env"}, None),
        ('[tts]\napi_key = "${K:-}"\n', {}, None),
        ('[database]\nurl = "postgresql://u:${PW}@db/x"\n', {"PW": "pw-from-env"}, None),
        ('[database]\nurl = "postgresql://u@db/x"\n', {}, None),
        ('[tts]\napi_key = "literal-key"\n', {"INGESTD_TTS__API_KEY": "env-key"}, None),
    ],
)
def test_a_world_readable_file_with_a_literal_secret_is_warned_about(
    tmp_path: Path, body: str, environ: dict[str, str], held: str | None
) -> None:
    path = write(tmp_path / "c.toml", body)
    path.chmod(0o644)
    warnings = load_settings(path, environ=environ).warnings
    if held is None:
        assert warnings == ()
        return
    (warning,) = warnings
    assert warning == (
        f"{path} is readable by every user (mode 644) and holds {held}: move secrets to "
        f"${{VAR}} or api_key_file, or run `chmod o-r {path}`"
    )
    assert "literal-key" not in warning and DB_PASSWORD not in warning
    path.chmod(0o640)
    assert load_settings(path, environ=environ).warnings == ()


def test_retention_max_age_reads_durations_and_names_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "ingestd.toml"
    path.write_text('[retention]\nmax_age = "90d"\n', encoding="utf-8")
    assert load_settings(path, environ={}).retention.max_age == timedelta(days=90)
    env = {"INGESTD_RETENTION__MAX_AGE": "12h"}
    assert load_settings(path, environ=env).retention.max_age == timedelta(hours=12)
    with pytest.raises(ConfigError, match=r"env INGESTD_RETENTION__MAX_AGE: expected a positive"):
        load_settings(path, environ={"INGESTD_RETENTION__MAX_AGE": "90 days"})
    assert default_settings().retention.max_age is None  # off by default


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90d", 90 * 86400),
        ("12h", 43200),
        ("30m", 1800),
        ("45s", 45),
        ("2w", 14 * 86400),
        ("1.5h", 5400),
    ],
)
def test_parse_age(text: str, seconds: float) -> None:
    assert parse_age(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "-1d", "90", "d", "90 days", "1y"])
def test_parse_age_rejects(text: str) -> None:
    with pytest.raises(Invalid):
        parse_age(text)


# --- names as TTS judges them (issue 11) -------------------------------------------------


def _names_config(tmp_path: Path, names: list[str]) -> Path:
    import json

    return write(tmp_path / "c.toml", STREAM + f"names = {json.dumps(names)}\n")


@pytest.mark.parametrize(
    ("entry", "error_name"),
    [
        ("as.up.data.forwarded", "unknown_event_name"),  # dotted, but not a TTS event
        ("/^gs\\.nothing\\./", "no_matching_events"),
        ("/[unclosed/", "invalid_regexp"),
        ("/^as\\.(?!down)/", "invalid_regexp"),  # look-ahead: Python re has it, RE2 not
        ("/^as\\.up\\.data\\.forward\\Z/", "invalid_regexp"),  # \Z: Python only
    ],
)
def test_a_names_filter_tts_refuses_is_a_config_error_naming_the_key_and_tts_error(
    tmp_path: Path, entry: str, error_name: str
) -> None:
    """Before, these loaded and the stream got a 400 on every reconnect."""
    path = _names_config(tmp_path, ["as.up.data.forward", entry])
    with pytest.raises(ConfigError) as excinfo:
        load_settings(path, environ={})
    (problem,) = problems_of(excinfo)
    assert problem.startswith(f"{path}: streams[0].names: {entry!r} would be refused by TTS")
    assert f"with {error_name} (" in problem


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        # The Console's default filter: unknown to the old simulator's 62 names.
        ("/^ns\\.mac\\..*\\.answer\\.reject$/", "ns.mac.link_adr.answer.reject"),
        ("/^as\\.up\\.data\\.forward\\z/", "as.up.data.forward"),  # \z: RE2 only
        ("ns.mac.rx_param_setup.answer.reject", "ns.mac.rx_param_setup.answer.reject"),
        ("/", "as.up.data.forward"),  # the empty regexp: every event, as in TTS
    ],
)
def test_names_tts_accepts_load_even_where_python_re_would_not(
    tmp_path: Path, entry: str, expected: str
) -> None:
    from ingestd.eventnames import expand_names

    settings = load_settings(_names_config(tmp_path, [entry]), environ={})
    assert settings.streams[0].names == (entry,)
    assert expected in expand_names(settings.streams[0].names)


def test_http2_prior_knowledge_is_inherited_and_may_be_set_per_stream(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.toml",
        "[tts]\nhttp2_prior_knowledge = true\n"
        + STREAM
        + '[[streams]]\nname = "gas"\napplication_id = "acme-gas"\nhttp2_prior_knowledge = false\n',
    )
    settings = load_settings(path, environ={})
    assert settings.tts.http2_prior_knowledge is True
    assert [s.http2_prior_knowledge for s in settings.streams] == [True, False]
    assert default_settings().tts.http2_prior_knowledge is False
    with pytest.raises(ConfigError, match=r"tts\.http2_prior_knowledge: expected true or false"):
        load_settings(
            write(tmp_path / "d.toml", '[tts]\nhttp2_prior_knowledge = "yes"\n'), environ={}
        )
