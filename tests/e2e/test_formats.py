"""Issue 5 end to end: every object type × format × encoding read through a real FUSE mount.

The vault content is built here with `cryptography` (tests/certgen.py) and served by the emulator
over HTTPS. Every expected byte string is derived from the upstream provider's rules (bytes per
type, format and encoding; file names): keys and certificates are serialised with `cryptography`
and concatenated in the ruled order, never captured from kvfs output.

Mounts cost about half a second each, so one module-scoped mount holds every single-file case,
and two more (the `--write-cert-and-key-in-separate-files` flag and the
`writeCertAndKeyInSeparateFiles` parameter) hold the split-file cases. Refused manifests never
mount: they run as parallel `kvfs mount` processes against an emulator of their own.
"""

from __future__ import annotations

import base64
import errno
import itertools
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

import certgen
from e2e.conftest import Mount, Mounter, errno_of, is_mounted, needs_fuse, read, spc_manifest, workload_parameters
from kvfs.emulator.server import Emulator, EmulatorThread

pytestmark = [needs_fuse, pytest.mark.mount]

VAULT = "demo"
PERMUTATIONS = list(itertools.permutations(range(3)))  # indexes into (leaf, intermediate, root)


def objects_text(*objects: dict[str, Any] | str) -> str:
    """Upstream's `objects` shape; a str item is an object's YAML written by hand (unquoted ints)."""
    items = [o if isinstance(o, str) else yaml.safe_dump(o, sort_keys=False) for o in objects]
    return yaml.safe_dump({"array": items}, sort_keys=False)


def perm_name(perm: tuple[int, ...]) -> str:
    return "".join("lir"[i] for i in perm)  # e.g. "ril" = root, intermediate, leaf


def mismatches(mount_path: Path, expected: dict[str, bytes]) -> list[str]:
    """Every path whose bytes differ, so one failing case does not hide the others."""
    wrong = []
    for rel, want in expected.items():
        try:
            got = read(mount_path / rel)
        except OSError as err:
            wrong.append(f"{rel}: {err.strerror}")
            continue
        if got != want:
            wrong.append(f"{rel}: {len(got)} bytes, expected {len(want)}")
    return wrong


# ------------------------------------------------------------------------------------------------
# Vault content (built once per module) and the expected bytes, derived from the rules
# ------------------------------------------------------------------------------------------------


@dataclass
class Content:
    """What was put in the vault, with the material tests need to derive expected bytes."""

    keys: dict[str, certgen.PrivateKey] = field(default_factory=dict)  # vault key name → key
    rsa_chain: certgen.Chain | None = None
    ec_chain: certgen.Chain | None = None
    ss_rsa_key: certgen.PrivateKey | None = None
    ss_rsa: Any = None  # self-signed RSA certificate
    ss_ec_key: certgen.PrivateKey | None = None
    ss_ec: Any = None
    pfx_bytes: dict[str, bytes] = field(default_factory=dict)  # certificate name → PFX imported verbatim
    pem_text: bytes = b""  # the verbatim application/x-pem-file value of "pem-odd"
    plain: dict[str, str] = field(default_factory=dict)  # plain secret name → value
    binary: bytes = b""
    versions: dict[str, str] = field(default_factory=dict)
    exp: int = 2_000_000_000


def chain_pem(chain: certgen.Chain) -> bytes:
    """PFX → PEM as upstream writes it: the PKCS#8 key first, then leaf → intermediates → root."""
    return certgen.key_pem(chain.leaf_key) + certgen.certs_pem(chain.certs)


