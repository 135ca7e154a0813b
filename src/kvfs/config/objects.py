"""The `objects` parameter → validated `ObjectSpec`s, every rule checked before any network call.

Shape (as upstream): a YAML mapping whose key `array` lists strings, each string a YAML document
for one object. Decoding follows Go's yaml.v2 as the provider uses it: string fields take the
scalar's text as written (so ``filePermission: 0755`` is the text "0755", not the int 493),
`objectVersionHistory` must be a YAML int, unknown keys are ignored, all strings are trimmed.

Upstream's error texts are kept as prefixes (users alert on them); kvfs then names the fix.
Where upstream is wrong kvfs is stricter or more precise:
- `objectType` is checked here, not after earlier objects were already fetched;
- `..` is refused only as a path component, so ``a..b`` is a valid name;
- aliases follow the driver's path rules (clean, relative, components ≤ 255 bytes, no leading
  ``..`` which the ``..data`` layout reserves);
- duplicate file names, and a file or history folder that is also a parent of another file, are
  refused instead of silently collapsing;
- a bad `filePermission` is an error instead of mode 0; object names and versions are checked;
- `objectVersionHistory` is at most `MAX_VERSION_HISTORY`;
- the text is at most `MAX_OBJECTS_TEXT` bytes and lists at most `MAX_OBJECTS` objects, and no
  document is composed past a bounded number of parser events: the CSI plugin parses a tenant's
  text as root to refuse a bad publish, in a container with little memory. The safe loader builds
  no Python objects from tags, and an alias can only repeat an item, a duplicate file name.
- a field name written in another case (``objectname``) is refused instead of ignored.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal, cast

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode

from kvfs.config.model import ObjectSpec, ObjectType
from kvfs.errors import ConfigError

log = logging.getLogger(__name__)

# libyaml's parser when PyYAML has it (its wheels do): an `objects` list of 1000 entries parses in
# a tenth of the time, and syntax errors read as Go's yaml.v2 (a port of libyaml) words them in
# upstream's messages. Same nodes, marks and constructors as the pure-Python SafeLoader.
SafeLoader = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader

_Format = Literal["", "pem", "pfx"]
_Encoding = Literal["", "utf-8", "base64", "hex"]
_YAML_TAG = "tag:yaml.org,2002:"
_NULL = _YAML_TAG + "null"
_INT = _YAML_TAG + "int"
_OBJECT_NAME = re.compile(r"^[0-9A-Za-z-]{1,127}$")
# Listing a history folder fetches every version it shows (one GET each, 16 at a time) and keeps
# them in memory; 100 keeps one `ls` to a few seconds and well under Key Vault's throttling limit
# (4000 GETs per 10 s per vault), and rotation re-checks at most 100 names. Upstream has no cap.
MAX_VERSION_HISTORY = 100
# Bounds on what parsing `objects` may cost: a SecretProviderClass is at most ~1.5 MiB (etcd's
# default request limit) and real volumes list tens of objects; 1 MiB holds ~20000 short entries.
MAX_OBJECTS_TEXT = 1024 * 1024
MAX_OBJECTS = 10_000
# Parser events composed at most: the objects mapping (an event per item, a few around them, room
# for keys kvfs ignores) and one object (each field a key and a value, room for ignored keys).
_MAX_ARRAY_EVENTS = MAX_OBJECTS + 1000
_MAX_OBJECT_EVENTS = 1000
_SPLIT_FIX = "split the objects over several SecretProviderClasses, each mounted as its own volume"
_VERSION = re.compile(r"^[0-9A-Fa-f]{32}$")
_OCTAL = re.compile(r"^[0-7]+$")
_TYPES: tuple[ObjectType, ...] = ("secret", "key", "cert")
_INT32_MAX = 2**31 - 1
_MAX_PATH = 4096
_MAX_COMPONENT = 255
_STRING_FIELDS = (
    "objectName",
    "objectAlias",
    "objectType",
    "objectVersion",
    "objectFormat",
    "objectEncoding",
    "filePermission",
)
OBJECT_FIELDS = (*_STRING_FIELDS, "objectVersionHistory")
_SHAPE_FIX = (
    "objects is a YAML mapping whose key `array` lists one `- |` text block per object,"
    " each holding e.g. objectName: my-secret and objectType: secret"
)


@dataclass
class _RawObject:
    """One array item as decoded from YAML, before validation (strings trimmed)."""

    objectName: str = ""
    objectAlias: str = ""
    objectType: str = ""
    objectVersion: str = ""
    objectFormat: str = ""
    objectEncoding: str = ""
    filePermission: str = ""
    objectVersionHistory: int = 0


def parse_objects(text: str) -> tuple[ObjectSpec, ...]:
    """Parse and validate the `objects` YAML; an empty `array` is a valid, empty mount."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_OBJECTS_TEXT:
        raise ConfigError("objects", None, f"is {size} bytes, more than {MAX_OBJECTS_TEXT} (1 MiB)", _SPLIT_FIX)
    items = _decode_array(text)
    if len(items) > MAX_OBJECTS:
        raise ConfigError("objects", None, f"lists {len(items)} objects, more than {MAX_OBJECTS}", _SPLIT_FIX)
    specs: list[ObjectSpec] = []
    owners: dict[str, ObjectSpec] = {}
    folders: dict[str, ObjectSpec] = {}
    for index, item in enumerate(items):
        raw = _decode_object(item, index)
        spec = _validate(raw)
        _check_unique(spec, owners, folders)
        specs.append(spec)
    log.debug("parsed %d object(s)", len(specs))
    return tuple(specs)


