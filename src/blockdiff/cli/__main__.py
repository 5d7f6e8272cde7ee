"""`python -m blockdiff.cli` (and `torchrun -m blockdiff.cli`) = the `blockdiff` command."""

import sys

from . import main

sys.exit(main())
