"""One ``torchrun`` rank of tests/train/test_distributed.py: runs several ``slimlm finetune`` command
lines (a JSON list of argv lists, argv[1]) in one launch, to pay torchrun's start-up once.

The process group is started here, so each ``finetune`` reuses it (slimlm's CLI starts its own
when it is launched directly: ``torchrun ... -m slimlm.cli.main finetune ...``, and a group cannot
be started twice in one launch). Exits with the first non-zero exit code.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from slimlm.cli.main import main

if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        for argv in json.loads(sys.argv[1]):
            rc = main(argv)
            if rc:
                sys.exit(rc)
    finally:
        dist.destroy_process_group()
