"""The agent's own Kubernetes API calls, through the `kubernetes` client.

kopf owns watching and handler bookkeeping; this module only publishes
progress while a long handler runs, lists objects for the orphan scan, posts
events about the node itself, and reads the Secrets a class names.  It reuses
the credentials kopf logged in with, so there is one login.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import urllib3
from kubernetes.client import (
    ApiClient,
    Configuration,
    CoreV1Api,
    CoreV1Event,
    CustomObjectsApi,
    V1EventSource,
    V1ObjectMeta,
    V1ObjectReference,
)
from kubernetes.client.exceptions import ApiException

from ..api.common import GROUP, VERSION
from ..errors import TemporaryError
from ..host.secrets import SecretMissing

log = logging.getLogger(__name__)
EVENTS_NAMESPACE = "default"  # where Node events live, as the kubelet's do


@dataclass(frozen=True)
class ApiConnection:
    server: str
    token: str | None = None
    ca_path: str | None = None
    ca_data: bytes | None = None
    insecure: bool = False
    cert_path: str | None = None
    key_path: str | None = None
    # One connection per thread that may call at once (handlers, progress, the scanner):
    # the client's default of one logs "Connection pool is full" and reconnects under load.
    pool_size: int = 4

    def configuration(self) -> Configuration:
        config = Configuration(
            host=self.server.rstrip("/"),
            ssl_ca_cert=self.ca_path,
            ca_cert_data=self.ca_data.decode() if self.ca_data and not self.ca_path else None,
            cert_file=self.cert_path,
            key_file=self.key_path,
            verify_ssl=not self.insecure,
            retries=2,
        )
        config.connection_pool_maxsize = self.pool_size
        if self.token:
            config.api_key = {"BearerToken": self.token}
            config.api_key_prefix = {"BearerToken": "Bearer"}
        return config


class ApiError(TemporaryError):
    reason = "KubernetesApiError"


class KubeApi:
    """Synchronous calls over one pooled connection; safe from handler threads."""

    def __init__(self, client: ApiClient, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.client = client
        self.custom = CustomObjectsApi(client)
        self.core = CoreV1Api(client)

    @classmethod
    def connect(cls, connection: ApiConnection, *, timeout: float = 30.0) -> KubeApi:
        return cls(ApiClient(connection.configuration()), timeout=timeout)

    def close(self) -> None:
        self.client.close()  # type: ignore[no-untyped-call]

    def _call(self, what: str, call: Callable[[], Any], *, missing_ok: bool = False) -> Any:
        """Run one API call; its failures as ApiError (a 404 as None when ``missing_ok``)."""
        try:
            return call()
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            raise ApiError(
                f"{what}: HTTP {exc.status}: {str(exc.body or exc.reason)[:300]}"
            ) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(f"{what}: {exc}") from exc

    def _write(self, what: str, call: Callable[[], object]) -> None:
        """A write whose answer is not needed: not parsed, its connection returned to the pool."""
        # With _preload_content=False the client answers the raw urllib3 response.
        resp: urllib3.BaseHTTPResponse = self._call(what, call)
        resp.drain_conn()
        resp.release_conn()

    def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource."""
        self._write(
            f"patch {plural} {namespace}/{name} status",
            lambda: self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": status},
                _content_type="application/merge-patch+json", _request_timeout=self.timeout,
                _preload_content=False,
            ),
        )  # fmt: skip

    def list_objects(
        self,
        plural: str,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """Every object of ``plural`` in the cluster (as plain dicts)."""
        found = self._call(
            f"list {plural}",
            lambda: self.custom.list_cluster_custom_object(
                GROUP, VERSION, plural, label_selector=label_selector,
                field_selector=field_selector, _request_timeout=self.timeout,
            ),
        )  # fmt: skip
        return list((found or {}).get("items", []))

    def selects_on(self, plural: str, field_selector: str) -> bool:
        """Whether the server filters ``plural`` by ``field_selector`` itself.

        A CRD declares its ``selectableFields`` (Kubernetes 1.31+); any other
        field, or an older server, is answered 400 Bad Request.
        """
        try:
            resp = cast(urllib3.BaseHTTPResponse, self.custom.list_cluster_custom_object(
                GROUP, VERSION, plural, field_selector=field_selector, limit=1,
                _request_timeout=self.timeout, _preload_content=False,
            ))  # fmt: skip
            resp.drain_conn()
            resp.release_conn()
        except ApiException as exc:
            if exc.status == 400:
                return False
            raise ApiError(f"list {plural}: HTTP {exc.status}: {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise ApiError(f"list {plural}: {exc}") from exc
        return True

    def node_event(self, node: str, event_type: str, reason: str, message: str) -> None:
        """Post an Event about the Node itself (orphans have no object of their own)."""
        now = datetime.datetime.now(datetime.UTC)
        event = CoreV1Event(
            metadata=V1ObjectMeta(generate_name="vmdisk-", namespace=EVENTS_NAMESPACE),
            involved_object=V1ObjectReference(api_version="v1", kind="Node", name=node),
            type=event_type,
            reason=reason,
            message=message[:1024],
            source=V1EventSource(component="vmdisk-operator", host=node),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        self._write(
            f"post event {reason}",
            lambda: self.core.create_namespaced_event(
                EVENTS_NAMESPACE, event, _request_timeout=self.timeout, _preload_content=False
            ),
        )

    def secret_value(self, namespace: str, name: str, key: str) -> bytes:
        """One key of a Secret, decoded; SecretMissing when the Secret or key is absent."""
        secret = self._call(
            f"read Secret {namespace}/{name}",
            lambda: self.core.read_namespaced_secret(
                name, namespace, _request_timeout=self.timeout
            ),
            missing_ok=True,
        )
        encoded = (getattr(secret, "data", None) or {}).get(key)
        if encoded is None:
            raise SecretMissing(f"key {key!r} of Secret {namespace}/{name} not found")
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
