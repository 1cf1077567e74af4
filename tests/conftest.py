"""Test-suite settings: the tensors here are tiny, so one intra-op thread is fastest and keeps
the root worker threads from fighting the main thread for the two cores."""

from collections.abc import Iterator

import pytest
import torch
from hypothesis import settings

# torch's intra-op thread count for this process before the suite changed it.
_PROCESS_THREADS = torch.get_num_threads()


@pytest.fixture(scope="session")
def default_thread_count() -> int:
    """torch's intra-op thread count before the suite set it to one (for a test that needs
    the threads a user would have, e.g. MKL's multithreaded eigh on a larger matrix)."""
    return _PROCESS_THREADS


@pytest.fixture(autouse=True, scope="session")
def _restore_thread_count() -> Iterator[None]:
    yield
    torch.set_num_threads(_PROCESS_THREADS)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread_for_the_module(_restore_thread_count: None) -> None:
    """The same for a module's fixtures, made before its first test's own fixtures: a module
    fixture that trains (test_hardening_state's ``trained``) must not run at the thread count
    the previous module's last test left, or alone at the process's."""
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_intra_op_thread(_restore_thread_count: None) -> None:
    """Every test starts on one intra-op thread, whatever the one before it left: tiny
    tensors gain nothing from a second thread, and on a loaded 2-core machine OpenMP's
    spin-waits multiply the run time."""
    torch.set_num_threads(1)


# The same examples on every run, and no per-example time limit: CI must depend neither on which
# random cases hypothesis draws nor on how loaded the machine is.
settings.register_profile("deterministic", derandomize=True, database=None, deadline=None)
settings.load_profile("deterministic")


@pytest.fixture(autouse=True)
def _cores_to_spare(monkeypatch: pytest.MonkeyPatch) -> None:
    """``async_roots="auto"`` decides by the machine's cores (``roots.threads.spare_cores``):
    the suite pins them so that the default is async roots on any machine, a 1-core one too.
    tests/test_async_auto.py sets them itself to test the rule."""
    from torch_shampoo.roots import threads

    monkeypatch.setattr(threads, "cores", lambda: 64)
