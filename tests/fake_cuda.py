"""A pytest plugin (`-p tests.fake_cuda`) that makes the *parent* pytest process believe it sees
FAKE_CUDA_GPUS CUDA GPUs (default 1): how tests on a CPU machine drive the device selection and the
GPU-count gate of a real certification run. Worker processes are untouched (they never load it),
so a check that passes the gate would really try CUDA and fail: tests select only gated checks.
"""
from __future__ import annotations

import os

import torch

_COUNT = int(os.environ.get("FAKE_CUDA_GPUS", "1"))
torch.cuda.is_available = lambda: _COUNT > 0
torch.cuda.device_count = lambda: _COUNT
torch.cuda.get_device_name = lambda device=None: "Fake GPU 80GB"
torch.version.cuda = "12.4"
