"""A faithful fake Kubernetes API server for the resources the CSI plugin uses.

HTTPS with a test CA; bearer-token or client-certificate authentication (401 otherwise); RBAC-like
refusals (403); an in-memory object store for pods, events, secrets, secretproviderclasses and
secretproviderclasspodstatuses serving GET, POST, PUT and DELETE with what the real API server does
and callers depend on:

- `metadata.uid`, `creationTimestamp` and `resourceVersion` set on create, `resourceVersion`
  bumped on every write (one counter for the whole store, as etcd's revision);
- 409 AlreadyExists on creating a taken name, 409 Conflict on a stale `resourceVersion` and on a
  DELETE whose `preconditions` (uid, resourceVersion) do not match; an update without a
  resourceVersion is unconditional, as for these resources in the real server;
- `generateName` (5 random characters, the base cut to 58);
- validation answering 422 Invalid like the real server: object names, label values, owner
  references, Secret data keys, an Event's namespace against its involvedObject's;
- `Status` bodies (code, reason, message, details) for every failure.

Not faked: watches, lists, PATCH (405; add it when a caller needs it), graceful pod deletion (a
deleted pod is gone at once, as if kubelet had finished) and the garbage collector, which is a
controller in a real cluster, not part of the API server: `delete_pod()` and `collect_garbage()`
stand for it in tests.
"""

from __future__ import annotations

