"""Test-suite settings: the tensors here are tiny, so one intra-op thread is fastest and keeps
the root worker threads from fighting the main thread for the two cores."""

from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The same examples on every run, and no per-example time limit: CI must depend neither on which
# random cases hypothesis draws nor on how loaded the machine is.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")
