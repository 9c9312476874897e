"""Shared test set-up: Triton's interpreter when there is no GPU, and a fresh seed per test."""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    # Must happen before anything imports triton (DESIGN.md "No GPU here").
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws fresh random data, reproducibly: the seed is derived from the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
