"""``ingestd migrate`` and ``ingestd import`` as a user runs them: real processes, real files."""

from __future__ import annotations

import os
import pty
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from ingestd.sim import events as eventgen

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)


def _capture(path: Path, n: int, *, framing: str = "blank") -> Path:
    rng = random.Random(3)
    ulids = eventgen.UlidFactory(rng)
    prefix, delim = {
        "blank": (b"", b"\n\n"),
        "ndjson": (b"", b"\n"),
        "sse": (b"data: ", b"\r\n\r\n"),
    }[framing]
    with path.open("wb") as out:
        for i in range(n):
            t = T0 + timedelta(seconds=i)
            ev = eventgen.uplink_event(
                application_id="acme-app",
                device_id=f"dev-{i % 3}",
                dev_eui=f"70B3D57ED00000{i % 3:02X}",
                f_cnt=i,
                f_port=1,
                payload=b"\x01\x02",
                gateways=2,
                time=t,
                unique_id=ulids(t),
                rng=rng,
            )
            out.write(prefix + orjson.dumps({"result": ev}) + delim)
    return path


def _ingestd(
    *args: str, env_extra: dict[str, str] | None = None, cwd: Path, **kw: object
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "ingestd", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("framing", ["blank", "ndjson", "sse"])
def test_migrate_then_import_then_reimport(db_url: str, tmp_path: Path, framing: str) -> None:
    cap = _capture(tmp_path / "cap.txt", 40, framing=framing)
    env = {"INGESTD_DATABASE__URL": db_url}

    migrated = _ingestd("migrate", env_extra=env, cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    again = _ingestd("migrate", env_extra=env, cwd=tmp_path)
    assert again.returncode == 0
    assert "already at revision" in again.stdout

    first = _ingestd("import", str(cap), "--stream", "cap", env_extra=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert _line(first.stdout, "events stored") == 40
    assert _line(first.stdout, "uplinks") == 40
    assert _line(first.stdout, "gateway receptions") == 80
    assert _line(first.stdout, "duplicates skipped") == 0

    second = _ingestd("import", str(cap), "--stream", "cap", env_extra=env, cwd=tmp_path)
    assert second.returncode == 0
    assert _line(second.stdout, "events stored") == 0
    assert _line(second.stdout, "duplicates skipped") == 40

    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM uplinks")).scalar_one() == 40
        cursor = conn.execute(
            sa.text("SELECT last_event_time FROM stream_cursors WHERE stream='cap'")
        ).scalar_one()
    engine.dispose()
    assert cursor is not None


def test_import_from_stdin_into_the_default_sqlite_file(tmp_path: Path) -> None:
    cap = _capture(tmp_path / "cap.txt", 5)
    with cap.open("rb") as f:
        res = subprocess.run(
            [sys.executable, "-m", "ingestd", "import", "-"],
            cwd=tmp_path,
            stdin=f,
            capture_output=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")},
        )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "ingestd.db").exists()  # the documented default database
    assert b"events stored                 5" in res.stdout
    assert b"events/s," not in res.stderr  # piped: no progress line, only the summary


def test_progress_is_shown_on_a_terminal(tmp_path: Path) -> None:
    cap = _capture(tmp_path / "cap.txt", 1200)
    leader, follower = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    env["INGESTD_DATABASE__BATCH_MAX_EVENTS"] = "50"
    proc = subprocess.run(
        [sys.executable, "-m", "ingestd", "import", str(cap)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=follower,
        timeout=120,
    )
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.returncode == 0
    assert b"events/s" in out
    assert b"MiB" in out


def test_a_bad_config_exits_2_and_names_every_bad_key(tmp_path: Path) -> None:
    (tmp_path / "ingestd.toml").write_text(
        '[database]\nurl = 5\nbatch_max_events = "many"\n[loging]\nlevel = "info"\n'
    )
    res = _ingestd("import", "-", cwd=tmp_path, input="")
    assert res.returncode == 2
    for key in ("database.url", "database.batch_max_events", "loging"):
        assert key in res.stderr


def _line(stdout: str, label: str) -> int:
    for line in stdout.splitlines():
        if line.strip().startswith(label):
            return int(line.split()[-1].replace(",", ""))
    raise AssertionError(f"no {label!r} line in:\n{stdout}")


def test_the_bundled_sample_capture_imports_every_family(db_url: str, tmp_path: Path) -> None:
    """README: `ingestd migrate` then `ingestd import tests/data/capture.txt`."""
    sample = Path(__file__).resolve().parents[1] / "data" / "capture.txt"
    env = {"INGESTD_DATABASE__URL": db_url}
    assert _ingestd("migrate", env_extra=env, cwd=tmp_path).returncode == 0
    res = _ingestd("import", str(sample), env_extra=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert _line(res.stdout, "events stored") == 40  # the stream-start frame is not an event
    assert _line(res.stdout, "uplinks") == 29  # the sparse replay is kept only in events
    assert _line(res.stdout, "gateway receptions") == 55
    assert _line(res.stdout, "joins") == 1
    assert _line(res.stdout, "downlink events") == 8
    assert _line(res.stdout, "rejected") == 0


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("captures", "ingestd: import: {path} is a directory, not a capture file"),
        ("missing.txt", "ingestd: import: cannot read {path}: No such file or directory"),
    ],
)
def test_an_unreadable_input_exits_2_with_one_line(
    tmp_path: Path, target: str, message: str
) -> None:
    """A directory or a missing file printed a traceback."""
    (tmp_path / "captures").mkdir()
    path = tmp_path / target
    res = _ingestd("import", str(path), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.splitlines() == [message.format(path=path)]
    assert res.stdout == ""
    assert not (tmp_path / "ingestd.db").exists()  # nothing was created either


def test_an_import_stream_name_that_does_not_fit_exits_2(tmp_path: Path) -> None:
    res = _ingestd("import", "--stream", "s" * 201, "-", cwd=tmp_path, input="")
    assert res.returncode == 2
    assert res.stderr.splitlines() == [
        "ingestd: import: --stream is 201 characters long; at most 200 fit the database's "
        "stream columns"
    ]
