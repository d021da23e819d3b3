import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray workers (and CLI subprocesses) import test-only evaluators from this folder.
_TESTS = os.path.dirname(os.path.abspath(__file__))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_TESTS, os.environ.get("PYTHONPATH")]))


import pytest  # noqa: E402
from support import ARCHS, build_family  # noqa: E402


def pytest_collection_modifyitems(items) -> None:
    """Every test that needs the session's Ray is end to end, so that `make test-fast`
    (``-m "not e2e"``) never starts Ray, whether or not the test says so itself."""
    for item in items:
        if "ray_session" in item.fixturenames:  # requested directly or by another fixture
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def families(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("families")
    return {arch: build_family(root, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def demo_experts() -> dict:
    """The demo's base and experts, built once (cached on disk across sessions)."""
    from mergesearch.demo import build_experts

    return build_experts()


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (it takes seconds to start)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20,
             log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
