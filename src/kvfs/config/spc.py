"""Where parameters come from: a SecretProviderClass manifest, --param overlays, --secrets files.

`kvfs mount --spc FILE` takes the same manifest `kubectl apply` would; the CSI plugin gets the
same object from the Kubernetes API as JSON. Both end in `spc_parameters`, which returns
`spec.parameters` as str → str. Scalars keep the text the user wrote (``0755`` stays "0755",
not 493); YAML booleans become "true"/"false". Errors name the file and the field, and never
echo a value from a secrets file.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import json
import logging
import os
import re
import stat
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import yaml
from yaml.nodes import ScalarNode

from kvfs.config.model import SecretObject, SecretObjectData
from kvfs.config.objects import OBJECT_FIELDS, SafeLoader
from kvfs.config.parameters import KNOWN_PARAMETERS, KUBELET_PREFIX, USER_PARAMETERS
from kvfs.errors import ConfigError

log = logging.getLogger(__name__)

API_VERSIONS = ("secrets-store.csi.x-k8s.io/v1", "secrets-store.csi.x-k8s.io/v1alpha1")
KIND = "SecretProviderClass"
PROVIDER = "azure"
TLS_SECRET_TYPE = "kubernetes.io/tls"
TLS_KEYS = ("tls.crt", "tls.key")
_DNS1123_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9](?:[-a-z0-9]*[a-z0-9])?(?:\.[a-z0-9](?:[-a-z0-9]*[a-z0-9])?)*$")
_DATA_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")  # what the API server takes as a Secret's data key


class _RawScalarLoader(SafeLoader):
    """SafeLoader that keeps numbers and timestamps as the text written; bools as true/false."""


def _raw_text(loader: yaml.SafeLoader, node: ScalarNode) -> str:
    return str(node.value)


def _bool_text(loader: yaml.SafeLoader, node: ScalarNode) -> str:
    return "true" if loader.construct_yaml_bool(node) else "false"


for _tag in ("int", "float", "timestamp"):
    _RawScalarLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _raw_text)
_RawScalarLoader.add_constructor("tag:yaml.org,2002:bool", _bool_text)


def _file_error(path: str, problem: str, fix: str, field: str = "") -> ConfigError:
    where = f"{path}: {field}: " if field else f"{path}: "
    return ConfigError(field or path, None, problem, fix, message=where + problem)


def _read_text(path: str, what: str, flag: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        raise _file_error(path, f"{what} not found", f"check the path given to {flag}") from None
    except IsADirectoryError:
        raise _file_error(path, "is a directory", f"{flag} takes a file") from None
    except UnicodeDecodeError:
        raise _file_error(path, "is not UTF-8 text", f"{flag} takes a YAML or JSON file") from None
    except OSError as exc:
        raise _file_error(
            path,
            f"cannot read {what}: {exc.strerror or type(exc).__name__}",
            "check its permissions",
        ) from None


def _yaml_position(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    if mark is None:
        return ""
    return f" at line {mark.line + 1} column {mark.column + 1}"


class Manifest(NamedTuple):
    """The one SecretProviderClass of a manifest file: its name (for messages) and `spec.parameters`."""

    name: str
    parameters: dict[str, str]


def load_manifest(path: str) -> Manifest:
    """The one SecretProviderClass in a YAML file (multi-document ok)."""
    text = _read_text(path, "SecretProviderClass manifest", "--spc")
    try:
        docs = [d for d in yaml.load_all(text, Loader=_RawScalarLoader) if d is not None]
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise _file_error(
            path, f"not valid YAML{_yaml_position(exc)}: {problem}", "fix the manifest's YAML"
        ) from None
    candidates: list[Any] = []
    for doc in docs:
        if (
            isinstance(doc, dict)
            and doc.get("kind") == "List"
            and isinstance(doc.get("items"), list)
        ):
            candidates.extend(doc["items"])  # `kubectl get -o yaml` output
        else:
            candidates.append(doc)
    spcs = [d for d in candidates if isinstance(d, dict) and d.get("kind") == KIND]
    if not spcs:
        kinds = sorted({str(d.get("kind")) for d in candidates if isinstance(d, dict)})
        fix = f"give a manifest with kind: {KIND} and apiVersion: {API_VERSIONS[0]}"
        if any(k.lower() == KIND.lower() for k in kinds):
            fix = f"kind is case-sensitive: write kind: {KIND}"
        found = ", ".join(kinds) if kinds else "none"
        raise _file_error(path, f"no {KIND} found (kinds found: {found})", fix, "kind")
    if len(spcs) > 1:
        names = ", ".join(_spc_name(d) for d in spcs)
        raise _file_error(
            path,
            f"holds {len(spcs)} SecretProviderClasses ({names}); kvfs mounts one",
            "put each SecretProviderClass in its own file",
            "kind",
        )
    if (spcs[0].get("spec") or {}).get("secretObjects"):
        log.warning(
            "%s: spec.secretObjects is ignored by kvfs mount: only the CSI plugin syncs Kubernetes Secrets"
            " (kvfs csi node --sync-secrets)",
            path,
        )
    return Manifest(_spc_name(spcs[0]), spc_parameters(spcs[0], source=path))


def _spc_name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return str(name) if name else "<unnamed>"


def spc_parameters(spc_object: Mapping[str, Any], *, source: str = KIND) -> dict[str, str]:
    """`spec.parameters` of a parsed SecretProviderClass (manifest or Kubernetes API JSON).

    `source` names where it came from (a file path, or namespace/name) in error messages.
    """
    api_version = spc_object.get("apiVersion")
    if api_version not in API_VERSIONS:
        raise _file_error(
            source,
            f"unsupported apiVersion {api_version!r}",
            "use apiVersion: " + " or ".join(API_VERSIONS),
            "apiVersion",
        )
    if spc_object.get("kind") != KIND:
        raise _file_error(
            source, f"kind is {spc_object.get('kind')!r}, not {KIND}", f"use kind: {KIND}", "kind"
        )
    spec = spc_object.get("spec")
    if not isinstance(spec, Mapping):
        raise _file_error(
            source,
            "spec is missing or not a mapping",
            "add spec.provider and spec.parameters",
            "spec",
        )
    provider = spec.get("provider")
    if provider not in (None, "", PROVIDER):
        fix = f"kvfs serves Azure Key Vault only: use provider: {PROVIDER}"
        if isinstance(provider, str) and provider.strip().lower() == PROVIDER:
            fix = f"the provider name is case-sensitive: write provider: {PROVIDER}"
        raise _file_error(source, f"provider {provider!r} is not supported", fix, "spec.provider")
    raw = spec.get("parameters")
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _file_error(
            source,
            "spec.parameters must be a mapping of names to strings",
            "see the kvfs docs",
            "spec.parameters",
        )
    params: dict[str, str] = {}
    for key, value in raw.items():
        params[str(key)] = _parameter_text(source, str(key), value)
    return params


def secret_objects(
    spc_object: Mapping[str, Any], *, source: str = KIND
) -> tuple[list[SecretObject], list[ConfigError]]:
    """`spec.secretObjects`, as upstream's driver reads them: each entry checked on its own, so a
    bad one is reported and the others are still synced. Names and keys are trimmed, as upstream."""
    spec = spc_object.get("spec")
    raw = spec.get("secretObjects") if isinstance(spec, Mapping) else None
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [
            _file_error(
                source,
                "spec.secretObjects must be a list",
                "write one `- secretName: ...` entry per Secret",
                "spec.secretObjects",
            )
        ]
    objects: list[SecretObject] = []
    errors: list[ConfigError] = []
    for index, item in enumerate(raw):
        try:
            obj = _secret_object(item, f"spec.secretObjects[{index}]", source)
        except ConfigError as exc:
            errors.append(exc)
            continue
        if any(o.secret_name == obj.secret_name for o in objects):
            errors.append(
                _file_error(
                    source,
                    f"a second entry for Secret {obj.secret_name!r}",
                    "give each Secret one entry, with all its keys under data",
                    f"spec.secretObjects[{index}].secretName",
                )
            )
            continue
        objects.append(obj)
    return objects, errors


def _secret_object(item: Any, where: str, source: str) -> SecretObject:
    if not isinstance(item, Mapping):
        raise _file_error(source, "must be a mapping", "see secretName, type, data", where)
    name = _entry_text(item, "secretName", where, source)
    if not _DNS1123_SUBDOMAIN.match(name):
        raise _file_error(
            source,
            f"{name[:80]!r} is not a Secret name",
            "use lower-case letters, digits, '-' and '.', at most 253 characters",
            f"{where}.secretName",
        )
    kind = _entry_text(item, "type", where, source, fix=f"set type: Opaque, or {TLS_SECRET_TYPE} for ingress TLS")
    data = item.get("data")
    if not isinstance(data, list) or not data:
        raise _file_error(
            source, "data is empty", "list the keys: data: [{objectName: FILE, key: KEY}]", f"{where}.data"
        )
    entries: list[SecretObjectData] = []
    for index, entry in enumerate(data):
        at = f"{where}.data[{index}]"
        if not isinstance(entry, Mapping):
            raise _file_error(source, "must be a mapping", "write objectName: FILE and key: KEY", at)
        file = _entry_text(entry, "objectName", at, source, fix="name the mounted file (objectAlias, else objectName)")
        key = _entry_text(entry, "key", at, source, fix="name the key of the Secret's data")
        if not _DATA_KEY.match(key):
            raise _file_error(
                source,
                f"{key[:80]!r} is not a Secret data key",
                "use letters, digits, '-', '_' and '.' only",
                f"{at}.key",
            )
        if kind == TLS_SECRET_TYPE and key not in TLS_KEYS:
            raise _file_error(
                source,
                f"key {key!r} is not supported for a {TLS_SECRET_TYPE} Secret",
                "only tls.crt and tls.key: the certificates and the private key of the file",
                f"{at}.key",
            )
        if any(e.key == key for e in entries):
            raise _file_error(source, f"key {key!r} appears twice", "give each key one file", f"{at}.key")
        entries.append(SecretObjectData(file, key))
    return SecretObject(
        name,
        kind,
        tuple(entries),
        labels=_string_map(item, "labels", where, source),
        annotations=_string_map(item, "annotations", where, source),
    )


def _entry_text(item: Mapping[str, Any], key: str, where: str, source: str, *, fix: str = "") -> str:
    value = item.get(key)
    text = value.strip() if isinstance(value, str) else ""
    if not text:
        raise _file_error(source, f"{key} is empty", fix or f"set {key}", f"{where}.{key}")
    return text


def _string_map(item: Mapping[str, Any], key: str, where: str, source: str) -> tuple[tuple[str, str], ...]:
    value = item.get(key) or {}
    texts = {str(k): _scalar_text(v) for k, v in value.items()} if isinstance(value, Mapping) else None
    if texts is None or any(v is None for v in texts.values()):
        raise _file_error(source, f"{key} must map names to strings", 'quote the values: name: "..."', f"{where}.{key}")
    return tuple(sorted((k, v) for k, v in texts.items() if v is not None))


def _scalar_text(value: Any) -> str | None:
    """A YAML scalar as the string Kubernetes would hold; None for lists and mappings."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    return None


