"""How the torchrun workers end (imported as `teardown`: a worker's own folder is on sys.path)."""

import os
import sys

import torch.distributed as dist


def exit_cleanly() -> None:
    """Barrier, then leave without C++ static teardown: gloo's threads destroyed at interpreter
    exit occasionally abort a finished process ("terminate called without an active
    exception", exit code -6) after every result was written."""
    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
