"""`python -m hotexperts` == the `hotexperts` console command."""

from hotexperts.cli import main

raise SystemExit(main())
