"""`python -m kvfork` is the `kvfork` command."""

from kvfork.cli import main

raise SystemExit(main())
