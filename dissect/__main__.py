"""``python -m dissect``: the same as the ``dissect`` command."""

from .cli import main

raise SystemExit(main())
