"""A small Kubernetes API client: the few objects the CSI plugin reads and writes.

In-cluster config (service account token + CA) or a kubeconfig file (server, CA, bearer token or
client certificate). Client keys given inline (`client-key-data`) stay in memory: they are loaded
from a memfd, never written to disk.

Every call percent-encodes its path segments (and refuses empty, `.` and `..` ones, which a URL
library could resolve away), sends and expects JSON, has a timeout, and fails with a KubeError
carrying the API server's Status (`status` code, `reason`, `message`) — never a traceback, also
when the answer is not a Kubernetes object at all. Writes use optimistic concurrency as the API
defines it: a stale `metadata.resourceVersion` comes back as 409 Conflict, which
`read_modify_write` retries on a fresh copy.

Objects: SecretProviderClasses (read), Pods (read; delete only with a uid precondition), Events
(create), Secrets and SecretProviderClassPodStatuses (create, read, replace, delete). Builders for
the bodies the plugin writes (`event_body`, `secret_body`, `spc_pod_status_body`) keep their shape
in one place. One client is shared by the plugin's gRPC and background threads.
"""

from __future__ import annotations

import base64
import copy
import datetime
import logging
import os
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx
import yaml

from kvfs.config.spc import spc_parameters as shared_spc_parameters
from kvfs.logsafe import redact

log = logging.getLogger(__name__)

SPC_GROUP = "secrets-store.csi.x-k8s.io"
SPC_VERSION = "v1"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
COMPONENT = "kvfs-csi"  # events' source.component and reportingComponent
# upstream's label on a SecretProviderClassPodStatus: the node whose driver wrote it
NODE_LABEL = "internal.secrets-store.csi.k8s.io/node-name"
# The API server refuses longer messages on events that set eventTime (pkg/apis/core/validation,
# NoteLengthLimit). Ours do not set it, but keep to the limit as kube-scheduler does.
EVENT_MESSAGE_LIMIT = 1024
_RETRY_ATTEMPTS = 5