# --- YAML decoding (yaml.v2 semantics) ------------------------------------------------------


class _UnmarshalError(Exception):
    """A yaml.v2-style "cannot unmarshal" problem; becomes a ConfigError with context."""

    def __init__(self, text: str, fix: str = "") -> None:
        super().__init__(text)
        self.text = text
        self.fix = fix


class _TooMuchYaml(Exception):
    """The document has more parser events than its caller allows."""


def _compose_first(text: str, max_events: int) -> Node | None:
    """The first YAML document as a node tree (yaml.v2's Unmarshal reads only the first).

    A composed tree keeps every node (some 300 bytes each) until it is dropped, so the document's
    events are counted first, one at a time, and past `max_events` it is not composed at all.
    """
    loader = SafeLoader(text)
    try:
        for _ in range(max_events):
            if loader.check_event(yaml.DocumentEndEvent, yaml.StreamEndEvent):
                break
            loader.get_event()
        else:
            raise _TooMuchYaml
    finally:
        loader.dispose()
    loader = SafeLoader(text)
    try:
        return loader.get_node() if loader.check_node() else None
    finally:
        loader.dispose()


def _yaml_syntax_text(exc: yaml.YAMLError) -> str:
    """`yaml: line N: problem`, without echoing the document (no snippet)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if mark is not None:
            return f"yaml: line {mark.line + 1}: {problem}"
        return f"yaml: {problem}"
    return "yaml: invalid YAML"


def _describe(node: Node) -> str:
    """Go's way of naming a node in unmarshal errors: ``!!str `value` `` or ``!!seq``."""
    tag = node.tag.replace(_YAML_TAG, "!!")
    if isinstance(node, ScalarNode):
        shown = node.value if len(node.value) <= 40 else node.value[:37] + "..."
        return f"{tag} `{shown}`"
    return tag


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _is_null(node: Node) -> bool:
    return isinstance(node, ScalarNode) and node.tag == _NULL


