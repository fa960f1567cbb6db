"""`python -m retrain`: the operator command line."""

from retrain.cli import main

raise SystemExit(main())
