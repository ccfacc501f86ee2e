"""`python -m routedsl` is the `routedsl` command."""
from routedsl.cli import main

raise SystemExit(main())