def build_content(emu: Emulator) -> Content:
    c = Content()
    # Keys: RSA, RSA-HSM, EC on the three supported curves, EC-HSM.
    c.keys = {
        "k-rsa": certgen.rsa_key(),
        "k-rsa-hsm": certgen.rsa_key(3072),
        "k-ec-p256": certgen.ec_key("P-256"),
        "k-ec-p384": certgen.ec_key("P-384"),
        "k-ec-p521": certgen.ec_key("P-521"),
        "k-ec-hsm": certgen.ec_key("P-521"),
    }
    for name, key in c.keys.items():
        c.versions[name] = emu.import_key(VAULT, name, key, hsm=name.endswith("-hsm"))
    emu.import_key(VAULT, "k-ec-p256k", certgen.ec_key("P-256K"))  # upstream: not supported

    c.rsa_chain = certgen.make_chain(3, key_type="rsa")
    c.ec_chain = certgen.make_chain(3, key_type="ec", curve="P-384")
    for kind, chain in (("rsa", c.rsa_chain), ("ec", c.ec_chain)):
        # Every bag order of a 3-level chain, kept byte for byte (unencrypted bags: order visible).
        for perm in PERMUTATIONS:
            name = f"bag-{kind}-{perm_name(perm)}"
            c.pfx_bytes[name] = certgen.pfx(chain.leaf_key, [chain.certs[i] for i in perm])
            c.versions[name] = emu.import_certificate(VAULT, name, pfx=c.pfx_bytes[name], keep_value=True)
        # Incomplete chains (no intermediate): upstream keeps the original order.
        for order in ("rl", "lr"):
            name = f"gap-{kind}-{order}"
            certs = [chain.root, chain.leaf] if order == "rl" else [chain.leaf, chain.root]
            c.pfx_bytes[name] = certgen.pfx(chain.leaf_key, certs)
            emu.import_certificate(VAULT, name, pfx=c.pfx_bytes[name], keep_value=True)
    # As the emulator (like Key Vault) re-serialises an import: leaf first, then the rest.
    rc = c.rsa_chain
    emu.import_certificate(VAULT, "kv-rsa", pfx=certgen.pfx(rc.leaf_key, [rc.root, rc.leaf, rc.certs[1]]))
    kv_like = certgen.pfx_openssl(rc.leaf_key, [rc.root, rc.certs[1], rc.leaf])
    if kv_like is not None:  # encrypted bags with an empty password, as Key Vault writes them
        c.pfx_bytes["enc-rsa"] = kv_like
        emu.import_certificate(VAULT, "enc-rsa", pfx=kv_like, keep_value=True)

    c.ss_rsa_key = certgen.rsa_key()
    c.ss_rsa = certgen.self_signed(c.ss_rsa_key, "ss-rsa")
    c.versions["ss-rsa"] = emu.import_certificate(VAULT, "ss-rsa", pfx=certgen.pfx(c.ss_rsa_key, [c.ss_rsa]))
    c.ss_ec_key = certgen.ec_key("P-256")
    c.ss_ec = certgen.self_signed(c.ss_ec_key, "ss-ec")
    emu.import_certificate(VAULT, "ss-ec", pem=certgen.pem_bundle(c.ss_ec_key, [c.ss_ec]))

    # A PEM certificate whose value is not in chain order and carries text between blocks.
    ec = c.ec_chain
    c.pem_text = (
        b"Bag Attributes\n    friendlyName: pem-odd\n"
        + certgen.key_pem(ec.leaf_key)
        + b"\n"
        + certgen.cert_pem(ec.root)
        + b"subject=CN = leaf\n"
        + certgen.cert_pem(ec.leaf)
        + certgen.cert_pem(ec.certs[1])
    )
    emu.import_certificate(VAULT, "pem-odd", pem=c.pem_text, keep_value=True)

    # Two versions of one certificate, for objectVersionHistory (each version rendered alone).
    for chain in (c.ec_chain, c.rsa_chain):
        emu.import_certificate(VAULT, "hist-cert", pfx=certgen.pfx(chain.leaf_key, chain.certs[::-1]), keep_value=True)
    # A certificate-backed secret whose content type is neither PFX nor PEM.
    emu.import_certificate(VAULT, "odd-type", pfx=certgen.pfx(c.ss_rsa_key, [c.ss_rsa]))
    emu.store.update(VAULT, "secret", "odd-type", None, content_type="application/octet-stream")
    # PEM text in a plain secret (no `kid`): just a value, whatever its content type.
    emu.set_secret(VAULT, "p-pem-plain", certgen.pem_bundle(c.ss_ec_key, [c.ss_ec]).decode(),
                   content_type=certgen.CONTENT_TYPE_PEM)

    c.binary = bytes(range(256)) + os.urandom(64)
    c.plain = {
        "p-text": "héllo ✓\nsecond line\n",
        "p-b64": base64.b64encode(c.binary).decode(),
        "p-hex": c.binary.hex().upper(),
        "p-hex-lower": c.binary.hex(),
        "p-bad-b64": "this is not base64!",
        "p-bad-hex": "0g",
    }
    for name, value in c.plain.items():
        emu.set_secret(VAULT, name, value)
    return c


