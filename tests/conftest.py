"""Shared test set-up: GPU-only tests are skipped where no CUDA device is visible, and the quick
tier (`./zp-test --quick`, the inner loop) is marked: the core's unit tests, which start no process
and train nothing. The full suite (`./zp-test`, what CI runs) is every test."""

import os
import tempfile

import pytest

# The modules of the quick tier: the pure core and the lab's readers, tested in-process.
QUICK_MODULES = {
    "test_layers", "test_partition_unit", "test_allocator", "test_memory", "test_planner", "test_steptime",
    "test_records", "test_dsconfig", "test_partial_ckpt", "test_report", "test_atomic",
}


def pytest_configure(config):
    """Each test process (and what it starts) remembers validations in its own empty folder, so
    no test is answered from a user's cache or from another test run's (zeroplan.adapters.cache)."""
    os.environ["ZEROPLAN_CACHE_DIR"] = tempfile.mkdtemp(prefix="zeroplan-test-cache-")
    # ... and its record of the files zeroplan wrote (zeroplan.adapters.written) in its own folder.
    os.environ["ZEROPLAN_STATE_DIR"] = tempfile.mkdtemp(prefix="zeroplan-test-state-")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# The files that take longest (over ten seconds each on a 2-core machine) run first, longest
# first: with one worker per core and a file's tests kept on one worker (--dist loadfile), a long
# file started last would leave the other worker idle at the end.
LONG_FIRST = ("test_partition_deepspeed", "test_fuzz_cli", "test_runner_cpu", "test_runner_fast", "test_trainers",
              "test_pipeline_cli", "test_hostmem_hints", "test_steptime", "test_bench_resume", "test_planner",
              "test_runner_hf_trainer", "test_hardening", "test_memory")


def pytest_collection_modifyitems(config, items):
    """Long files first; mark the quick tier; skip tests marked `gpu` on machines without a CUDA GPU
    (CI, laptops)."""
    def place(item) -> int:
        name = item.module.__name__.rsplit(".", 1)[-1]
        return LONG_FIRST.index(name) if name in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=place)  # stable: each file's tests keep their order
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in QUICK_MODULES and "slow" not in item.keywords:
            item.add_marker(pytest.mark.quick)
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
        def start(self):
            return self

        def validate(self, config, world_size, timeout_s=120):
            return [], ""

        def close(self):
            pass

    monkeypatch.setattr("zeroplan.adapters.validator_process.BackgroundValidator", InProcess)