class KubeError(Exception):
    """A Kubernetes API call failed: `status` is the HTTP status, 0 when no usable answer came
    (unreachable, timed out, not a Kubernetes object); `reason` is the Status reason
    (`NotFound`, `Conflict`, `AlreadyExists`, `Forbidden`, ...); `message` the Status message."""

    def __init__(self, message: str, *, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason


class KubeConfigError(KubeError):
    """The kubeconfig / in-cluster environment cannot be used."""


@dataclass(frozen=True)
class Resource:
    """A namespaced API resource: where its objects live and what kind they are."""

    group_version: str  # "v1" for the core group, else "<group>/<version>"
    plural: str
    kind: str

    def path(self, namespace: str, name: str | None = None) -> str:
        """The collection's path, or with `name` one object's."""
        root = "/api/v1" if self.group_version == "v1" else f"/apis/{self.group_version}"
        collection = f"{root}/namespaces/{_segment(namespace, 'namespace')}/{self.plural}"
        return collection if name is None else f"{collection}/{_segment(name, self.kind + ' name')}"


PODS = Resource("v1", "pods", "Pod")
EVENTS = Resource("v1", "events", "Event")
SECRETS = Resource("v1", "secrets", "Secret")
SPCS = Resource(f"{SPC_GROUP}/{SPC_VERSION}", "secretproviderclasses", "SecretProviderClass")
SPC_POD_STATUSES = Resource(
    f"{SPC_GROUP}/{SPC_VERSION}", "secretproviderclasspodstatuses", "SecretProviderClassPodStatus"
)


class PodRef(NamedTuple):
    """The pod a volume belongs to, as kubelet names it in the volume context (podInfoOnMount)."""

    namespace: str
    name: str
    uid: str

    def owner_reference(self) -> dict[str, Any]:
        """An ownerReferences entry naming this pod: dependents go when the pod does (garbage collector)."""
        return {"apiVersion": "v1", "kind": "Pod", "name": self.name, "uid": self.uid}


@dataclass
class KubeClient:
    """Sync client (the plugin serves gRPC from threads). Bearer token re-read from its file per call."""

    server: str
    ssl_context: ssl.SSLContext | bool
    token: str = field(default="", repr=False)
    token_file: str = ""
    timeout: float = 10.0
    _http: httpx.Client | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def in_cluster(cls, sa_dir: Path = SA_DIR) -> KubeClient:
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeConfigError(
                "no Kubernetes API configuration: KUBERNETES_SERVICE_HOST is not set and no --kubeconfig "
                "was given (run in a pod with a service account, or pass --kubeconfig FILE)"
            )
        if ":" in host:
            host = f"[{host}]"
        ctx = ssl.create_default_context(cafile=str(sa_dir / "ca.crt"))
        return cls(f"https://{host}:{port}", ctx, token_file=str(sa_dir / "token"))

    @classmethod
    def from_kubeconfig(cls, path: str, context: str = "") -> KubeClient:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise KubeConfigError(f"--kubeconfig {path}: cannot read it: {exc}") from None
        base = Path(path).resolve().parent
        ctx_name = context or doc.get("current-context", "")
        ctx = _named(doc, "contexts", ctx_name, path).get("context", {})
        cluster = _named(doc, "clusters", ctx.get("cluster", ""), path).get("cluster", {})
        user = _named(doc, "users", ctx.get("user", ""), path).get("user", {}) if ctx.get("user") else {}
        server = str(cluster.get("server", "")).rstrip("/")
        if not server.startswith("https://"):
            raise KubeConfigError(f"--kubeconfig {path}: cluster server {server!r} must be an https:// URL")
        ssl_ctx: ssl.SSLContext | bool
        if cluster.get("insecure-skip-tls-verify"):
            log.warning("kubeconfig %s: insecure-skip-tls-verify is set; the API server is not verified", path)
            ssl_ctx = False
        else:
            ssl_ctx = ssl.create_default_context()
            if cluster.get("certificate-authority-data"):
                ssl_ctx.load_verify_locations(cadata=_b64(cluster["certificate-authority-data"]).decode())
            elif cluster.get("certificate-authority"):
                ssl_ctx.load_verify_locations(cafile=str(base / cluster["certificate-authority"]))
        for unsupported in ("exec", "auth-provider"):
            if unsupported in user:
                raise KubeConfigError(
                    f"--kubeconfig {path}: user {ctx.get('user')!r} uses {unsupported!r}, which kvfs does not "
                    "support (use a token, a token file or a client certificate)"
                )
        cert = user.get("client-certificate-data") or user.get("client-certificate")
        if cert:
            if not isinstance(ssl_ctx, ssl.SSLContext):
                ssl_ctx = ssl.create_default_context()
                ssl_ctx.check_hostname = False
                ssl_ctx.verify_mode = ssl.CERT_NONE
            _load_client_cert(ssl_ctx, user, base)
        token_file = user.get("tokenFile", "")
        return cls(
            server,
            ssl_ctx,
            token=str(user.get("token", "")),
            token_file=str(base / token_file) if token_file else "",
        )

    def _client(self) -> httpx.Client:
        with self._lock:  # gRPC and background threads share one connection pool
            if self._http is None:
                self._http = httpx.Client(base_url=self.server, verify=self.ssl_context, timeout=self.timeout)
            return self._http

    def _headers(self) -> dict[str, str]:
        token = self.token
        if self.token_file:
            try:
                token = Path(self.token_file).read_text().strip()
            except OSError as exc:
                raise KubeConfigError(f"cannot read the Kubernetes token file {self.token_file}: {exc}") from None
        headers = {"Accept": "application/json", "User-Agent": "kvfs-csi"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One API call; a JSON object back, or KubeError with the server's Status."""
        try:
            resp = self._client().request(method, path, headers=self._headers(), json=body)
        except httpx.HTTPError as exc:
            raise KubeError(f"Kubernetes API {self.server} unreachable: {type(exc).__name__}: {exc}") from None
        try:
            answer = resp.json()
        except ValueError:
            answer = None
        if resp.status_code >= 400:
            fields = answer if isinstance(answer, dict) else {}
            raise KubeError(
                str(fields.get("message") or f"{method} {path}: HTTP {resp.status_code}"),
                status=resp.status_code,
                reason=str(fields.get("reason", "")),
            )
        if not isinstance(answer, dict):
            raise KubeError(
                f"Kubernetes API {self.server}: {method} {path} answered with something that is not a JSON object"
            )
        return answer

    def _object(
        self, resource: Resource, method: str, path: str, body: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """A call whose answer must be an object of `resource`'s kind (a proxy or a wrong server may say otherwise)."""
        answer = self.request(method, path, body)
        if answer.get("kind") != resource.kind or not isinstance(answer.get("metadata"), dict):
            raise KubeError(
                f"Kubernetes API {self.server}: {method} {path} answered with kind {str(answer.get('kind'))[:80]!r}, "
                f"not a {resource.kind} (check the API server address and any proxy in front of it)"
            )
        return answer

    def get_object(self, resource: Resource, namespace: str, name: str) -> dict[str, Any]:
        return self._object(resource, "GET", resource.path(namespace, name))

    def create_object(self, resource: Resource, namespace: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """POST: 409 AlreadyExists when the name is taken; the stored object (uid, resourceVersion) comes back."""
        return self._object(resource, "POST", resource.path(namespace), _typed(resource, obj))

    def replace_object(self, resource: Resource, namespace: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """PUT to `metadata.name`: 409 Conflict when `metadata.resourceVersion` is stale (without one the
        update is unconditional); 404 when the object is gone."""
        name = str((obj.get("metadata") or {}).get("name", ""))
        return self._object(resource, "PUT", resource.path(namespace, name), _typed(resource, obj))

    def delete_object(
        self, resource: Resource, namespace: str, name: str, *, uid: str = "", resource_version: str = ""
    ) -> dict[str, Any]:
        """DELETE, only if the object still has this uid / resourceVersion (409 Conflict otherwise).

        The answer is the deleted object or a `Status` of kind Success, depending on the resource.
        """
        preconditions = {key: value for key, value in (("uid", uid), ("resourceVersion", resource_version)) if value}
        options = (
            {"apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions} if preconditions else None
        )
        return self.request("DELETE", resource.path(namespace, name), options)

    def read_modify_write(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        change: Callable[[dict[str, Any] | None], Mapping[str, Any] | None],
        *,
        attempts: int = _RETRY_ATTEMPTS,
    ) -> dict[str, Any] | None:
        """Create or update one object from its current state, retried when another writer got there first.

        `change(current)` gets a copy of the stored object (None when there is none) and returns the
        object to write, or None to write nothing. A missing object is created; an existing one is
        replaced with the resourceVersion that was read, so a concurrent write makes this attempt fail
        with 409 and the next one starts from a fresh read. Returns what was written (or the current
        object when nothing was, None when nothing exists); after `attempts` conflicts, the last
        KubeError (status 409).
        """
        for attempt in range(attempts):
            try:
                current: dict[str, Any] | None = self.get_object(resource, namespace, name)
            except KubeError as exc:
                if exc.status != 404:
                    raise
                current = None
            wanted = change(copy.deepcopy(current))
            if wanted is None:
                return current
            try:
                if current is None:
                    return self.create_object(resource, namespace, wanted)
                body = copy.deepcopy(dict(wanted))
                body.setdefault("metadata", {})["resourceVersion"] = current["metadata"].get("resourceVersion", "")
                return self.replace_object(resource, namespace, body)
            except KubeError as exc:
                if exc.status != 409 or attempt == attempts - 1:
                    raise
                log.debug("%s %s/%s changed under us (%s); retrying", resource.kind, namespace, name, exc.reason)
        raise KubeError(f"{resource.kind} {namespace}/{name}: no attempt to write it (attempts={attempts})", status=400)

    def get_secret_provider_class(self, namespace: str, name: str) -> dict[str, Any]:
        """GET one SecretProviderClass; its metadata is checked by the caller (a proxy could answer another)."""
        return self.get_object(SPCS, namespace, name)

    def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        return self.get_object(PODS, namespace, name)

    def delete_pod(self, namespace: str, name: str, *, uid: str) -> dict[str, Any]:
        """Delete the pod with this uid only: a pod recreated under the same name (409 Conflict) is kept."""
        if not uid:
            raise KubeError(f"refusing to delete pod {namespace}/{name} without its uid", status=400)
        return self.delete_object(PODS, namespace, name, uid=uid)

    def create_event(
        self, pod: PodRef, reason: str, message: str, *, node_id: str, event_type: str = "Warning"
    ) -> dict[str, Any]:
        """Post one event on `pod` (see event_body). Each call makes a new Event object."""
        return self.create_object(
            EVENTS, pod.namespace, event_body(pod, reason, message, node_id=node_id, event_type=event_type)
        )

    def close(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.close()
                self._http = None


def _segment(value: str, what: str) -> str:
    """One path segment, percent-encoded; quote() keeps dots, and a client may resolve dot segments."""
    if value in ("", ".", ".."):
        raise KubeError(f"invalid {what} {value!r} in a Kubernetes API path", status=400)
    return quote(value, safe="")


def _typed(resource: Resource, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The body with the resource's apiVersion and kind, as the API server requires them."""
    return {**obj, "apiVersion": resource.group_version, "kind": resource.kind}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _truncated(text: str, limit: int) -> str:
    """At most `limit` UTF-8 bytes, cut on a character boundary and marked as cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 4].decode(errors="ignore") + " ..."


def event_body(pod: PodRef, reason: str, message: str, *, node_id: str, event_type: str = "Warning") -> dict[str, Any]:
    """A core/v1 Event on `pod`, as kubelet's recorder writes them: server-generated name, source
    and reporting fields naming kvfs-csi on this node, count 1 (we rate-limit before posting, so an
    event is never patched to count up). The message is redacted (no token or registered secret) and
    cut to EVENT_MESSAGE_LIMIT bytes."""
    now = _now()
    return {
        "apiVersion": EVENTS.group_version,
        "kind": EVENTS.kind,
        "metadata": {"generateName": f"{pod.name}.", "namespace": pod.namespace},
        "involvedObject": {**pod.owner_reference(), "namespace": pod.namespace},
        "reason": reason,
        "message": _truncated(redact(message), EVENT_MESSAGE_LIMIT),
        "type": event_type,
        "source": {"component": COMPONENT, "host": node_id},
        "reportingComponent": COMPONENT,
        "reportingInstance": node_id,
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def secret_body(
    namespace: str,
    name: str,
    data: Mapping[str, bytes],
    *,
    secret_type: str = "Opaque",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    owners: list[PodRef] | None = None,
) -> dict[str, Any]:
    """A core/v1 Secret: `data` values base64-encoded, each owner pod an ownerReference."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if labels:
        metadata["labels"] = dict(labels)
    if annotations:
        metadata["annotations"] = dict(annotations)
    if owners:
        metadata["ownerReferences"] = [pod.owner_reference() for pod in owners]
    return {
        "apiVersion": SECRETS.group_version,
        "kind": SECRETS.kind,
        "metadata": metadata,
        "type": secret_type,
        "data": {key: base64.b64encode(value).decode() for key, value in data.items()},
    }


def spc_pod_status_name(pod: PodRef, spc: str) -> str:
    """Upstream's name: `<pod>-<namespace>-<class>` (tools and runbooks look it up by that name)."""
    return f"{pod.name}-{pod.namespace}-{spc}"


def spc_pod_status_body(
    pod: PodRef,
    spc: str,
    *,
    node_id: str,
    target_path: str,
    mounted: bool = True,
    objects: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A SecretProviderClassPodStatus as upstream's driver writes it: every field under `status`
    (the CRD has no spec and no status subresource), the node label, the pod as its only owner,
    `objects` ({id: version}, upstream's ids: `<type>/<name>`) sorted by id."""
    return {
        "apiVersion": SPC_POD_STATUSES.group_version,
        "kind": SPC_POD_STATUSES.kind,
        "metadata": {
            "name": spc_pod_status_name(pod, spc),
            "namespace": pod.namespace,
            "labels": {NODE_LABEL: node_id},
            "ownerReferences": [pod.owner_reference()],
        },
        "status": {
            "podName": pod.name,
            "secretProviderClassName": spc,
            "mounted": mounted,
            "targetPath": target_path,
            "objects": [{"id": key, "version": version} for key, version in sorted((objects or {}).items())],
        },
    }


def spc_parameters(obj: dict[str, Any]) -> dict[str, str]:
    """`spec.parameters` as str → str, checked by kvfs.config.spc; errors name namespace/name."""
    meta = obj.get("metadata") or {}
    return shared_spc_parameters(obj, source=f"{meta.get('namespace', '')}/{meta.get('name', '')}")


def _named(doc: dict[str, Any], section: str, name: str, path: str) -> dict[str, Any]:
    for item in doc.get(section) or []:
        if item.get("name") == name:
            return dict(item)
    raise KubeConfigError(f"--kubeconfig {path}: no entry {name!r} in {section!r}")


def _b64(value: str) -> bytes:
    return base64.b64decode(value)


def _memfile(data: bytes, name: str) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


def _load_client_cert(ctx: ssl.SSLContext, user: dict[str, Any], base: Path) -> None:
    """load_cert_chain wants paths; inline data goes through memfds so keys never touch disk."""
    fds: list[int] = []
    try:

        def path_of(data_key: str, file_key: str) -> str:
            if user.get(data_key):
                fd = _memfile(_b64(user[data_key]), data_key)
                fds.append(fd)
                return f"/proc/self/fd/{fd}"
            return str(base / user[file_key])

        certfile = path_of("client-certificate-data", "client-certificate")
        if not (user.get("client-key-data") or user.get("client-key")):
            raise KubeConfigError("kubeconfig user has a client certificate but no client-key(-data)")
        keyfile = path_of("client-key-data", "client-key")
        ctx.load_cert_chain(certfile, keyfile)
    finally:
        for fd in fds:
            os.close(fd)