def secret(name: str, **extra: Any) -> dict[str, Any]:
    return {"objectName": name, "objectType": "secret", **extra}


@dataclass
class Layout:
    """Objects of one mount and the bytes each file must hold."""

    objects: list[dict[str, Any] | str] = field(default_factory=list)
    expected: dict[str, dict[str, bytes]] = field(default_factory=dict)  # category → path → bytes

    def add(self, category: str, obj: dict[str, Any], want: bytes) -> None:
        self.objects.append(obj)
        self.expected.setdefault(category, {})[obj.get("objectAlias") or obj["objectName"]] = want


def main_layout(c: Content) -> Layout:
    assert c.rsa_chain is not None and c.ec_chain is not None
    lay = Layout()
    for name, key in c.keys.items():
        lay.add("key", {"objectName": name, "objectType": "key"}, certgen.public_key_pem(key))
    # objectType key on a certificate's name: that certificate's public key.
    lay.add("key", {"objectName": "bag-ec-lir", "objectType": "key", "objectAlias": "key-of-cert"},
            certgen.public_key_pem(c.ec_chain.leaf_key))
    lay.add("key", {"objectName": "ss-rsa", "objectType": "key", "objectAlias": "key-of-ss"},
            certgen.public_key_pem(c.ss_rsa_key))

    # objectType cert: the leaf only, one CERTIFICATE block.
    lay.add("cert", {"objectName": "bag-rsa-ril", "objectType": "cert", "objectAlias": "cert-rsa"},
            certgen.cert_pem(c.rsa_chain.leaf))
    lay.add("cert", {"objectName": "pem-odd", "objectType": "cert", "objectAlias": "cert-pem"},
            certgen.cert_pem(c.ec_chain.leaf))
    lay.add("cert", {"objectName": "ss-ec", "objectType": "cert", "objectAlias": "cert-ss"}, certgen.cert_pem(c.ss_ec))
    # Upstream refuses only lower-case "pfx" on a cert; any other spelling is ignored there.
    lay.add("cert", {"objectName": "ss-ec", "objectType": "cert", "objectFormat": "PFX", "objectAlias": "cert-PFX"},
            certgen.cert_pem(c.ss_ec))

    # Certificate-backed secrets, application/x-pkcs12 → PEM, chain-ordered for every bag order.
    for kind, chain in (("rsa", c.rsa_chain), ("ec", c.ec_chain)):
        for perm in PERMUTATIONS:
            lay.add("pfx-to-pem", secret(f"bag-{kind}-{perm_name(perm)}"), chain_pem(chain))
        # Incomplete chain: the certificates stay in the PFX's order.
        lay.add("pfx-to-pem", secret(f"gap-{kind}-rl"),
                certgen.key_pem(chain.leaf_key) + certgen.certs_pem([chain.root, chain.leaf]))
        lay.add("pfx-to-pem", secret(f"gap-{kind}-lr"),
                certgen.key_pem(chain.leaf_key) + certgen.certs_pem([chain.leaf, chain.root]))
    lay.add("pfx-to-pem", secret("kv-rsa"), chain_pem(c.rsa_chain))
    lay.add("pfx-to-pem", secret("bag-rsa-rli", objectFormat="PEM", objectAlias="explicit-pem"),
            chain_pem(c.rsa_chain))
    if "enc-rsa" in c.pfx_bytes:
        lay.add("pfx-to-pem", secret("enc-rsa"), chain_pem(c.rsa_chain))
    lay.add("pfx-to-pem", secret("ss-rsa"), certgen.pem_bundle(c.ss_rsa_key, [c.ss_rsa]))
    # application/x-pem-file: the value verbatim (no reordering; objectFormat pfx does not apply).
    lay.add("pem-verbatim", secret("pem-odd"), c.pem_text)
    lay.add("pem-verbatim", secret("pem-odd", objectFormat="pfx", objectAlias="pem-odd-as-pfx"), c.pem_text)
    lay.add("pem-verbatim", secret("ss-ec"), certgen.pem_bundle(c.ss_ec_key, [c.ss_ec]))
    # No `kid`: a plain secret, so neither PFX nor chain rules apply, even with objectFormat pfx.
    lay.add("pem-verbatim", secret("p-pem-plain", objectFormat="pfx"), certgen.pem_bundle(c.ss_ec_key, [c.ss_ec]))

    # objectVersionHistory on a certificate-backed secret: each version converted on its own.
    lay.objects.append(secret("hist-cert", objectVersionHistory=2))
    lay.expected["history"] = {"hist-cert/0": chain_pem(c.rsa_chain), "hist-cert/1": chain_pem(c.ec_chain)}

    # objectFormat pfx: the base64 PFX text; + objectEncoding base64: the binary PFX.
    for name in ("bag-rsa-irl", "bag-ec-ril", "gap-ec-rl"):
        text = base64.b64encode(c.pfx_bytes[name])
        lay.add("pfx", secret(name, objectFormat="pfx", objectAlias=f"{name}.b64"), text)
        lay.add("pfx", secret(name, objectFormat="PFX", objectEncoding="base64", objectAlias=f"{name}.pfx"),
                c.pfx_bytes[name])

    # Plain secrets and objectEncoding (utf-8 as is; base64 and hex decoded).
    text = c.plain["p-text"].encode()
    lay.add("encoding", secret("p-text"), text)
    lay.add("encoding", secret("p-text", objectEncoding="utf-8", objectAlias="p-text-utf8"), text)
    lay.add("encoding", secret("p-text", objectEncoding="UTF-8", objectAlias="p-text-UTF8"), text)
    lay.add("encoding", secret("p-b64", objectEncoding="base64"), c.binary)
    lay.add("encoding", secret("p-b64", objectAlias="p-b64-as-text"), c.plain["p-b64"].encode())
    lay.add("encoding", secret("p-hex", objectEncoding="hex"), c.binary)
    lay.add("encoding", secret("p-hex-lower", objectEncoding="HEX"), c.binary)
    lay.objects += [
        secret("p-bad-b64", objectEncoding="base64"),
        secret("p-bad-hex", objectEncoding="hex"),
        secret("odd-type"),
        {"objectName": "k-ec-p256k", "objectType": "key"},
        secret("pem-odd", objectFormat="pfx", objectEncoding="base64", objectAlias="pem-odd-pfx-bin"),
        secret("xattr-plain"),
        {"objectName": "bag-ec-lir", "objectType": "key", "objectAlias": "xattr-key"},
    ]

    # Aliases with sub-folders and file modes.
    lay.add("alias", secret("p-text", objectAlias="a/b/c.pem", filePermission="0600"), text)
    lay.add("alias", secret("p-text", objectAlias="a/b/d.pem", filePermission="0440"), text)
    lay.add("alias", secret("p-text", objectAlias="a/x", filePermission="0755"), text)
    lay.add("alias", secret("p-text", objectAlias="a/default"), text)
    lay.add("alias", secret("p-text", objectAlias="a/v1..v2"), text)  # ".." inside a name is fine (#10)
    # An unquoted YAML octal, as users write it: yaml.v2 hands the text "0750" to the provider.
    lay.objects.append("objectName: p-text\nobjectType: secret\nobjectAlias: a/unquoted\nfilePermission: 0750\n")
    lay.expected["alias"]["a/unquoted"] = text
    return lay


