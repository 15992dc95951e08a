"""A local Ray cluster for the tests that run the cluster on Ray Serve (one per test session)."""

from __future__ import annotations

import pytest

from tests.support.serving import free_port


@pytest.fixture(scope="session")
def ray_serve():
    """Ray (2 CPUs, no dashboard) with Serve's HTTP proxy on a free loopback port; yields the base URL."""
    ray = pytest.importorskip("ray")
    from ray import serve

    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, logging_level="ERROR",
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
