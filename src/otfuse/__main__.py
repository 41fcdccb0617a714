"""`python -m otfuse ...`: the otfuse command."""

from otfuse.entry import main

raise SystemExit(main())