MODES = {"a/b/c.pem": 0o600, "a/b/d.pem": 0o440, "a/x": 0o755, "a/default": 0o644, "a/unquoted": 0o750,
         "p-text": 0o644, "k-rsa": 0o644, "cert-ss": 0o644, "ss-ec": 0o644}


@dataclass
class World:
    emu: Emulator
    content: Content
    mount: Mount
    layout: Layout


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("formats")
    with EmulatorThread(base / "emulator") as emu:
        content = build_content(emu)
        xa = emu.store.set_secret(VAULT, "xattr-plain", "v", content_type="text/plain", exp=content.exp)
        content.versions["xattr-plain"] = xa.version
        layout = main_layout(content)
        mounter = Mounter(emu, base)
        try:
            mount = mounter.start(workload_parameters(emu) | {"objects": objects_text(*layout.objects)})
            yield World(emu, content, mount, layout)
        finally:
            mounter.close()


# ------------------------------------------------------------------------------------------------
# One mount, every single-file case
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "category", ["key", "cert", "pfx-to-pem", "pem-verbatim", "pfx", "encoding", "alias", "history"]
)
def test_exact_bytes(world: World, category: str) -> None:
    expected = world.layout.expected[category]
    assert expected, "the layout defines cases for every category"
    assert mismatches(world.mount.path, expected) == []
    for rel, want in expected.items():
        assert os.stat(world.mount.path / rel).st_size == len(want)