import base64
import binascii
import copy
import datetime
import ipaddress
import json
import random
import re
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPC_GROUP_VERSION = "secrets-store.csi.x-k8s.io/v1"
# plural → (apiVersion, kind) of every resource served
RESOURCES = {
    "pods": ("v1", "Pod"),
    "events": ("v1", "Event"),
    "secrets": ("v1", "Secret"),
    "secretproviderclasses": (SPC_GROUP_VERSION, "SecretProviderClass"),
    "secretproviderclasspodstatuses": (SPC_GROUP_VERSION, "SecretProviderClassPodStatus"),
}
SA_IDENTITY = "system:serviceaccount:kube-system:kvfs-csi"
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_CONFIG_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_GENERATED = "bcdfghjklmnpqrstvwxz2456789"  # the API server's alphabet for generateName suffixes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
    org: str = "",
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    attrs = [x509.NameAttribute(NameOID.COMMON_NAME, subject)]
    if org:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, org))
    name = x509.Name(attrs)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    elif server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def status(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


class ApiError(Exception):
    """A request the fake refuses, with the Status body the real server would send."""

    def __init__(self, code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = status(code, reason, message, details)


class Request(NamedTuple):
    """One request as received: `path` raw (percent-encoding and query included), `identity` empty
    when the caller did not authenticate."""

    method: str
    path: str
    identity: str

    @property
    def namespace(self) -> str:
        """The namespace the request addressed ("" for a cluster-wide path)."""
        parts = [unquote(part) for part in self.path.split("?", 1)[0].split("/")]
        return parts[parts.index("namespaces") + 1] if "namespaces" in parts[:-1] else ""


class Canned(NamedTuple):
    """An answer given instead of the real one, once, to a request with this method and resource."""

    method: str
    plural: str  # "*" for any
    code: int
    body: bytes
    delay: float


class _Route(NamedTuple):
    plural: str
    namespace: str
    name: str  # "" for the collection

    @property
    def group(self) -> str:
        api_version = RESOURCES[self.plural][0]
        return api_version.rsplit("/", 1)[0] if "/" in api_version else ""

    @property
    def kind(self) -> str:
        return RESOURCES[self.plural][1]

    @property
    def qualified(self) -> str:
        """The resource as the API server names it in messages: `pods`, `secretproviderclasses.<group>`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def details(self, **extra: Any) -> dict[str, Any]:
        found = {"name": self.name, "group": self.group, "kind": self.plural, **extra}
        return {key: value for key, value in found.items() if value}


def _route(path: str) -> _Route | None:
    """`/api/v1/namespaces/NS/PLURAL[/NAME]` or `/apis/GROUP/VERSION/namespaces/NS/PLURAL[/NAME]`."""
    parts = [unquote(part) for part in path.split("?", 1)[0].split("/")]
    if parts[1:3] == ["api", "v1"]:
        api_version, rest = "v1", parts[3:]
    elif parts[1:2] == ["apis"] and len(parts) > 4:
        api_version, rest = f"{parts[2]}/{parts[3]}", parts[4:]
    else:
        return None
    if len(rest) not in (3, 4) or rest[0] != "namespaces" or RESOURCES.get(rest[2], ("",))[0] != api_version:
        return None
    return _Route(rest[2], rest[1], rest[3] if len(rest) == 4 else "")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _invalid_fields(plural: str, obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, problem) for what the real API server's validation refuses in the objects we store."""
    meta = obj["metadata"]
    name = str(meta.get("name", ""))
    problems = []
    if len(name) > 253 or not _DNS1123_SUBDOMAIN.match(name):
        problems.append(
            (
                "metadata.name",
                f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must consist of lower '
                "case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            )
        )
    for key, value in (meta.get("labels") or {}).items():
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(
                (
                    f"metadata.labels[{key}]",
                    f'Invalid value: "{value}": a valid label must be an empty string '
                    "or at most 63 alphanumeric characters, '-', '_' or '.', starting and ending with one",
                )
            )
    owners = meta.get("ownerReferences") or []
    for i, ref in enumerate(owners):
        for key in ("apiVersion", "kind", "name", "uid"):
            if not (isinstance(ref, dict) and ref.get(key)):
                problems.append((f"metadata.ownerReferences[{i}].{key}", f'Invalid value: "": {key} must not be empty'))
    if sum(1 for ref in owners if isinstance(ref, dict) and ref.get("controller")) > 1:
        problems.append(
            ("metadata.ownerReferences", "Invalid value: only one reference can have Controller set to true")
        )
    if plural == "secrets":
        data = obj.get("data") or {}
        for key in data:
            if len(key) > 253 or not _CONFIG_KEY.match(key):
                problems.append(
                    (
                        f"data[{key}]",
                        f'Invalid value: "{key}": a valid config key must consist of alphanumeric '
                        "characters, '-', '_' or '.'",
                    )
                )
        if sum(len(base64.b64decode(value)) for value in data.values()) > 1024 * 1024:
            problems.append(("data", "Too long: must have at most 1048576 bytes"))
    if plural == "events":
        involved = obj.get("involvedObject") or {}
        if involved.get("namespace") != meta.get("namespace"):
            problems.append(
                (
                    "involvedObject.namespace",
                    f'Invalid value: "{involved.get("namespace")}": does not match event.namespace',
                )
            )
        if obj.get("eventTime") and len(str(obj.get("message", "")).encode()) > 1024:
            problems.append(("message", 'Invalid value: "": can have at most 1024 characters'))
    return problems


@dataclass
class FakeKube:
    """Serves `objects[(plural, namespace, name)]` over HTTPS.

    `allowed_token` / the client certificate's CN authenticate; `forbidden` namespaces refuse every
    verb and `denied` (verb, plural) pairs refuse that verb everywhere ("*" for any verb), with the
    real server's 403 message. `requests` logs every request (method, raw path, identity), whatever
    its answer; `inject()` makes the next matching request get a canned answer (a failing or
    misbehaving server). The helpers below the HTTP part act as the rest of a cluster would.
    """

    folder: Path
    allowed_token: str = "kube-test-token-123"
    client_cn: str = "system:node:test"
    objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    forbidden: set[str] = field(default_factory=set)
    denied: set[tuple[str, str]] = field(default_factory=set)
    requests: list[Request] = field(default_factory=list)
    canned: list[Canned] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self._revision = 0
        self._closing = threading.Event()
        ca_key = _key()
        self.ca = _cert("fake-kube-ca", ca_key, None, ca_key, ca=True)
        srv_key = _key()
        srv = _cert("kube-apiserver", srv_key, self.ca, ca_key, server=True)
        cli_key = _key()
        cli = _cert(self.client_cn, cli_key, self.ca, ca_key, org="system:nodes")
        self.ca_pem = _pem(self.ca)
        self.client_cert_pem = _pem(cli)
        self.client_key_pem = _pem_key(cli_key)
        self.ca_file = self.folder / "ca.crt"
        self.ca_file.write_bytes(self.ca_pem)
        (self.folder / "server.crt").write_bytes(_pem(srv))
        (self.folder / "server.key").write_bytes(_pem_key(srv_key))
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.folder / "server.crt", self.folder / "server.key")
        ctx.load_verify_locations(cadata=self.ca_pem.decode())
        ctx.verify_mode = ssl.CERT_OPTIONAL
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                identity = fake._identity(self)
                fake.requests.append(Request(self.command, self.path, identity))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    code, answer = fake._serve(self.command, self.path, identity, body)
                except ApiError as exc:
                    code, answer = exc.code, exc.body
                data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (OSError, ssl.SSLError):  # the client gave up (a timeout test): nobody to answer
                    self.close_connection = True

            do_POST = do_PUT = do_PATCH = do_DELETE = do_GET  # noqa: N815

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def _identity(self, handler: BaseHTTPRequestHandler) -> str:
        auth = handler.headers.get("Authorization", "")
        if auth == f"Bearer {self.allowed_token}":
            return SA_IDENTITY
        peer = handler.connection.getpeercert()  # type: ignore[attr-defined]
        if peer:
            for rdn in peer.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        return str(value)
        return ""

    # ---- the API ---------------------------------------------------------------------------

    def _serve(self, method: str, path: str, identity: str, raw: bytes) -> tuple[int, dict[str, Any] | bytes]:
        route = _route(path)
        canned = self._take_canned(method, route.plural if route else "")
        if canned is not None:
            self._closing.wait(canned.delay)
            return canned.code, canned.body
        if not identity:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if route is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        verb = {
            "GET": "get" if route.name else "list",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete",
        }.get(method, method.lower())
        self._authorize(identity, verb, route)
        body = _json_body(raw) if raw else {}
        with self.lock:
            if (verb, bool(route.name)) == ("get", True):
                return 200, copy.deepcopy(self._stored(route))
            if (verb, bool(route.name)) == ("create", False):
                return 201, self._create(route, body)
            if (verb, bool(route.name)) == ("update", True):
                return 200, self._update(route, body)
            if (verb, bool(route.name)) == ("delete", True):
                return 200, self._delete(route, body)
        raise ApiError(
            405,
            "MethodNotAllowed",
            f"the fake API server does not serve {method} {path.split('?')[0]} "
            "(add it to tests/csi/fakekube.py when a caller needs it)",
        )

    def _take_canned(self, method: str, plural: str) -> Canned | None:
        with self.lock:
            for i, canned in enumerate(self.canned):
                if canned.method == method and canned.plural in ("*", plural):
                    return self.canned.pop(i)
        return None

    def _authorize(self, identity: str, verb: str, route: _Route) -> None:
        if route.namespace in self.forbidden or {(verb, route.plural), ("*", route.plural)} & self.denied:
            what = f'{route.qualified} "{route.name}"' if route.name else route.qualified
            raise ApiError(
                403,
                "Forbidden",
                f'{what} is forbidden: User "{identity}" cannot {verb} resource "{route.plural}" in API group '
                f'"{route.group}" in the namespace "{route.namespace}"',
                route.details(),
            )

    def _stored(self, route: _Route) -> dict[str, Any]:
        obj = self.objects.get((route.plural, route.namespace, route.name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{route.qualified} "{route.name}" not found', route.details())
        return obj

    def _checked(self, route: _Route, body: dict[str, Any]) -> dict[str, Any]:
        """The body as an object of the route's resource, with its namespace; 400 as the real server."""
        api_version, kind = RESOURCES[route.plural]
        if body.get("apiVersion", api_version) != api_version or body.get("kind", kind) != kind:
            raise ApiError(
                400,
                "BadRequest",
                f"the object ({body.get('apiVersion')}, {body.get('kind')}) is not a "
                f"{api_version} {kind}, which {route.qualified} holds",
            )
        obj = {**copy.deepcopy(body), "apiVersion": api_version, "kind": kind}
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        if meta.setdefault("namespace", route.namespace) != route.namespace:
            raise ApiError(
                400,
                "BadRequest",
                "the namespace of the provided object does not match the namespace sent on the request",
            )
        if route.plural == "secrets":  # stringData is write-only: the server folds it into data
            for key, value in (obj.pop("stringData", None) or {}).items():
                obj.setdefault("data", {})[key] = base64.b64encode(str(value).encode()).decode()
            for key, value in (obj.get("data") or {}).items():
                try:
                    base64.b64decode(str(value), validate=True)
                except binascii.Error:
                    raise ApiError(
                        400,
                        "BadRequest",
                        f'Secret in version "v1" cannot be handled as a Secret: data[{key}]: illegal base64 data',
                    ) from None
        return obj

    def _validate(self, route: _Route, obj: dict[str, Any]) -> None:
        problems = _invalid_fields(route.plural, obj)
        if problems:
            name = obj["metadata"].get("name", "")
            raise ApiError(
                422,
                "Invalid",
                f'{route.kind} "{name}" is invalid: ' + "; ".join(f"{where}: {what}" for where, what in problems),
                {
                    "name": name,
                    "group": route.group,
                    "kind": route.kind,
                    "causes": [
                        {"reason": "FieldValueInvalid", "message": what, "field": where} for where, what in problems
                    ],
                },
            )

    def _bump(self) -> str:
        self._revision += 1
        return str(self._revision)

    def _create(self, route: _Route, body: dict[str, Any]) -> dict[str, Any]:
        obj = self._checked(route, body)
        meta = obj["metadata"]
        if meta.get("resourceVersion"):
            raise ApiError(500, "InternalError", "resourceVersion should not be set on objects to be created")
        if not meta.get("name") and meta.get("generateName"):
            while not meta.get("name") or (route.plural, route.namespace, meta["name"]) in self.objects:
                meta["name"] = str(meta["generateName"])[:58] + "".join(random.choices(_GENERATED, k=5))
        name = str(meta.get("name", ""))
        if not name:
            raise ApiError(
                422,
                "Invalid",
                f'{route.kind} "" is invalid: metadata.name: Required value: name or generateName is required',
            )
        key = (route.plural, route.namespace, name)
        if key in self.objects:
            raise ApiError(
                409, "AlreadyExists", f'{route.qualified} "{name}" already exists', route._replace(name=name).details()
            )
        self._validate(route, obj)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._bump())
        self.objects[key] = obj
        return copy.deepcopy(obj)

    def _update(self, route: _Route, body: dict[str, Any]) -> dict[str, Any]:
        obj = self._checked(route, body)
        meta = obj["metadata"]
        if meta.get("name") != route.name:
            raise ApiError(
                400,
                "BadRequest",
                f"the name of the object ({meta.get('name')}) does not match the name on the URL ({route.name})",
            )
        current = self._stored(route)
        stored_meta = current["metadata"]
        if meta.get("resourceVersion") and meta["resourceVersion"] != stored_meta["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {route.qualified} "{route.name}": the object '
                "has been modified; please apply your changes to the latest version and try again",
                route.details(),
            )
        immutable = [("metadata.uid", meta.get("uid"), stored_meta["uid"])]
        if route.plural == "secrets":
            immutable.append(("type", obj.get("type", "Opaque"), current.get("type", "Opaque")))
        for where, new, old in immutable:
            if new and new != old:
                raise ApiError(
                    422,
                    "Invalid",
                    f'{route.kind} "{route.name}" is invalid: {where}: Invalid value: "{new}": field is immutable',
                    route.details(),
                )
        self._validate(route, obj)
        meta.update(
            uid=stored_meta["uid"], creationTimestamp=stored_meta["creationTimestamp"], resourceVersion=self._bump()
        )
        self.objects[(route.plural, route.namespace, route.name)] = obj
        return copy.deepcopy(obj)

    def _delete(self, route: _Route, options: dict[str, Any]) -> dict[str, Any]:
        current = self._stored(route)
        for key, label in (("uid", "UID"), ("resourceVersion", "ResourceVersion")):
            wanted = (options.get("preconditions") or {}).get(key)
            if wanted and wanted != current["metadata"][key]:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on {route.qualified} "{route.name}": '
                    f"Precondition failed: {label} in precondition: {wanted}, {label} in object meta: "
                    f"{current['metadata'][key]}",
                    route.details(),
                )
        del self.objects[(route.plural, route.namespace, route.name)]
        if route.plural == "pods":  # the pod as it was; the real server's has a deletionTimestamp until kubelet is done
            return copy.deepcopy(current)
        return {**status(200, "", ""), "status": "Success", "details": route.details(uid=current["metadata"]["uid"])}

    # ---- what the rest of a cluster does, for tests -----------------------------------------

    def add(self, plural: str, obj: dict[str, Any], *, at: tuple[str, str] | None = None) -> dict[str, Any]:
        """Store `obj` as it is (no RBAC, no validation: a test's fixture) under `at` (namespace, name;
        default: its metadata's), with the fields the server sets on create filled in where missing."""
        meta = obj.setdefault("metadata", {})
        namespace, name = at or (meta["namespace"], meta["name"])
        with self.lock:
            meta.setdefault("uid", str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", _now())
            meta["resourceVersion"] = self._bump()
            self.objects[(plural, namespace, name)] = obj
        return copy.deepcopy(obj)

    def add_spc(
        self, namespace: str, name: str, parameters: dict[str, str], *, metadata: dict[str, str] | None = None
    ) -> None:
        """Serve a SecretProviderClass at namespace/name; `metadata` makes the answer claim to be
        another object (a misbehaving API server or proxy)."""
        meta = {"name": name, "namespace": namespace, "uid": "0b0e0f00-0000-4000-8000-000000000001"}
        obj = {
            "apiVersion": SPC_GROUP_VERSION,
            "kind": "SecretProviderClass",
            "metadata": {**meta, **(metadata or {})},
            "spec": {"provider": "azure", "parameters": parameters},
        }
        self.add("secretproviderclasses", obj, at=(namespace, name))

    def add_pod(
        self, namespace: str, name: str, *, controller: str | None = "ReplicaSet", uid: str = ""
    ) -> dict[str, Any]:
        """A running pod; `controller` is the kind of its controlling owner (None: a bare pod)."""
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4())}
        if controller:
            meta["ownerReferences"] = [
                {
                    "apiVersion": "apps/v1",
                    "kind": controller,
                    "name": f"{name}-owner",
                    "uid": str(uuid.uuid4()),
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ]
        return self.add("pods", {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": {"phase": "Running"}})

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    def items(self, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [
                copy.deepcopy(obj)
                for (kind, ns, _), obj in self.objects.items()
                if kind == plural and namespace in (None, ns)
            ]

    def events_for(self, namespace: str, pod: str) -> list[dict[str, Any]]:
        """The events posted on a pod, oldest first."""
        return [e for e in self.items("events", namespace) if e.get("involvedObject", {}).get("name") == pod]

    def delete_pod(self, namespace: str, name: str) -> None:
        """The pod goes away (kubelet done) and the garbage collector runs."""
        self.delete("pods", namespace, name)

    def delete(self, plural: str, namespace: str, name: str) -> None:
        """Someone else deletes the object (an admin's kubectl delete) and the garbage collector runs."""
        with self.lock:
            del self.objects[(plural, namespace, name)]
            self.collect_garbage()

    def collect_garbage(self) -> list[tuple[str, str, str]]:
        """What Kubernetes' garbage collector controller does, at once: delete every object whose
        owners are all gone (repeatedly, for chains), and drop the references to gone owners from
        objects that still have a live one. Owners of kinds the fake does not hold (ReplicaSets, ...)
        count as alive. Returns the keys deleted."""
        held = {kind for _, kind in RESOURCES.values()}
        deleted = []
        with self.lock:
            changed = True
            while changed:
                changed = False
                live = {obj["metadata"].get("uid") for obj in self.objects.values()}
                for key, obj in list(self.objects.items()):
                    refs = obj["metadata"].get("ownerReferences") or []
                    solid = [ref for ref in refs if ref.get("kind") not in held or ref.get("uid") in live]
                    if not refs or len(solid) == len(refs):
                        continue
                    if solid:
                        obj["metadata"]["ownerReferences"] = solid
                        obj["metadata"]["resourceVersion"] = self._bump()
                    else:
                        del self.objects[key]
                        deleted.append(key)
                    changed = True
        return deleted

    def inject(
        self, method: str, plural: str, code: int, body: dict[str, Any] | bytes, *, times: int = 1, delay: float = 0.0
    ) -> None:
        """The next `times` requests with `method` on `plural` ("*": any) get this answer after `delay` s."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        with self.lock:
            self.canned.extend([Canned(method, plural, code, data, delay)] * times)

    def kubeconfig(self, path: Path, *, client_cert: bool = False, token: str | None = None) -> Path:
        user: dict[str, Any]
        if client_cert:
            user = {
                "client-certificate-data": base64.b64encode(self.client_cert_pem).decode(),
                "client-key-data": base64.b64encode(self.client_key_pem).decode(),
            }
        else:
            user = {"token": self.allowed_token if token is None else token}
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "test",
            "clusters": [
                {
                    "name": "fake",
                    "cluster": {
                        "server": self.url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            ],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "test", "context": {"cluster": "fake", "user": "u"}}],
        }
        path.write_text(json.dumps(doc))
        return path

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


def _json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except ValueError:
        raise ApiError(400, "BadRequest", "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the request body is not a JSON object")
    return body
