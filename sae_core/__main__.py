"""``python -m sae_core``: see :mod:`sae_core.minicanvas.cli`."""

from .minicanvas.cli import main

raise SystemExit(main())
