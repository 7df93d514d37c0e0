"""``python -m fastnst``: the same as the ``fastnst`` command."""

from .cli import main

raise SystemExit(main())
