"""`python -m kvfs`: the same entry point as the `kvfs` command."""

from kvfs.cli import main

raise SystemExit(main())
