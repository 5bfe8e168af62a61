"""`python -m edgecc ...` is the same as the `edgecc` command."""

from edgecc.cli import main

main()
