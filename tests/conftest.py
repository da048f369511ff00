"""Test-wide settings.

The suite runs on two CPU cores, often with training subprocesses beside the pytest process: one
intra-op thread per process avoids oversubscribing the cores (two busy processes with two OpenMP
threads each run several times slower than with one). Subprocesses inherit OMP_NUM_THREADS.
"""

import os

import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)