def test_key_types_are_the_ones_claimed(world: World) -> None:
    """Guard the fixture: the HSM keys really are served as RSA-HSM / EC-HSM JWKs."""
    kty = {name: world.emu.store.get(VAULT, "key", name).kty for name in world.content.keys}  # type: ignore[attr-defined]
    assert kty == {"k-rsa": "RSA", "k-rsa-hsm": "RSA-HSM", "k-ec-p256": "EC", "k-ec-p384": "EC",
                   "k-ec-p521": "EC", "k-ec-hsm": "EC-HSM"}


def test_pem_output_shape_is_go_like(world: World) -> None:
    """As Go's encoding/pem writes: 64-column base64 lines, LF endings, PKCS#8 keys only, no blank lines."""
    data = read(world.mount.path / "bag-ec-ril")
    assert data.count(b"-----BEGIN PRIVATE KEY-----") == 1 and data.count(b"BEGIN CERTIFICATE") == 3
    assert b"EC PRIVATE KEY" not in data and b"\r" not in data and b"\n\n" not in data
    body = [line for line in data.splitlines() if not line.startswith(b"-----")]
    assert all(len(line) <= 64 for line in body) and any(len(line) == 64 for line in body)


def test_incomplete_chain_is_logged_once_per_object(world: World) -> None:
    read(world.mount.path / "gap-rsa-rl")
    log = world.mount.log()
    assert "certificate chain is not complete due to missing intermediate" in log
    assert "secret/gap-rsa-rl" in log


def test_binary_pfx_loads_with_cryptography(world: World) -> None:
    chain = world.content.ec_chain
    assert chain is not None
    loaded = pkcs12.load_pkcs12(read(world.mount.path / "bag-ec-ril.pfx"), None)
    assert loaded.key is not None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert loaded.key.public_key().public_bytes(serialization.Encoding.DER, spki) == \
        chain.leaf_key.public_key().public_bytes(serialization.Encoding.DER, spki)
    got = {c.certificate for c in loaded.additional_certs} | ({loaded.cert.certificate} if loaded.cert else set())
    assert got == set(chain.certs)


def test_bad_encodings_fail_that_file_only(world: World) -> None:
    root = world.mount.path
    assert errno_of(root / "p-bad-b64") == errno.EIO
    assert errno_of(root / "p-bad-hex") == errno.EIO
    # Upstream #1945: a PEM certificate read with pfx + base64 is not base64.
    assert errno_of(root / "pem-odd-pfx-bin") == errno.EIO
    assert errno_of(root / "odd-type") == errno.EIO
    assert errno_of(root / "k-ec-p256k") == errno.EIO
    assert read(root / "p-b64") == world.content.binary  # the others still read
    assert read(root / "p-text") == world.content.plain["p-text"].encode()
    log = world.mount.log()
    assert "illegal base64 data at input byte 4" in log  # "this is not base64!": the space
    assert "this is not base64" not in log  # the value itself is never logged
    assert "failed to get certificate. unknown content type 'application/octet-stream'" in log
    assert "failed to get objectType:key, objectName:k-ec-p256k, objectVersion:: curve P-256K is not supported" in log


