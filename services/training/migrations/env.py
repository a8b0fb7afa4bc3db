"""Alembic environment for the job store, driven by Atelier settings instead of an ini file.

`services.training.db.migrate` passes an open connection in `config.attributes["connection"]`.
Run standalone (`alembic -c <any config whose script_location points here> upgrade head`),
the URL comes from `Settings().database_url`, i.e. `ATELIER_DATABASE_URL`.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from services.training.schema import metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from services.common.config import Settings
    from services.training.db import create_db_engine

    engine = create_db_engine(Settings.model_validate({}).database_url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run against a database")
run_migrations_online()
