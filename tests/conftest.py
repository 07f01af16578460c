"""Shared fixtures: real databases (SQLite file and PostgreSQL), one fresh database per test.

PostgreSQL comes from ``INGESTD_TEST_PG_URL`` (a server URL whose database we may use to
``CREATE DATABASE``). Without it the PostgreSQL cases skip locally; with
``--require-postgres`` (CI) a skip becomes a failure, so a missing server cannot hide.
Each PostgreSQL test gets ``CREATE DATABASE … TEMPLATE <migrated template>``: fast and
isolated (procrastinate's setup_db).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
import structlog
from sqlalchemy.engine import Engine
from support import ProcessTracker

from ingestd import migrate, secrets
from ingestd.db import create_engine

PG_URL_ENV = "INGESTD_TEST_PG_URL"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-postgres",
        action="store_true",
        help="fail (instead of skip) tests that need PostgreSQL when it is not available",
    )


def _pg_admin_url() -> str | None:
    return os.environ.get(PG_URL_ENV) or None


def _skip_or_fail(config: pytest.Config, reason: str) -> None:
    if config.getoption("--require-postgres"):
        pytest.fail(f"PostgreSQL required: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_template(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """(admin URL, template database name): a database migrated to head once per session."""
    admin = _pg_admin_url()
    if admin is None:
        _skip_or_fail(request.config, f"{PG_URL_ENV} is not set")
    assert admin is not None
    admin_engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    template = f"ingestd_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    try:
        with admin_engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{template}"')
    except sa.exc.OperationalError as exc:
        admin_engine.dispose()
        _skip_or_fail(request.config, f"cannot reach PostgreSQL at {PG_URL_ENV}: {exc}")
    tpl_url = sa.make_url(admin).set(database=template).render_as_string(hide_password=False)
    tpl_engine = create_engine(tpl_url)
    migrate.upgrade(tpl_engine)
    tpl_engine.dispose()
    yield admin, template
    with admin_engine.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
    admin_engine.dispose()


def _fresh_pg_database(admin: str, template: str | None, prefix: str = "t") -> Iterator[str]:
    """A new database (a copy of ``template`` when given), dropped when the test ends."""
    name = f"ingestd_{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"{clause}')
    try:
        yield sa.make_url(admin).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        engine.dispose()


def _fresh_sqlite_database(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ingestd.db'}"
    engine = create_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """URL of a fresh, migrated database of each dialect (one per test)."""
    if request.param == "sqlite":
        yield _fresh_sqlite_database(tmp_path)
    else:
        admin, template = request.getfixturevalue("pg_template")
        yield from _fresh_pg_database(admin, template)


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """URL of a fresh, migrated PostgreSQL database (PostgreSQL-only tests)."""
    admin, template = request.getfixturevalue("pg_template")
    yield from _fresh_pg_database(admin, template)


@pytest.fixture
def blank_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Like ``db_url`` but never migrated (for migration tests); parametrize it yourself."""
    dialect = getattr(request, "param", "sqlite")
    if dialect == "sqlite":
        yield f"sqlite:///{tmp_path / 'blank.db'}"
        return
    admin = _pg_admin_url()
    if admin is None:
        _skip_or_fail(request.config, f"{PG_URL_ENV} is not set")
    assert admin is not None
    yield from _fresh_pg_database(admin, None, prefix="b")


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An ingestd engine on the test's fresh database."""
    eng = create_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Every test starts with structlog's defaults, so capture_logs works and nothing leaks
    (nor do the secrets an earlier test's settings registered for masking)."""
    structlog.reset_defaults()
    secrets.forget_secrets()
    yield
    structlog.reset_defaults()
    secrets.forget_secrets()


# --- processes: none may outlive its test, nor the session (issue 8 item 14) -----------------

PR_SET_CHILD_SUBREAPER = 36
_children_at_start: set[int] = set()
_CALL_PASSED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    if call.when == "call":
        item.stash[_CALL_PASSED] = report.passed
    return report


@pytest.fixture
def procs(request: pytest.FixtureRequest) -> Iterator[ProcessTracker]:
    """Start processes through this; whatever still runs when the test ends is killed.

    A test that passed yet left a process running fails in teardown: it must stop what it
    starts (in a finally) itself.
    """
    tracker = ProcessTracker()
    yield tracker
    left = tracker.kill_all()
    if left and request.node.stash.get(_CALL_PASSED, False):
        pytest.fail(
            "the test left running: " + ", ".join(f"pid {p.pid} {p.args!r}" for p in left),
            pytrace=False,
        )


def _live_descendants(pid: int) -> list[int]:
    """Pids of ``pid``'s living (not zombie) descendants, from /proc."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            for kid in kids:
                try:
                    with open(f"/proc/{kid}/stat") as f:
                        state = f.read().rpartition(")")[2].split()[0]
                except OSError:
                    continue
                if state != "Z":
                    found.append(kid)
                todo.append(kid)
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def pytest_sessionstart(session: pytest.Session) -> None:
    # Orphans (a daemon whose parent script died) are re-parented to us rather than to
    # init, so the check at the end sees them too. Linux only; elsewhere the check sees
    # direct children.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _children_at_start.update(_live_descendants(os.getpid()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if any process it started is still alive; kill those."""
    left = [p for p in _live_descendants(os.getpid()) if p not in _children_at_start]
    if not left:
        return
    lines = [f"  pid {p}: {_cmdline(p)}" for p in left]
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = "processes still running at the end of the test session (killed now):"
    if reporter is not None:
        reporter.write_line(message, red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
