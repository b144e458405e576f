"""`python -m ltr`."""

from .cli import main

raise SystemExit(main())
