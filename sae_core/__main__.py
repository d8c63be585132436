"""``python -m sae_core``: see :mod:`sae_core.cli`."""

from .cli import main

raise SystemExit(main())
