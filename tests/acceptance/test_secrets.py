"""Configured secrets stay secret whatever their shape: a server that echoes the key in its
401 body gets it into no log line, no ``last_error`` column and no ``status``/``check``
output; and a world-readable config file that holds a literal secret is warned about."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa

# Not shaped like a TTS key, so no pattern knows it: only masking by value can.
KEY = "supersecret-xyz"
DB_TIMEOUT_S = 20.0


class _EchoingTts(BaseHTTPRequestHandler):
    """Answers every request 401 with the presented token quoted back, as a careless
    proxy or an old TTS version might."""

    def do_POST(self) -> None:
        self.server.requests += 1  # type: ignore[attr-defined]
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        token = (self.headers.get("authorization") or "").partition(" ")[2]
        body = json.dumps(
            {
                "code": 16,
                "message": f"error:pkg/auth:token_invalid (token `{token}` is not valid)",
                "details": [
                    {
                        "namespace": "pkg/auth",
                        "name": "token_invalid",
                        "message_format": "token `{token}` is not valid",
                        "attributes": {"token": token},
                    }
                ],
            }
        ).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.send_header("www-authenticate", f"Bearer error=invalid_token token={token}")
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def echoing_tts() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingTts)
    server.requests = 0  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _ingestd(*args: str, config: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    return subprocess.run(
        [sys.executable, "-m", "ingestd", "--config", str(config), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        **kw,  # type: ignore[arg-type]
    )


def test_a_differently_shaped_key_echoed_in_a_401_is_masked_everywhere(
    echoing_tts: ThreadingHTTPServer, db_url: str, tmp_path: Path
) -> None:
    host, port = echoing_tts.server_address[:2]
    config = tmp_path / "ingestd.toml"
    config.write_text(
        "\n".join(
            [
                "[database]",
                f'url = "{db_url}"',
                "[tts]",
                f'base_url = "http://{host}:{port}"',
                f'api_key = "{KEY}"',  # literal, in a world-readable file: warned about
                "auth_retry_s = 0.1",
                "reconnect_min_s = 0.05",
                "[[streams]]",
                'name = "app"',
                'application_id = "acme-app"',
                "[metrics]",
                'listen = ""',
                "[logging]",
                'format = "json"',
            ]
        )
        + "\n"
    )
    config.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ingestd", "--config", str(config), "run"],
            env=env,
            stdout=out,
            stderr=out,
        )
        engine = sa.create_engine(db_url)
        try:
            deadline = time.monotonic() + DB_TIMEOUT_S
            last_error = None
            while echoing_tts.requests < 10 or last_error is None:  # type: ignore[attr-defined]
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no 10 refused connects with a last_error"
                time.sleep(0.05)
                try:
                    with engine.connect() as conn:
                        last_error = conn.execute(
                            sa.text("SELECT last_error FROM stream_cursors WHERE stream = 'app'")
                        ).scalar()
                except sa.exc.SQLAlchemyError:
                    pass  # not migrated yet
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
            engine.dispose()
    text = log.read_text()
    assert "token_invalid" in text and "***" in text  # the error itself is logged...
    assert KEY not in text  # ...without the key
    assert "supersecret" not in last_error and "***" in last_error
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    warned = [r for r in records if r.get("event") == "config_exposes_secrets"]
    assert len(warned) == 1
    assert "readable by every user (mode 644)" in warned[0]["warning"]
    assert "an API key in tts.api_key" in warned[0]["warning"]

    status = _ingestd("status", config=config)
    assert "***" in status.stdout
    checked = _ingestd("check", config=config)
    assert checked.returncode == 1
    assert "token_invalid" in checked.stdout
    assert "warn  config" in checked.stdout
    for res in (status, checked):
        assert KEY not in res.stdout + res.stderr