def _decode_array(text: str) -> list[str]:
    """The `array` strings of the objects mapping."""

    def fail(problem: str, fix: str = _SHAPE_FIX) -> ConfigError:
        msg = f"failed to yaml unmarshal objects, error: {problem}"
        return ConfigError("objects", None, msg, fix, message=msg)

    try:
        root = _compose_first(text, _MAX_ARRAY_EVENTS)
    except yaml.YAMLError as exc:
        raise fail(_yaml_syntax_text(exc)) from None
    except _TooMuchYaml:
        raise ConfigError("objects", None, f"is more YAML than {MAX_OBJECTS} objects take", _SPLIT_FIX) from None
    if root is None or _is_null(root):
        return []
    if not isinstance(root, MappingNode):
        raise fail(
            f"yaml: unmarshal errors: line {_line(root)}: cannot unmarshal {_describe(root)}"
            " into types.StringArray"
        )
    array: Node | None = None
    for key, value in root.value:
        if isinstance(key, ScalarNode) and key.value == "array":
            array = value
    if array is None or _is_null(array):
        return []
    if not isinstance(array, yaml.SequenceNode):
        raise fail(
            f"yaml: unmarshal errors: line {_line(array)}: cannot unmarshal {_describe(array)}"
            " into []string"
        )
    items: list[str] = []
    for item in array.value:
        if _is_null(item):
            items.append("")
        elif isinstance(item, ScalarNode):
            items.append(item.value)
        else:
            raise fail(
                f"yaml: unmarshal errors: line {_line(item)}: cannot unmarshal {_describe(item)}"
                " into string",
                "each array item must be a string holding one object's YAML: start it with"
                " `- |` and indent the object's fields below it",
            )
    return items


def _decode_object(text: str, index: int) -> _RawObject:
    """One array item → `_RawObject`, with upstream's `unmarshal failed ... at index` errors."""

    def fail(problem: str, fix: str) -> ConfigError:
        msg = f"unmarshal failed for keyVaultObjects at index {index}, error: {problem}"
        return ConfigError(f"objects.array[{index}]", None, msg, fix, message=msg)

    try:
        root = _compose_first(text, _MAX_OBJECT_EVENTS)
    except yaml.YAMLError as exc:
        raise fail(_yaml_syntax_text(exc), "fix the YAML of this object") from None
    except _TooMuchYaml:
        raise fail("more YAML than an object takes", f"an object is a mapping of its fields: {', '.join(OBJECT_FIELDS)}") from None
    raw = _RawObject()
    if root is None or _is_null(root):
        return raw
    try:
        if not isinstance(root, MappingNode):
            raise _UnmarshalError(
                f"line {_line(root)}: cannot unmarshal {_describe(root)} into types.KeyVaultObject",
                "each object is a mapping such as `objectName: my-secret` and `objectType: secret`",
            )
        for key, value in root.value:
            if not isinstance(key, ScalarNode):
                continue
            if key.value in _STRING_FIELDS:
                setattr(raw, key.value, _string_field(value).strip())
            elif key.value == "objectVersionHistory":
                raw.objectVersionHistory = _int32_field(value)
            else:
                _refuse_miscased(key)
    except _UnmarshalError as exc:
        raise fail(f"yaml: unmarshal errors: {exc.text}", exc.fix) from None
    return raw


def _refuse_miscased(key: ScalarNode) -> None:
    """Unknown keys are ignored, as upstream does; one that differs from a field only in case
    is a typo that would silently drop the field (``objectname`` → "file name must not be empty",
    ``objectalias`` → the wrong file name), so it is named."""
    meant = next((f for f in OBJECT_FIELDS if f.lower() == key.value.lower()), None)
    if meant is not None:
        raise _UnmarshalError(
            f"line {_line(key)}: unknown field {key.value} (field names are case-sensitive)",
            f"did you mean {meant}? write {meant}: instead of {key.value}:",
        )


def _string_field(node: Node) -> str:
    if _is_null(node):
        return ""
    if isinstance(node, ScalarNode):
        return str(node.value)
    raise _UnmarshalError(
        f"line {_line(node)}: cannot unmarshal {_describe(node)} into string",
        "object fields are single values, e.g. objectName: my-secret",
    )


