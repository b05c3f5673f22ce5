"""Entry point of `python -m bus_core`."""

from bus_core.cli.main import main

raise SystemExit(main())
