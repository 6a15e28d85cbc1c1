"""Test-session setup: 8 fake CPU devices for mesh tests, deterministic torch on 2 threads."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# JAX's persistent compilation cache, shared by every test and the subprocesses they start
# (JAX reads its config from the environment): identical programs compile once per session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="alignax-test-xla-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")
    _add_parity_option(parser)


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def _add_parity_option(parser):
    parser.addoption("--parity-report", action="store_true", default=False,
                     help="print the worst max relative error each test measured")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not config.getoption("--parity-report"):
        return
    from tests.parity import MEASURED
    worst: dict[str, float] = {}
    for test, err in MEASURED:
        worst[test] = max(err, worst.get(test, 0.0))
    terminalreporter.section("parity: worst max relative error per test")
    for test, err in sorted(worst.items()):
        terminalreporter.write_line(f"{err:9.2e}  {test}")


@pytest.fixture(scope="session")
def tiny_sd3_pipeline(tmp_path_factory) -> str:
    """A tiny random SD3 pipeline saved by diffusers (all components; tests/sd3_pipeline.py), built once per
    test process: treat it as read-only."""
    from tests import sd3_pipeline
    return str(sd3_pipeline.build(tmp_path_factory.mktemp("tiny_sd3")))
