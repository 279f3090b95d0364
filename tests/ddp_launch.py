"""``strategy="ddp"`` (Lightning's subprocess launcher) on CPU with 2 processes, run as a script by
tests/test_ddp.py: Lightning starts rank 1 by running this same command again. Each rank saves the
masks it applied to ``<folder>/rank<r>.pt``."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from test_ddp import DDPNet, run

if __name__ == "__main__":
    torch.manual_seed(0)
    run(Path(sys.argv[1]), DDPNet(), devices=2, strategy="ddp")
