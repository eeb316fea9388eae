"""The agent's API client keeps one connection per concurrent caller (issue 15)."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

import pytest

from apiserver import KubeApiServer
from vmdisk.operator.kubeapi import ApiConnection, KubeApi

CALLERS = 6


def _pool_warnings(server: KubeApiServer, pool_size: int, caplog: pytest.LogCaptureFixture) -> int:
    connection = ApiConnection(
        server=server.url,
        token=server.agent_token,
        ca_path=str(server.ca_file),
        pool_size=pool_size,
    )
    api = KubeApi.connect(connection)
    caplog.clear()
    try:
        with (
            caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"),
            ThreadPoolExecutor(CALLERS) as pool,
        ):
            for found in pool.map(lambda _: api.list_objects("vmdisks"), range(CALLERS * 20)):
                assert isinstance(found, list)
    finally:
        api.close()
    return sum("Connection pool is full" in r.getMessage() for r in caplog.records)


def test_concurrent_callers_reuse_their_connections(
    kube_api: KubeApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    # The library's default pool of one drops connections under this load; ours must not.
    assert _pool_warnings(kube_api, 1, caplog) > 0
    assert _pool_warnings(kube_api, CALLERS, caplog) == 0
