"""`python -m otfuse ...` (and `torchrun -m otfuse train ...`) runs the CLI."""

from otfuse.cli import main

raise SystemExit(main())
