"""`python -m dbtunneld`: the same entry point as the `dbtunneld` command."""

import sys

from .ui.cli import main

sys.exit(main())