def _int32_field(node: Node) -> int:
    if _is_null(node):
        return 0
    if isinstance(node, ScalarNode) and node.tag == _INT:
        value: int = SafeConstructor().construct_yaml_int(node)
        if -_INT32_MAX - 1 <= value <= _INT32_MAX:
            return value
    raise _UnmarshalError(
        f"line {_line(node)}: cannot unmarshal {_describe(node)} into int32",
        "objectVersionHistory must be a whole number written without quotes,"
        " e.g. objectVersionHistory: 5",
    )


# --- validation -------------------------------------------------------------------------------


def _validate(raw: _RawObject) -> ObjectSpec:
    """All per-object rules; the first failure raises with upstream's object prefix."""
    prefix = (
        f"failed to get objectType:{raw.objectType}, objectName:{raw.objectName},"
        f" objectVersion:{raw.objectVersion}: "
    )

    def fail(field: str, value: str, problem: str, fix: str) -> ConfigError:
        msg = prefix + problem
        return ConfigError(field, value, problem, fix, message=msg)

    otype = raw.objectType
    if otype not in _TYPES:
        fix = "objectType must be exactly secret, key or cert"
        if otype.lower() in _TYPES:
            fix = f"object types are case-sensitive: write objectType: {otype.lower()}"
        elif not otype:
            fix = "objectType is missing: add objectType: secret, key or cert"
        raise fail(
            "objectType", otype, "Invalid vaultObjectTypes. Should be secret, key, or cert", fix
        )

    fmt = raw.objectFormat
    if fmt and fmt.lower() not in ("pem", "pfx"):
        raise fail(
            "objectFormat",
            fmt,
            f"invalid objectFormat: {fmt}, should be PEM or PFX",
            "use objectFormat: pem (default) or pfx, or leave it out",
        )
    # Upstream compares case-sensitively: only lower-case "pfx" is refused on key/cert, and any
    # other spelling is ignored there. Keep that so existing manifests still mount.
    if fmt == "pfx" and otype != "secret":
        raise fail(
            "objectFormat",
            fmt,
            "PFX format only supported for objectType: secret",
            f"to get a certificate's PFX, use objectType: secret with the certificate's name;"
            f" remove objectFormat from this {otype} object",
        )
    out_format = fmt.lower() if otype == "secret" else ""

    enc = raw.objectEncoding
    if enc:
        if otype != "secret":
            raise fail(
                "objectEncoding",
                enc,
                "objectEncoding only supported for objectType: secret",
                f"remove objectEncoding from this {otype} object",
            )
        if enc.lower() not in ("utf-8", "base64", "hex"):
            raise fail(
                "objectEncoding",
                enc,
                f"invalid objectEncoding: {enc}, should be hex, base64 or utf-8",
                "use objectEncoding: utf-8 (default), base64 or hex, or leave it out",
            )

    file_name = raw.objectAlias or raw.objectName
    path_field = "objectAlias" if raw.objectAlias else "objectName"
    problem = _file_name_problem(file_name)
    if problem:
        raise fail(path_field, file_name, problem[0], problem[1])

    if not _OBJECT_NAME.match(raw.objectName):
        raise fail(
            "objectName",
            raw.objectName,
            f"invalid objectName: {raw.objectName}, must be 1-127 characters of 0-9, a-z, A-Z"
            " and -",
            "use the object's name as Key Vault shows it; to choose the file name, set objectAlias",
        )

    history = raw.objectVersionHistory
    if history < 0:
        raise fail(
            "objectVersionHistory",
            str(history),
            f"invalid objectVersionHistory: {history}, must not be negative",
            "use 0 or 1 for one file, or N >= 2 for a folder with the newest N versions",
        )
    if history > MAX_VERSION_HISTORY:
        raise fail(
            "objectVersionHistory",
            str(history),
            f"invalid objectVersionHistory: {history}, must be at most {MAX_VERSION_HISTORY}",
            f"use a number from 2 to {MAX_VERSION_HISTORY} for a folder with the newest N versions",
        )

    version = raw.objectVersion
    if version.lower() == "latest" and history >= 2:
        version = "latest"
    elif version and not _VERSION.match(version):
        fix = "leave objectVersion out for the latest version, or give a 32-character hex id"
        if version.lower() == "latest":
            fix = (
                'leave objectVersion out for the latest version ("latest" only has a meaning'
                " with objectVersionHistory >= 2)"
            )
        raise fail(
            "objectVersion",
            version,
            f"invalid objectVersion: {version}, should be empty or a 32-character hex version id",
            fix,
        )

    mode = 0o644
    perm = raw.filePermission
    if perm:
        if not _OCTAL.match(perm) or int(perm, 8) > 0o777:
            raise fail(
                "filePermission",
                perm,
                f"invalid filePermission: {perm}, should be an octal file mode from 0000 to 0777",
                'write it like filePermission: "0644" or "0440"',
            )
        mode = int(perm, 8)

    return ObjectSpec(
        name=raw.objectName,
        type=otype,
        alias=raw.objectAlias,
        version=version,
        version_history=history,
        format=cast(_Format, out_format),
        encoding=cast(_Encoding, enc.lower()),
        file_mode=mode,
    )


