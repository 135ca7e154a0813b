"""azure-keyvault-keys / -certificates (and the certificate's backing secret) against the emulator."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.identity import ClientSecretCredential
from azure.keyvault.certificates import CertificateClient, CertificateContentType, CertificatePolicy
from azure.keyvault.keys import JsonWebKey, KeyClient, KeyType
from azure.keyvault.secrets import SecretClient
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from kvfs.emulator import pki
from kvfs.emulator.server import Emulator, EmulatorThread

SEED = {
    "vaults": {
        "demo": {
            "keys": [{"name": "seed-ec", "kty": "EC-HSM", "curve": "P-384"}],
            "certificates": [
                {"name": "seed-pem", "subject": "CN=seed", "format": "pem", "chain": True, "kty": "EC"},
                {"name": "seed-pfx", "subject": "CN=pfx", "sans": ["pfx.example"], "format": "pfx"},
            ],
        }
    }
}


@pytest.fixture(scope="module")
def emu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Emulator]:
    with EmulatorThread(tmp_path_factory.mktemp("emu"), seed=SEED) as emu:
        yield emu


@pytest.fixture(autouse=True)
def _trust(emu: Emulator, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(emu.ca_file))


def cred(emu: Emulator) -> ClientSecretCredential:
    app = emu.info["app"]
    return ClientSecretCredential(
        emu.tenant_id, app["client_id"], app["client_secret"], authority=emu.authority_host,
        disable_instance_discovery=True,
    )



def test_create_rsa_key_returns_public_jwk(emu: Emulator) -> None:
    kc = KeyClient(emu.vault_url("demo"), cred(emu))
    key = kc.create_rsa_key("sdk-rsa", size=2048)
    assert key.key_type == KeyType.rsa
    assert key.key.d is None and key.key.p is None  # public part only
    pub = rsa.RSAPublicNumbers(int.from_bytes(key.key.e, "big"), int.from_bytes(key.key.n, "big")).public_key()
    assert pub.key_size == 2048
    assert set(key.key_operations) == {"encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"}
    assert kc.get_key("sdk-rsa").id == key.id


def test_imported_ec_key_round_trips_exactly(emu: Emulator) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    version = emu.import_key("demo", "imported-ec", private, hsm=True)
    key = KeyClient(emu.vault_url("demo"), cred(emu)).get_key("imported-ec")
    assert key.properties.version == version
    assert key.key_type == KeyType.ec_hsm and key.key.crv == "P-256"
    nums = private.public_key().public_numbers()
    assert (int.from_bytes(key.key.x, "big"), int.from_bytes(key.key.y, "big")) == (nums.x, nums.y)
    assert len(key.key.x) == 32


def test_import_key_through_sdk_and_seeded_hsm_key(emu: Emulator) -> None:
    kc = KeyClient(emu.vault_url("demo"), cred(emu))
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    n = private.private_numbers()
    jwk = JsonWebKey(
        kty="RSA", n=n.public_numbers.n.to_bytes(256, "big"), e=(65537).to_bytes(3, "big"),
        d=n.d.to_bytes(256, "big"), p=n.p.to_bytes(128, "big"), q=n.q.to_bytes(128, "big"),
    )
    got = kc.import_key("sdk-import", jwk)
    assert int.from_bytes(got.key.n, "big") == n.public_numbers.n
    seeded = kc.get_key("seed-ec")
    assert seeded.key_type == KeyType.ec_hsm and seeded.key.crv == "P-384" and len(seeded.key.x) == 48


def test_key_not_found_and_disabled(emu: Emulator) -> None:
    kc = KeyClient(emu.vault_url("demo"), cred(emu))
    with pytest.raises(ResourceNotFoundError) as info:
        kc.get_key("no-such-key")
    assert info.value.error.code == "KeyNotFound"
    kc.create_ec_key("to-disable")
    kc.update_key_properties("to-disable", enabled=False)
    with pytest.raises(HttpResponseError) as info2:
        kc.get_key("to-disable")
    assert info2.value.status_code == 403 and info2.value.error.innererror["code"] == "KeyDisabled"


def test_pfx_certificate_and_backing_secret(emu: Emulator) -> None:
    cc = CertificateClient(emu.vault_url("demo"), cred(emu))
    cert = cc.get_certificate("seed-pfx")
    leaf = x509.load_der_x509_certificate(bytes(cert.cer))
    assert leaf.subject.rfc4514_string() == "CN=pfx"
    assert cert.properties.x509_thumbprint == leaf.fingerprint(hashes.SHA1())
    assert cert.policy is not None and cert.policy.content_type == CertificateContentType.pkcs12
    assert cert.key_id and cert.secret_id and cert.properties.version
    assert cert.secret_id.endswith(f"/secrets/seed-pfx/{cert.properties.version}")
    secret = SecretClient(emu.vault_url("demo"), cred(emu)).get_secret("seed-pfx", cert.properties.version)
    assert secret.properties.managed is True and secret.properties.key_id == cert.key_id
    loaded = pkcs12.load_pkcs12(base64.b64decode(secret.value or ""), None)
    assert loaded.cert is not None and loaded.cert.certificate == leaf
    assert loaded.key is not None


def test_pem_certificate_secret_has_pkcs8_key_first_then_chain(emu: Emulator) -> None:
    secret = SecretClient(emu.vault_url("demo"), cred(emu)).get_secret("seed-pem")
    value = secret.value or ""
    assert secret.properties.content_type == "application/x-pem-file"
    assert value.startswith("-----BEGIN PRIVATE KEY-----\n")
    certs = x509.load_pem_x509_certificates(value.encode())
    assert len(certs) == 3 and certs[0].subject.rfc4514_string() == "CN=seed"
    key = serialization.load_pem_private_key(value.encode(), None)
    assert certs[0].public_key() == key.public_key()


def test_import_certificate_pfx_and_pem_via_sdk(emu: Emulator) -> None:
    cc = CertificateClient(emu.vault_url("demo"), cred(emu))
    material = pki.generate_cert_material("CN=imported", kty="RSA", size=2048)
    pfx = pkcs12.serialize_key_and_certificates(
        b"x", material.key, material.leaf, None, serialization.BestAvailableEncryption(b"pw")
    )
    got = cc.import_certificate("imp-pfx", pfx, password="pw")
    assert bytes(got.cer) == material.der
    pem = material.secret_value(pki.PEM).encode()
    got2 = cc.import_certificate(
        "imp-pem", pem, policy=CertificatePolicy.get_default().__class__(
            issuer_name="Unknown", subject="CN=imported", content_type=CertificateContentType.pem
        ),
    )
    assert bytes(got2.cer) == material.der
    secret = SecretClient(emu.vault_url("demo"), cred(emu)).get_secret("imp-pem")
    assert secret.value is not None and secret.value.startswith("-----BEGIN PRIVATE KEY-----")
    # the backing secret of the PFX import holds a password-less PFX
    pfx_secret = SecretClient(emu.vault_url("demo"), cred(emu)).get_secret("imp-pfx")
    assert pkcs12.load_pkcs12(base64.b64decode(pfx_secret.value or ""), None).key is not None


def test_certificate_versions_and_not_found(emu: Emulator) -> None:
    cc = CertificateClient(emu.vault_url("demo"), cred(emu))
    material = pki.generate_cert_material("CN=v", kty="EC")
    pem = material.secret_value(pki.PEM).encode()
    v1 = emu.import_certificate("demo", "multi", pem=pem)
    v2 = emu.import_certificate("demo", "multi", pem=pem)
    versions = {p.version for p in cc.list_properties_of_certificate_versions("multi")}
    assert versions == {v1, v2}
    with pytest.raises(ResourceNotFoundError) as info:
        cc.get_certificate("nope")
    assert info.value.error.code == "CertificateNotFound"
    assert info.value.error.message == "Certificate not found: nope"
