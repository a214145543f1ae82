"""`python -m slmkit` runs the CLI."""

from slmkit.cli import main

main()