def _file_name_problem(name: str) -> tuple[str, str] | None:
    """Upstream's file name rules plus the driver's path rules; (problem, fix) or None."""
    if not name:
        return ("file name must not be empty", "set objectName (and optionally objectAlias)")
    if name.startswith("/"):
        return (
            "file name must be a relative path",
            "objectAlias is a path inside the mount: remove the leading /",
        )
    parts = name.split("/")
    if ".." in parts:
        return (
            "file name must not contain '..'",
            "objectAlias must stay inside the mount: remove the '..' path component",
        )
    if parts[0].startswith(".."):
        return (
            "file name must not start with '..'",
            "names starting with '..' are reserved for the volume's ..data layout",
        )
    if "\x00" in name:
        return ("file name must not contain a NUL character", "remove it from objectAlias")
    if any(part in ("", ".") for part in parts):
        return (
            "file name must be a clean path",
            "objectAlias must not hold empty components ('a//b'), './' or a trailing '/'",
        )
    if any(len(part.encode("utf-8")) > _MAX_COMPONENT for part in parts):
        return (
            f"file name components must be at most {_MAX_COMPONENT} bytes",
            "shorten objectAlias",
        )
    if len(name.encode("utf-8")) > _MAX_PATH:
        return (f"file name must be at most {_MAX_PATH} bytes", "shorten objectAlias")
    return None


def _check_unique(spec: ObjectSpec, owners: dict[str, ObjectSpec], folders: dict[str, ObjectSpec]) -> None:
    """Refuse a path used twice, or used both as a file (or history folder) and as a parent.

    `owners` maps every path already claimed to its object, `folders` every parent folder of
    those paths to the first object under it (each check costs the path's depth, not the number
    of objects). A history folder claims its whole subtree, so a file under it conflicts too.
    Split `.crt`/`.key` names are not checked here.
    """
    path = spec.file_name
    parts = path.split("/")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    clash: ObjectSpec | None = owners.get(path)
    if clash is None:
        clash = next((owners[p] for p in parents if p in owners), None)
    if clash is None:
        clash = folders.get(path)
    if clash is not None:
        what = "version-history folder" if clash.version_history >= 2 else "file"
        problem = (
            f"file name {path} collides with the {what} {clash.file_name}"
            f" of objectName:{clash.name}"
        )
        msg = (
            f"failed to get objectType:{spec.type}, objectName:{spec.name},"
            f" objectVersion:{spec.version}: {problem}"
        )
        raise ConfigError(
            "objectAlias",
            path,
            problem,
            "each object needs its own file name, and a file or version-history folder cannot"
            " also be a folder of other files: give one of them a different objectAlias",
            message=msg,
        )
    owners[path] = spec
    for parent in parents:
        folders.setdefault(parent, spec)
