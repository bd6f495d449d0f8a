"""One torch thread for the distillation tests: their models are tiny (64 wide), so more threads only
add synchronization, which on a shared 2-core machine made the module ~10x slower."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def _one_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
