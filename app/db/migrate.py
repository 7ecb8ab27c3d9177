"""Run the Alembic migrations from Python (CLI `migrate`, start-up scripts, tests)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config

from app.settings import REPO_ROOT, get_settings


def alembic_config(database_url: str | None = None) -> Config:
    """The repository's Alembic config pointed at `database_url` (default: the settings' URL)."""
    config = Config(str(REPO_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    # ConfigParser interpolation would choke on a '%' in a password.
    url = database_url or get_settings().database_url
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(database_url: str | None = None, revision: str = "head") -> None:
    """Bring the database at `database_url` up to `revision`."""
    command.upgrade(alembic_config(database_url), revision)
