"""`python -m blockdiff` = the `blockdiff` command."""

import sys

from .cli import main

sys.exit(main())
