"""`python -m services`: the same as the `nebula` command."""

from services.cli import app

app()