@pytest.mark.parametrize(("rel", "mode"), sorted(MODES.items()))
def test_file_permission_is_st_mode(world: World, rel: str, mode: int) -> None:
    st = os.stat(world.mount.path / rel)
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == mode


def test_alias_folders_and_data_view(world: World) -> None:
    root = world.mount.path
    assert sorted(os.listdir(root / "a")) == ["b", "default", "unquoted", "v1..v2", "x"]
    assert sorted(os.listdir(root / "a" / "b")) == ["c.pem", "d.pem"]
    assert stat.S_ISDIR(os.stat(root / "a" / "b").st_mode)
    for rel in ["a/b/c.pem", "k-rsa", "bag-rsa-lri", "p-hex", "bag-ec-ril.pfx"]:
        assert read(root / "..data" / rel) == read(root / rel)
    assert stat.S_IMODE(os.stat(root / "..data" / "a/b/c.pem").st_mode) == 0o600
    assert set(os.listdir(root)) == set(os.listdir(root / "..data")) | {"..data"}


def test_extended_attributes_match_the_vault(world: World) -> None:
    emu, path = world.emu, world.mount.path / "xattr-plain"
    stored = emu.store.get(VAULT, "secret", "xattr-plain")
    vault = emu.store.vault(VAULT)
    version = world.content.versions["xattr-plain"]
    assert read(path) == b"v"
    names = set(os.listxattr(path))
    assert {"user.kvfs.id", "user.kvfs.version", "user.kvfs.content_type", "user.kvfs.updated",
            "user.kvfs.expires"} <= names
    assert os.getxattr(path, "user.kvfs.id").decode() == vault.object_id("secret", "xattr-plain", version)
    assert os.getxattr(path, "user.kvfs.version").decode() == version
    assert os.getxattr(path, "user.kvfs.content_type") == b"text/plain"
    assert os.getxattr(path, "user.kvfs.updated").decode() == str(stored.attributes.updated)  # type: ignore[attr-defined]
    assert os.getxattr(path, "user.kvfs.expires").decode() == str(world.content.exp)
    assert int(os.stat(path).st_mtime) == stored.attributes.updated  # type: ignore[attr-defined]
    with pytest.raises(OSError) as err:
        os.getxattr(path, "user.kvfs.nope")
    assert err.value.errno == errno.ENODATA


def test_extended_attributes_of_a_key_and_a_secret_without_expiry(world: World) -> None:
    emu, root = world.emu, world.mount.path
    version = world.content.versions["bag-ec-lir"]
    key_path = root / "xattr-key"
    assert os.getxattr(key_path, "user.kvfs.id").decode() == emu.store.vault(VAULT).object_id("key", "bag-ec-lir", version)
    assert os.getxattr(key_path, "user.kvfs.version").decode() == version
    cert_backed = root / "bag-rsa-lir"
    read(cert_backed)
    assert os.getxattr(cert_backed, "user.kvfs.content_type") == certgen.CONTENT_TYPE_PKCS12.encode()
    assert os.getxattr(cert_backed, "user.kvfs.object") == b"secret/bag-rsa-lir"
    plain = root / "p-text"
    read(plain)
    assert "user.kvfs.expires" not in os.listxattr(plain)
    with pytest.raises(OSError) as err:
        os.getxattr(plain, "user.kvfs.expires")
    assert err.value.errno == errno.ENODATA


def test_no_split_files_without_the_option(world: World) -> None:
    assert not os.path.exists(world.mount.path / "bag-rsa-lir.crt")
    assert not os.path.exists(world.mount.path / "bag-rsa-lir.key")


# ------------------------------------------------------------------------------------------------
# Split .crt / .key files, by flag and by parameter
# ------------------------------------------------------------------------------------------------


