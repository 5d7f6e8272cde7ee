"""A torchrun entry for the elastic-restart test: blockdiff's CLI, except that on the first attempt
(TORCHELASTIC_RESTART_COUNT 0) rank 1 dies in the middle of its second sharded save."""

import os
import sys

import torch.distributed.checkpoint as dcp

from blockdiff import cli

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    real, calls = dcp.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os._exit(9)  # as a kill -9 would: nothing flushed, nothing cleaned up
        return real(*args, **kwargs)

    dcp.save = save

sys.exit(cli.main(sys.argv[1:]))
