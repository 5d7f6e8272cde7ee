"""A torchrun entry for the sharded-save failure test: blockdiff's CLI, except that process 0
cannot make a checkpoint's directory (as on a full disk)."""

import errno
import os
import sys
import tempfile

from blockdiff import cli

if os.environ.get("RANK") == "0":
    real = tempfile.mkdtemp

    def mkdtemp(*args, prefix=None, **kwargs):
        if prefix and prefix.startswith(".step-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, prefix=prefix, **kwargs)

    tempfile.mkdtemp = mkdtemp

sys.exit(cli.main(sys.argv[1:]))
