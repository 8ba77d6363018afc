"""Preloaded by a worker forker in a test: makes torch say, in a fork, that CUDA was initialised before it (as a
CUDA build of torch says once the forker asked for the GPUs)."""

import torch

torch._C._cuda_isInBadFork = lambda: True
