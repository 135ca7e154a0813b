"""`objects` YAML → ObjectSpec: shape, upstream's error texts and kvfs's stricter rules."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from kvfs.config.objects import MAX_OBJECTS, MAX_OBJECTS_TEXT, MAX_VERSION_HISTORY, parse_objects
from kvfs.errors import ConfigError

PREFIX = "failed to get objectType:{t}, objectName:{n}, objectVersion:{v}: "
HEX = "0123456789abcdef0123456789ABCDEF"


def objects_yaml(*items: str) -> str:
    """Build the `objects` text the way manifests write it: `array:` of `- |` blocks."""
    lines = ["array:"]
    for item in items:
        body = textwrap.dedent(item).strip("\n")
        lines.append("  - |")
        lines.extend("    " + line for line in body.splitlines())
    return "\n".join(lines) + "\n"


def one(**fields: object) -> str:
    return "\n".join(f"{k}: {v}" for k, v in fields.items())


def parse_one(**fields: object):
    (spec,) = parse_objects(objects_yaml(one(**fields)))
    return spec


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_objects(text)
    return str(info.value)


# --- bounds: the CSI plugin parses a tenant's objects as root, with 200 MiB of memory ----------


def test_objects_over_the_size_limit_are_refused_before_any_yaml_is_read() -> None:
    too_big = objects_yaml(one(objectName="s", objectType="secret")) + "#" * MAX_OBJECTS_TEXT
    text = error_of(too_big)
    assert text.startswith(f"objects: is {len(too_big)} bytes, more than {MAX_OBJECTS_TEXT} (1 MiB)")
    assert "split the objects over several SecretProviderClasses" in text


def test_more_objects_than_the_limit_are_refused_naming_the_count() -> None:
    many = "array: [" + ",".join(f"s{i}" for i in range(MAX_OBJECTS + 1)) + "]"
    assert error_of(many).startswith(f"objects: lists {MAX_OBJECTS + 1} objects, more than {MAX_OBJECTS} (split")


def test_yaml_that_would_compose_into_many_nodes_is_refused_unread() -> None:
    """A megabyte of `[a,a,...]` would be half a million nodes (~170 MiB) if composed."""
    flood = "array: [" + ",".join(["a"] * (MAX_OBJECTS_TEXT // 2 - 16)) + "]"
    assert error_of(flood).startswith(f"objects: is more YAML than {MAX_OBJECTS} objects take (split")
    wide = objects_yaml(one(objectName="s", objectType="secret", **{f"x{i}": i for i in range(1000)}))
    assert error_of(wide).startswith(
        "unmarshal failed for keyVaultObjects at index 0, error: more YAML than an object takes (an object is a"
        " mapping of its fields: objectName, objectAlias,"
    )


def test_an_alias_can_only_repeat_an_object_which_is_a_duplicate() -> None:
    aliased = "first: &one |\n  objectName: s\n  objectType: secret\narray: [*one, *one, *one]\n"
    assert "file name s collides with the file s" in error_of(aliased)


# --- shape -----------------------------------------------------------------------------------


def test_basic_parse_trims_and_ignores_unknown_keys() -> None:
    text = objects_yaml(
        """
        objectName: "  db-password "
        objectType: secret
        objectAlias: ' creds/db.txt '
        objectEncoding: BasE64
        somethingElse: ignored
        objectNotAfter: ignored-too
        """,
        f"""
        objectName: tls
        objectType: secret
        objectFormat: PFX
        objectVersion: " {HEX} "
        """,
    )
    a, b = parse_objects(text)
    assert (a.name, a.type, a.alias, a.encoding, a.file_name) == (
        "db-password",
        "secret",
        "creds/db.txt",
        "base64",
        "creds/db.txt",
    )
    assert a.file_mode == 0o644 and a.version == "" and a.version_history == 0
    assert (b.format, b.version, b.pinned, b.object_id) == ("pfx", HEX, True, "secret/tls")


@pytest.mark.parametrize(
    "field",
    ["objectName", "objectAlias", "objectType", "objectVersion", "objectFormat", "objectEncoding",
     "filePermission", "objectVersionHistory"],
)  # fmt: skip
def test_a_field_in_the_wrong_case_is_named_with_the_fix(field: str) -> None:
    """yaml.v2 would ignore `objectname:` (then "file name must not be empty") or `objectalias:`
    (then a file under the wrong name, silently): the typo is named instead."""
    typo = field.lower() if field != field.lower() else field.upper()
    fields = {"objectName": "db", "objectType": "secret", typo: "2" if field == "objectVersionHistory" else "x"}
    msg = error_of(objects_yaml(one(objectName="ok", objectType="secret"), one(**fields)))
    assert msg.startswith("unmarshal failed for keyVaultObjects at index 1, error: yaml: unmarshal errors: line 3:")
    assert f"unknown field {typo} (field names are case-sensitive)" in msg
    assert f"did you mean {field}? write {field}: instead of {typo}:" in msg


def test_empty_array_is_a_valid_empty_mount() -> None:
    assert parse_objects("array:\n") == ()
    assert parse_objects("array: []") == ()
    assert parse_objects("~") == ()


def test_top_level_list_is_upstream_unmarshal_error() -> None:
    msg = error_of("- |\n  objectName: s\n  objectType: secret\n")
    assert msg.startswith("failed to yaml unmarshal objects, error: yaml: unmarshal errors")
    assert "`array`" in msg


def test_mapping_items_instead_of_strings_explain_block_literal() -> None:
    msg = error_of("array:\n  - objectName: s\n    objectType: secret\n")
    assert msg.startswith(
        "failed to yaml unmarshal objects, error: yaml: unmarshal errors: line 2: cannot"
        " unmarshal !!map into string"
    )
    assert "`- |`" in msg


def test_yaml_syntax_error() -> None:
    msg = error_of("array: [unclosed\n")
    assert msg.startswith("failed to yaml unmarshal objects, error: yaml: line ")


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML built without libyaml words syntax errors its own way")
def test_yaml_syntax_errors_are_worded_as_upstreams() -> None:
    """Upstream's messages quote Go's yaml.v2, a port of libyaml; kvfs parses with libyaml too."""
    assert error_of("array:\n  - objectName: a: b\n").startswith(
        "failed to yaml unmarshal objects, error: yaml: line 2: mapping values are not allowed in this context"
    )
    assert error_of(objects_yaml("objectName: a: b")).startswith(
        "unmarshal failed for keyVaultObjects at index 0, error: yaml: line 1: mapping values are not allowed"
        " in this context"
    )


def test_object_that_is_not_a_mapping_names_its_index() -> None:
    text = objects_yaml(one(objectName="a", objectType="secret"), "just-a-string")
    msg = error_of(text)
    assert msg.startswith(
        "unmarshal failed for keyVaultObjects at index 1, error: yaml: unmarshal errors: line 1:"
        " cannot unmarshal !!str `just-a-string` into types.KeyVaultObject"
    )


def test_object_field_that_is_a_list() -> None:
    msg = error_of(objects_yaml("objectName: [a, b]\nobjectType: secret"))
    assert msg.startswith(
        "unmarshal failed for keyVaultObjects at index 0, error: yaml: unmarshal errors"
    )
    assert "cannot unmarshal !!seq into string" in msg


# --- upstream conformance vectors ------------------------------------------------------------


def test_invalid_object_format_conformance() -> None:
    msg = error_of(
        objects_yaml(one(objectName="secret1", objectType="secret", objectFormat="pkcs"))
    )
    assert msg.startswith(
        "failed to get objectType:secret, objectName:secret1, objectVersion:: invalid objectFormat:"
        " pkcs, should be PEM or PFX"
    )


def test_invalid_object_encoding_conformance() -> None:
    msg = error_of(
        objects_yaml(one(objectName="secret1", objectType="secret", objectEncoding="utf-16"))
    )
    assert msg.startswith(
        "failed to get objectType:secret, objectName:secret1, objectVersion:: invalid"
        " objectEncoding: utf-16, should be hex, base64 or utf-8"
    )


def test_pfx_only_for_secret() -> None:
    msg = error_of(objects_yaml(one(objectName="c", objectType="cert", objectFormat="pfx")))
    assert msg.startswith(
        PREFIX.format(t="cert", n="c", v="") + "PFX format only supported for objectType: secret"
    )


def test_pfx_upper_case_on_cert_is_ignored_like_upstream() -> None:
    # Upstream's check is case-sensitive; "PFX" on a cert passes and has no effect.
    assert parse_one(objectName="c", objectType="cert", objectFormat="PFX").format == ""
    assert parse_one(objectName="s", objectType="secret", objectFormat="PFX").format == "pfx"
    assert parse_one(objectName="s", objectType="secret", objectFormat="Pem").format == "pem"


def test_encoding_only_for_secret() -> None:
    msg = error_of(objects_yaml(one(objectName="c", objectType="cert", objectEncoding="base64")))
    assert msg.startswith(
        PREFIX.format(t="cert", n="c", v="")
        + "objectEncoding only supported for objectType: secret"
    )
    assert parse_one(objectName="s", objectType="secret", objectEncoding="HEX").encoding == "hex"
    assert (
        parse_one(objectName="s", objectType="secret", objectEncoding="Utf-8").encoding == "utf-8"
    )


@pytest.mark.parametrize(
    ("alias", "problem"),
    [
        ("/secret1", "file name must be a relative path"),
        ("secret1/..", "file name must not contain '..'"),
        ("../secret1", "file name must not contain '..'"),
        ("a/../b", "file name must not contain '..'"),
    ],
)
def test_file_name_conformance(alias: str, problem: str) -> None:
    msg = error_of(
        objects_yaml(one(objectName="secret1", objectType="secret", objectAlias=f"'{alias}'"))
    )
    assert msg.startswith(PREFIX.format(t="secret", n="secret1", v="") + problem)


def test_empty_file_name() -> None:
    msg = error_of(objects_yaml("objectType: secret\nobjectName: ''"))
    assert msg.startswith(PREFIX.format(t="secret", n="", v="") + "file name must not be empty")


@pytest.mark.parametrize(
    ("perm", "mode"),
    [("'0600'", 0o600), ("0600", 0o600), ("'0440'", 0o440), ("755", 0o755), ("0", 0)],
)
def test_file_permission_string_or_yaml_int_is_octal(perm: str, mode: int) -> None:
    assert parse_one(objectName="s", objectType="secret", filePermission=perm).file_mode == mode


def test_file_permission_default() -> None:
    assert parse_one(objectName="s", objectType="secret").file_mode == 0o644
    assert parse_one(objectName="s", objectType="secret", filePermission="''").file_mode == 0o644


@pytest.mark.parametrize("perm", ["0900", "abc", "'7777'", "1000", "-1", "0o644", "6.5"])
def test_bad_file_permission_is_refused_not_mode_zero(perm: str) -> None:
    msg = error_of(objects_yaml(one(objectName="s", objectType="secret", filePermission=perm)))
    assert msg.startswith(PREFIX.format(t="secret", n="s", v="") + "invalid filePermission: ")
    assert "0644" in msg  # the fix shows the expected form


def test_object_ids_and_history_flags() -> None:
    text = objects_yaml(
        one(objectName="single-version", objectType="secret", objectVersionHistory=1),
        one(objectName="multiple-versions", objectType="secret", objectVersionHistory=5),
        one(objectName="zero", objectType="key", objectVersionHistory=0),
    )
    single, multi, zero = parse_objects(text)
    assert single.object_id == "secret/single-version" and single.version_history == 1
    assert multi.version_history == 5 and multi.file_name == "multiple-versions"
    assert zero.version_history == 0


# --- kvfs improvements -----------------------------------------------------------------------


def test_double_dot_inside_a_component_is_allowed() -> None:
    assert parse_one(objectName="s", objectType="secret", objectAlias="a..b").file_name == "a..b"
    assert (
        parse_one(objectName="s", objectType="secret", objectAlias="dir/x..").file_name == "dir/x.."
    )


@pytest.mark.parametrize(
    ("alias", "problem"),
    [
        ("..data", "must not start with '..'"),
        ("..foo/bar", "must not start with '..'"),
        ("a//b", "must be a clean path"),
        ("./a", "must be a clean path"),
        ("a/", "must be a clean path"),
        ("a/./b", "must be a clean path"),
        ("x" * 256, "at most 255 bytes"),
        ("é" * 128, "at most 255 bytes"),  # 256 bytes in UTF-8
    ],
)
def test_alias_path_rules(alias: str, problem: str) -> None:
    msg = error_of(objects_yaml(one(objectName="s", objectType="secret", objectAlias=f"'{alias}'")))
    assert msg.startswith(PREFIX.format(t="secret", n="s", v=""))
    assert problem in msg


def test_alias_limits_accept_the_maximum() -> None:
    alias = "/".join(["x" * 255] * 3)
    assert parse_one(objectName="s", objectType="secret", objectAlias=alias).alias == alias


def test_total_path_length_limit() -> None:
    alias = "/".join(["x" * 200] * 21)  # 4220 bytes
    assert "at most 4096 bytes" in error_of(
        objects_yaml(one(objectName="s", objectType="secret", objectAlias=alias))
    )


@pytest.mark.parametrize("otype", ["Secret", "CERT", "certificate", "", "secrets"])
def test_object_type_is_validated_before_any_fetch(otype: str) -> None:
    msg = error_of(objects_yaml(one(objectName="s", objectType=f"'{otype}'")))
    assert msg.startswith(
        PREFIX.format(t=otype, n="s", v="")
        + "Invalid vaultObjectTypes. Should be secret, key, or cert"
    )
    if otype.lower() in ("secret", "cert"):
        assert f"write objectType: {otype.lower()}" in msg


def test_object_type_checked_for_later_objects_too() -> None:
    text = objects_yaml(
        one(objectName="ok", objectType="secret"), one(objectName="bad", objectType="Key")
    )
    assert "objectName:bad" in error_of(text)


@pytest.mark.parametrize("name", ["x" * 128, "bad_name", "has space", "dot.name", "ünï"])
def test_object_name_rules(name: str) -> None:
    msg = error_of(objects_yaml(one(objectName=f"'{name}'", objectType="secret", objectAlias="f")))
    assert "invalid objectName" in msg and "1-127" in msg


def test_object_name_limits_accept_the_maximum() -> None:
    assert parse_one(objectName="a" * 127, objectType="secret").name == "a" * 127
    assert parse_one(objectName="0-9-Az", objectType="cert").name == "0-9-Az"


@pytest.mark.parametrize("version", ["v1", HEX[:31], HEX + "0", "latest", "zz" * 16])
def test_bad_versions(version: str) -> None:
    msg = error_of(objects_yaml(one(objectName="s", objectType="secret", objectVersion=version)))
    assert msg.startswith(
        PREFIX.format(t="secret", n="s", v=version) + f"invalid objectVersion: {version}"
    )


def test_latest_allowed_with_history() -> None:
    spec = parse_one(
        objectName="s", objectType="secret", objectVersion="LATEST", objectVersionHistory=3
    )
    assert spec.version == "latest" and not spec.pinned
    spec = parse_one(objectName="s", objectType="secret", objectVersion=HEX, objectVersionHistory=3)
    assert spec.version == HEX


def test_history_must_be_a_yaml_int() -> None:
    msg = error_of(
        objects_yaml(one(objectName="s", objectType="secret", objectVersionHistory='"5"'))
    )
    assert msg.startswith(
        "unmarshal failed for keyVaultObjects at index 0, error: yaml: unmarshal errors: line 3:"
        " cannot unmarshal !!str `5` into int32"
    )
    for bad in ("2.5", "true", "99999999999"):
        assert "into int32" in error_of(
            objects_yaml(one(objectName="s", objectType="secret", objectVersionHistory=bad))
        )


def test_negative_history_refused() -> None:
    msg = error_of(objects_yaml(one(objectName="s", objectType="secret", objectVersionHistory=-1)))
    assert msg.startswith(
        PREFIX.format(t="secret", n="s", v="") + "invalid objectVersionHistory: -1"
    )


@pytest.mark.parametrize("history", [MAX_VERSION_HISTORY + 1, 2**31 - 1])
def test_history_is_capped(history: int) -> None:
    msg = error_of(objects_yaml(one(objectName="s", objectType="secret", objectVersionHistory=history)))
    assert msg.startswith(PREFIX.format(t="secret", n="s", v="") + f"invalid objectVersionHistory: {history}")
    assert f"at most {MAX_VERSION_HISTORY}" in msg and "\n" not in msg


def test_history_cap_itself_is_accepted() -> None:
    spec = parse_one(objectName="s", objectType="secret", objectVersionHistory=MAX_VERSION_HISTORY)
    assert spec.version_history == MAX_VERSION_HISTORY


@pytest.mark.parametrize(
    ("field", "name", "version"),
    [
        ("objectName", '"a/b"', ""),
        ("objectName", '"../x"', ""),
        ("objectName", "a" * 128, ""),
        ("objectName", '"db?x"', ""),
        ("objectVersion", "db", "latest"),
        ("objectVersion", "db", "zz" * 16),
        ("objectVersion", "db", '"1/2"'),
    ],
)
def test_names_and_versions_are_validated_before_any_request(field: str, name: str, version: str) -> None:
    """The one validation of object names and versions (the Key Vault client only encodes them)."""
    fields = {"objectName": name, "objectType": "secret"}
    if version:
        fields["objectVersion"] = version
    with pytest.raises(ConfigError) as info:
        parse_objects(objects_yaml(one(**fields)))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (dict(objectName="a"), dict(objectName="a")),
        (dict(objectName="a"), dict(objectName="b", objectAlias="a")),
        (dict(objectName="a", objectAlias="d/x"), dict(objectName="b", objectAlias="d/x")),
        (dict(objectName="h", objectVersionHistory=3), dict(objectName="b", objectAlias="h/0")),
        (dict(objectName="b", objectAlias="h/7"), dict(objectName="h", objectVersionHistory=3)),
        (dict(objectName="certs"), dict(objectName="b", objectAlias="certs/tls.pem")),
        (dict(objectName="b", objectAlias="certs/tls.pem"), dict(objectName="certs")),
    ],
)
def test_duplicate_and_overlapping_file_names_refused(first: dict, second: dict) -> None:
    text = objects_yaml(one(objectType="secret", **first), one(objectType="secret", **second))
    msg = error_of(text)
    assert msg.startswith(PREFIX.format(t="secret", n=second["objectName"], v=""))
    assert "collides with" in msg and f"objectName:{first['objectName']}" in msg
    assert "objectAlias" in msg


def test_names_differing_in_case_or_siblings_are_fine() -> None:
    text = objects_yaml(
        one(objectName="s1", objectType="secret", objectAlias="secret1/0"),
        one(objectName="s2", objectType="secret", objectAlias="SECRET_1/0"),
        one(objectName="s3", objectType="secret", objectAlias="secret1/1"),
        one(objectName="s4", objectType="secret", objectAlias="secret1x"),
    )
    assert [s.file_name for s in parse_objects(text)] == [
        "secret1/0",
        "SECRET_1/0",
        "secret1/1",
        "secret1x",
    ]