def split_layout(c: Content) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    assert c.rsa_chain is not None and c.ec_chain is not None
    rc, ec = c.rsa_chain, c.ec_chain
    rsa_key, ec_key = certgen.key_pem(rc.leaf_key), certgen.key_pem(ec.leaf_key)
    objects = [
        secret("bag-rsa-ril"),
        secret("bag-rsa-ril", objectAlias="tls/server.pem", filePermission="0640"),
        secret("pem-odd"),
        secret("bag-rsa-irl", objectFormat="pfx"),
        secret("bag-ec-lri", objectFormat="pfx", objectEncoding="base64", objectAlias="bin.pfx"),
        secret("gap-ec-rl"),
        secret("p-text"),
        secret("p-pem-plain"),
        {"objectName": "bag-rsa-ril", "objectType": "cert", "objectAlias": "only-cert"},
        {"objectName": "bag-rsa-ril", "objectType": "key", "objectAlias": "only-key"},
    ]
    ec_pem_order = [ec.root, ec.leaf, ec.certs[1]]  # the order of the blocks in pem-odd
    expected = {
        "bag-rsa-ril": chain_pem(rc),
        "bag-rsa-ril.crt": certgen.certs_pem(rc.certs),
        "bag-rsa-ril.key": rsa_key,
        "tls/server.pem": chain_pem(rc),
        "tls/server.pem.crt": certgen.certs_pem(rc.certs),
        "tls/server.pem.key": rsa_key,
        "pem-odd": c.pem_text,  # the combined file keeps the exact content
        "pem-odd.crt": certgen.certs_pem(ec_pem_order),  # Key Vault's order, text dropped
        "pem-odd.key": ec_key,
        # objectFormat pfx: upstream writes empty .crt/.key (#1277); kvfs writes the PEM.
        "bag-rsa-irl": base64.b64encode(c.pfx_bytes["bag-rsa-irl"]),
        "bag-rsa-irl.crt": certgen.certs_pem(rc.certs),
        "bag-rsa-irl.key": rsa_key,
        "bin.pfx": c.pfx_bytes["bag-ec-lri"],
        "bin.pfx.crt": certgen.certs_pem(ec.certs),
        "bin.pfx.key": ec_key,
        "gap-ec-rl": ec_key + certgen.certs_pem([ec.root, ec.leaf]),
        "gap-ec-rl.crt": certgen.certs_pem([ec.root, ec.leaf]),
        "gap-ec-rl.key": ec_key,
        "p-text": c.plain["p-text"].encode(),
        "only-cert": certgen.cert_pem(rc.leaf),
        "only-key": certgen.public_key_pem(rc.leaf_key),
    }
    return objects, expected


@pytest.fixture(scope="module", params=["flag", "parameter"])
def split_mount(request: pytest.FixtureRequest, world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mount, dict[str, bytes]]]:
    objects, expected = split_layout(world.content)
    params = workload_parameters(world.emu) | {"objects": objects_text(*objects)}
    args: list[str] = []
    if request.param == "flag":
        args.append("--write-cert-and-key-in-separate-files")
    else:
        params["writeCertAndKeyInSeparateFiles"] = "true"
    mounter = Mounter(world.emu, tmp_path_factory.mktemp(f"split-{request.param}"))
    try:
        yield mounter.start(params, *args), expected
    finally:
        mounter.close()


def test_split_files_exact_bytes(split_mount: tuple[Mount, dict[str, bytes]]) -> None:
    mount, expected = split_mount
    assert mismatches(mount.path, expected) == []
    assert stat.S_IMODE(os.stat(mount.path / "tls/server.pem.crt").st_mode) == 0o640
    assert read(mount.path / "..data" / "bag-rsa-ril.key") == expected["bag-rsa-ril.key"]


