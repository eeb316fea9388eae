"""A small synchronous Kubernetes API client for what kopf does not do for us.

kopf owns watching and handler bookkeeping; this client only publishes
progress while a long handler runs, lists objects for the orphan scan, and
posts events about the node itself.  It reuses the credentials kopf logged in
with, so there is one login.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

import urllib3

from ..api.common import GROUP, VERSION, now_rfc3339
from ..errors import TemporaryError
from ..host.secrets import SecretMissing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiConnection:
    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    cert_path: str | None = None
    key_path: str | None = None


class ApiError(TemporaryError):
    reason = "KubernetesApiError"


class KubeApi:
    """Synchronous calls over one pooled connection; safe from handler threads."""

    def __init__(self, connection: ApiConnection, *, timeout: float = 30.0) -> None:
        self.connection = connection
        self.timeout = timeout
        self._pool: urllib3.PoolManager | None = None

    def _http(self) -> urllib3.PoolManager:
        if self._pool is None:
            c = self.connection
            kwargs: dict[str, Any] = {"timeout": urllib3.Timeout(total=self.timeout), "retries": 2}
            if c.server.startswith("https"):
                kwargs["cert_reqs"] = "CERT_NONE" if c.insecure else "CERT_REQUIRED"
                if c.ca_path:
                    kwargs["ca_certs"] = c.ca_path
                elif c.ca_data:
                    kwargs["ca_cert_data"] = c.ca_data.decode()
                if c.cert_path:
                    kwargs["cert_file"], kwargs["key_file"] = c.cert_path, c.key_path
            self._pool = urllib3.PoolManager(**kwargs)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.clear()

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        missing_ok: bool = False,
    ) -> Any:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        if self.connection.token:
            headers["Authorization"] = f"Bearer {self.connection.token}"
        payload = None if body is None else json.dumps(body).encode()
        try:
            resp = self._http().request(
                method, self.connection.server.rstrip("/") + path, body=payload, headers=headers
            )
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(f"{method} {path}: {exc}") from exc
        if resp.status == 404 and missing_ok:
            return None
        if resp.status >= 400:
            raise ApiError(f"{method} {path}: HTTP {resp.status}: {resp.data[:300]!r}")
        return json.loads(resp.data) if resp.data else None

    @staticmethod
    def _path(plural: str, namespace: str | None = None, name: str | None = None) -> str:
        path = f"/apis/{GROUP}/{VERSION}"
        if namespace is not None:
            path += f"/namespaces/{quote(namespace)}"
        path += f"/{plural}"
        return path + (f"/{quote(name)}" if name else "")

    def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource."""
        self.request(
            "PATCH",
            self._path(plural, namespace, name) + "/status",
            {"status": status},
            content_type="application/merge-patch+json",
        )

    def list_objects(self, plural: str, **params: str) -> list[dict[str, Any]]:
        query = f"?{urlencode(params)}" if params else ""
        data = self.request("GET", self._path(plural) + query)
        return list(data.get("items", [])) if data else []

    def node_event(self, node: str, event_type: str, reason: str, message: str) -> None:
        """Post an Event about the Node itself (orphans have no object of their own)."""
        now = now_rfc3339()
        self.request(
            "POST",
            "/api/v1/namespaces/default/events",
            {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"generateName": "vmdisk-", "namespace": "default"},
                "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node},
                "type": event_type,
                "reason": reason,
                "message": message[:1024],
                "source": {"component": "vmdisk-operator", "host": node},
                "firstTimestamp": now,
                "lastTimestamp": now,
                "count": 1,
            },
        )

    def secret_value(self, namespace: str, name: str, key: str) -> bytes:
        """One key of a Secret, decoded; SecretMissing when the Secret or key is absent."""
        path = f"/api/v1/namespaces/{quote(namespace)}/secrets/{quote(name)}"
        secret = self.request("GET", path, missing_ok=True)
        encoded = ((secret or {}).get("data") or {}).get(key)
        if encoded is None:
            raise SecretMissing(
                f"encryption.keySecretRef: key {key!r} of Secret {namespace}/{name} not found"
            )
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error as exc:
            raise SecretMissing(f"key {key!r} of Secret {namespace}/{name} is not base64") from exc


class ApiSecrets:
    """The engine's Secrets reader in cluster mode: Kubernetes Secrets via the agent's login."""

    def __init__(self, api: Callable[[], KubeApi | None]) -> None:
        self.api = api

    def get(self, namespace: str, name: str, key: str) -> bytes:
        api = self.api()
        if api is None:
            raise SecretMissing("the agent has not logged in to the API server yet")
        return api.secret_value(namespace, name, key)
