"""`python -m data_prep <source> ... --out DIR`: see data_prep/cli.py."""

from data_prep.cli import main

raise SystemExit(main())