def _parameter_text(source: str, key: str, value: Any) -> str:
    text = _scalar_text(value)
    if text is not None:
        return text
    fix = f'{key} must be a string: quote it, e.g. {key}: "..."'
    if key == "objects":
        fix = "objects is a YAML text block: write `objects: |` and indent the array below it"
    raise _file_error(
        source,
        f"value of {key} is a {type(value).__name__}, not a string",
        fix,
        f"spec.parameters.{key}",
    )


def overlay(params: Mapping[str, str], pairs: Sequence[str]) -> dict[str, str]:
    """Apply `--param KEY=VALUE` pairs over `params`; like volumeAttributes, the overlay wins.

    Names are case-sensitive, so a KEY that differs from a known parameter or a manifest key
    only in case would be silently ignored (and the manifest's value used): refused instead. Another
    unknown KEY (an object's field included) is taken, as a volumeAttribute would be, with a warning.
    """
    out = dict(params)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            shown = pair if not sep else "=..."
            raise ConfigError(
                "--param",
                shown,
                "expected KEY=VALUE",
                "e.g. --param keyvaultName=myvault; parameter names are case-sensitive",
            )
        _check_name(key, params)
        out[key] = value
    return out


def _check_name(key: str, params: Mapping[str, str]) -> None:
    if key in KNOWN_PARAMETERS or key in params:
        return
    meant = sorted({name for name in (*KNOWN_PARAMETERS, *params) if name.lower() == key.lower()})
    if meant:
        where = "the manifest sets" if any(name in params for name in meant) else "kvfs reads"
        raise ConfigError(
            "--param",
            f"{key}=...",
            f"parameter names are case-sensitive: {key} is not {' or '.join(meant)}, which {where}",
            f"did you mean {' or '.join(meant)}? write --param {meant[0]}=...",
        )
    if key.startswith(KUBELET_PREFIX):
        return  # kubelet's pod-info keys, as a volume's attributes carry them
    # Taken, as a pod's volumeAttributes are (the mount contract), but said: it is likely a mistake.
    field = next((name for name in OBJECT_FIELDS if name.lower() == key.lower()), "")
    if field:
        why = f"{field} is a field of one object, not a parameter (set it in that object's entry under objects.array)"
    else:
        close = difflib.get_close_matches(key, sorted({*USER_PARAMETERS, *params}), n=1)
        why = (f"did you mean {close[0]}? " if close else "") + "parameters: " + ", ".join(USER_PARAMETERS)
    log.warning(
        "--param %s=...: neither a parameter kvfs reads nor one the manifest sets, so it changes nothing (%s)", key, why
    )


