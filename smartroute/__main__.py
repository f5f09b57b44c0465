"""``python -m smartroute`` runs the CLI."""

from smartroute.cli import main

raise SystemExit(main())
