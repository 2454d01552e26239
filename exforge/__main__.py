"""`python -m exforge`: the CLI."""

from exforge.cli import main

main()
