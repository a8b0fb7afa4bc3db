"""`python -m atelier.cli` runs the `atelier` command (the demo uses it for subprocesses)."""

from atelier.cli.main import app

app()
