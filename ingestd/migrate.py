"""Schema migrations: Alembic, configured in code so it works from an installed wheel."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine


def migrations_dir() -> Path:
    """The Alembic scripts: shipped inside the wheel, or the checkout's top-level folder."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError("ingestd's migrations folder is missing from this installation")


def alembic_config(engine: Engine) -> Config:
    """An Alembic Config pointing at our scripts and ``engine``'s database."""
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database to ``revision`` (idempotent)."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade the database to ``revision`` (``base`` drops everything)."""
    cfg = alembic_config(engine)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or None when it was never migrated."""
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped with this version of ingestd."""
    return ScriptDirectory(str(migrations_dir())).get_current_head()


def is_up_to_date(engine: Engine) -> bool:
    """True when the database is at the shipped head revision."""
    try:
        return schema_problem(engine)[1] is None
    except sa.exc.OperationalError:
        return False


def schema_problem(engine: Engine) -> tuple[str | None, str | None]:
    """``(current revision, problem)``: the problem is None when the schema is at head.

    The one answer to "is the schema at head?" for ``run --no-migrate``, ``check`` and
    ``status``; the problem says what to do about it.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return current, None
    if current is None:
        return None, "not migrated: run `ingestd migrate`"
    if not _known_revision(current):
        return current, (
            f"at revision {current}, which this ingestd does not know (head {head}): "
            "the database was migrated by a newer ingestd"
        )
    return current, f"at revision {current}, this ingestd needs {head}: run `ingestd migrate`"


def _known_revision(revision: str) -> bool:
    try:
        return ScriptDirectory(str(migrations_dir())).get_revision(revision) is not None
    except Exception:  # alembic raises several resolution errors for an unknown id
        return False