def load_secrets_file(path: str) -> dict[str, str]:
    """A flat YAML/JSON mapping (clientid, clientsecret) or a Kubernetes Secret manifest.

    Stands in for a nodePublishSecretRef. Error messages name keys, never values.
    """
    text = _read_text(path, "secrets file", "--secrets")
    try:
        mode = os.stat(path).st_mode
        if mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("%s holds credentials and is readable by other users; chmod 600 it", path)
    except OSError:
        pass
    doc: Any
    json_error: json.JSONDecodeError | None = None
    if text.lstrip().startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            json_error = exc  # maybe a YAML flow mapping such as {clientid: x}
    if json_error is not None or not text.lstrip().startswith("{"):
        try:
            doc = yaml.load(text, Loader=_RawScalarLoader)
        except yaml.YAMLError as exc:
            if json_error is not None:
                raise _file_error(
                    path,
                    f"not valid JSON: {json_error.msg} at line {json_error.lineno}"
                    f" column {json_error.colno}",
                    'write a JSON object like {"clientid": "...", "clientsecret": "..."}',
                ) from None
            # The problem text can quote the file's characters, so only the position is shown.
            raise _file_error(
                path,
                f"not valid YAML{_yaml_position(exc)}",
                "write a flat mapping: clientid: ... and clientsecret: ... on their own lines",
            ) from None
    if not isinstance(doc, dict):
        raise _file_error(
            path,
            "must hold a mapping with clientid and clientsecret",
            "write clientid: ... and clientsecret: ... on their own lines, or JSON",
        )
    if doc.get("kind") == "Secret" and ("data" in doc or "stringData" in doc):
        return _secret_manifest_data(path, doc)
    out: dict[str, str] = {}
    for key, value in doc.items():
        out[str(key)] = _secret_value(path, str(key), value)
    return out


def _secret_value(path: str, key: str, value: Any) -> str:
    text = _scalar_text(value)
    if text is not None:
        return text
    raise _file_error(
        path,
        f"value of {key} must be a string",
        "the secrets file is a flat mapping of strings",
        key,
    )


def _secret_manifest_data(path: str, doc: Mapping[str, Any]) -> dict[str, str]:
    """`data` (base64) and `stringData` of a Kubernetes Secret; stringData wins, as in K8s."""
    out: dict[str, str] = {}
    data = doc.get("data") or {}
    string_data = doc.get("stringData") or {}
    if not isinstance(data, Mapping) or not isinstance(string_data, Mapping):
        raise _file_error(path, "data and stringData must be mappings", "fix the Secret manifest")
    for key, value in data.items():
        try:
            out[str(key)] = base64.b64decode(str(value), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise _file_error(
                path,
                f"data.{key} is not base64 of UTF-8 text",
                "Secret data values are base64; use stringData for plain text",
                f"data.{key}",
            ) from None
    for key, value in string_data.items():
        out[str(key)] = _secret_value(path, f"stringData.{key}", value)
    return out
