"""The agent reads encryption keys as its own identity, through the chart's Role.

Against the real kube-apiserver with RBAC on: the agent's own ``KubeApi``
(``vmdisk.operator.kubeapi``) logs in with the token of the chart's
ServiceAccount, so a missing grant or an excessive one fails here.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from apiserver import AGENT_NAMESPACE, Kube, KubeApiServer
from vmdisk.host.secrets import SecretMissing
from vmdisk.operator.kubeapi import ApiConnection, ApiError, KubeApi


@pytest.fixture
def agent_api(kube_api: KubeApiServer) -> Iterator[KubeApi]:
    connection = ApiConnection(
        server=kube_api.url, token=kube_api.agent_token, ca_path=str(kube_api.ca_file)
    )
    api = KubeApi.connect(connection, timeout=10)
    yield api
    api.close()


def _secret(kube: Kube, namespace: str, name: str, data: dict[str, bytes]) -> None:
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }
    kube.request("POST", kube.path("secrets", namespace=namespace), body)


def test_the_agent_reads_a_key_from_its_own_namespace(kube: Kube, agent_api: KubeApi) -> None:
    name = f"keys-{kube.namespace}"[:63]
    _secret(kube, AGENT_NAMESPACE, name, {"vms": b"a key\x00with bytes"})
    try:
        assert agent_api.secret_value(AGENT_NAMESPACE, name, "vms") == b"a key\x00with bytes"
        with pytest.raises(SecretMissing, match="key 'other'"):
            agent_api.secret_value(AGENT_NAMESPACE, name, "other")
        with pytest.raises(SecretMissing):
            agent_api.secret_value(AGENT_NAMESPACE, name + "-gone", "vms")
    finally:
        kube.request("DELETE", kube.path("secrets", name, namespace=AGENT_NAMESPACE))


def test_the_agent_cannot_read_a_tenants_secret(kube: Kube, agent_api: KubeApi) -> None:
    _secret(kube, kube.namespace, "tenant-keys", {"vms": b"not for the agent"})
    with pytest.raises(ApiError, match="HTTP 403"):
        agent_api.secret_value(kube.namespace, "tenant-keys", "vms")
