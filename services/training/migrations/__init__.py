"""Alembic migrations of the job store; run by `services.training.db.migrate` on startup."""
