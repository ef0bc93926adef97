"""`python -m fxcompress ...`: the command line (`make demo` runs `python -m fxcompress demo`)."""

from fxcompress.cli import main

raise SystemExit(main())
