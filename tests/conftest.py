"""Shared test set-up: GPU-only tests are skipped where no CUDA device is visible."""

import pytest


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` on machines without a CUDA GPU (CI, developer laptops)."""
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def skip_deepspeed_validation(monkeypatch):
    """recommend's DeepSpeed check answered in-process ("valid"), for tests about other faults."""

    class InProcess:
        def validate(self, config, world_size, timeout_s=120):
            return [], ""

        def close(self):
            pass

    monkeypatch.setattr("zeroplan.adapters.validator_process.BackgroundValidator", InProcess)
