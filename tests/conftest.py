"""Shared test settings: one CPU thread per process.

The tests run tiny models on a 2-core machine, often with a second process (DataLoader workers,
DDP ranks); one thread each avoids oversubscribing the cores, which is what makes small tensor
work slow, and subprocesses inherit it through the environment.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after the environment is set)

torch.set_num_threads(1)
