import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture
def fresh_seed(request):
    """A seed that differs per test (and per run when WAN_INT8_TEST_SEED is unset) but is printed for replay."""
    base = int(os.environ.get("WAN_INT8_TEST_SEED", torch.randint(0, 2**31 - 1, ()).item()))
    seed = (base + hash(request.node.name)) % (2**31 - 1)
    print(f"seed {seed} (replay: WAN_INT8_TEST_SEED={base})")
    return seed


def outlier_input(m, k, seed, outliers=8, gain=20.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    idx = torch.randperm(k, generator=g)[:outliers]
    x[:, idx] *= gain
    return x.to(dtype)