def test_split_files_only_for_certificate_backed_secrets(split_mount: tuple[Mount, dict[str, bytes]]) -> None:
    mount, _ = split_mount
    read(mount.path / "p-pem-plain")
    for name in ("p-text.crt", "p-text.key", "p-pem-plain.crt", "p-pem-plain.key"):
        assert errno_of(mount.path / name) == errno.ENOENT
        assert name not in os.listdir(mount.path), "a known plain secret lists no companions"
    for name in ("only-cert.crt", "only-cert.key", "only-key.crt", "only-key.key"):
        assert not os.path.exists(mount.path / name)
    assert read(mount.path / "p-text") == b"h\xc3\xa9llo \xe2\x9c\x93\nsecond line\n"


# ------------------------------------------------------------------------------------------------
# Refused manifests: exit 2 with the message, before any network call
# ------------------------------------------------------------------------------------------------

REFUSALS: dict[str, tuple[list[dict[str, Any]], str]] = {
    "duplicate-name": (
        [secret("one", objectAlias="same"), secret("two", objectAlias="same")],
        "failed to get objectType:secret, objectName:two, objectVersion:: file name same collides"
        " with the file same of objectName:one",
    ),
    "permission-0900": ([secret("s", filePermission="0900")], "invalid filePermission: 0900"),
    "permission-abc": ([secret("s", filePermission="abc")], "invalid filePermission: abc"),
    "permission-7777": ([secret("s", filePermission="7777")], "invalid filePermission: 7777"),
    "absolute-alias": (
        [secret("s", objectAlias="/etc/passwd")],
        "failed to get objectType:secret, objectName:s, objectVersion:: file name must be a relative path",
    ),
    "dotdot-component": (
        [secret("s", objectAlias="a/../../b")],
        "failed to get objectType:secret, objectName:s, objectVersion:: file name must not contain '..'",
    ),
    "pfx-on-cert": (
        [{"objectName": "c", "objectType": "cert", "objectFormat": "pfx"}],
        "failed to get objectType:cert, objectName:c, objectVersion:: PFX format only supported for"
        " objectType: secret",
    ),
    "encoding-on-key": (
        [{"objectName": "k", "objectType": "key", "objectEncoding": "base64"}],
        "failed to get objectType:key, objectName:k, objectVersion:: objectEncoding only supported for"
        " objectType: secret",
    ),
    "bad-type": (
        [{"objectName": "s", "objectType": "certificate"}],
        "failed to get objectType:certificate, objectName:s, objectVersion:: Invalid vaultObjectTypes."
        " Should be secret, key, or cert",
    ),
}


@dataclass
class Refusals:
    results: dict[str, subprocess.CompletedProcess[str]]
    mountpoints: dict[str, Path]
    requests: int


@pytest.fixture(scope="module")
def refusals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Refusals]:
    base = tmp_path_factory.mktemp("refusals")
    with EmulatorThread(base / "emulator") as emu:
        env = dict(os.environ, SSL_CERT_FILE=str(emu.ca_file), AZURE_FEDERATED_TOKEN_FILE=str(emu.sa_token_file))
        mountpoints: dict[str, Path] = {}

        def run(case: str) -> subprocess.CompletedProcess[str]:
            params = workload_parameters(emu) | {"objects": objects_text(*REFUSALS[case][0])}
            spc = base / f"{case}.yaml"
            spc.write_text(spc_manifest(params))
            mountpoints[case] = base / case
            mountpoints[case].mkdir()
            return subprocess.run(
                [sys.executable, "-m", "kvfs", "mount", "--spc", str(spc), str(mountpoints[case])],
                capture_output=True, text=True, timeout=60, env=env,
            )

        emu.reset_counts()
        with ThreadPoolExecutor(len(REFUSALS)) as pool:
            results = dict(zip(REFUSALS, pool.map(run, REFUSALS), strict=True))
        yield Refusals(results, mountpoints, emu.count())


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_at_mount_with_the_message(refusals: Refusals, case: str) -> None:
    result = refusals.results[case]
    assert result.returncode == 2, result.stderr
    assert REFUSALS[case][1] in result.stderr
    assert "Traceback" not in result.stderr
    assert not is_mounted(refusals.mountpoints[case])


def test_refusals_made_no_network_call(refusals: Refusals) -> None:
    assert len(refusals.results) == len(REFUSALS)
    assert refusals.requests == 0
