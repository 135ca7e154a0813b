"""How the emulated vault checks bearer tokens: IdentityProvider.verify_access_token."""

from __future__ import annotations

import threading
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from idp import ISSUER, KV, TENANT, make_provider
from kvfs.emulator.identity import IdentityProvider, Principal, TokenRejected


def rejected(provider: IdentityProvider, token: str, audience: str = KV) -> TokenRejected:
    with pytest.raises(TokenRejected) as info:
        provider.verify_access_token(token, audience=audience)
    return info.value


def test_valid_token_names_the_principal(provider: IdentityProvider) -> None:
    app = provider.default_app
    principal = provider.verify_access_token(provider.mint_access_token(app.client_id), audience=KV)
    assert principal == Principal(client_id=app.client_id, object_id=app.object_id, tenant_id=TENANT)


def test_audience_trailing_slash_is_tolerated_both_ways(provider: IdentityProvider) -> None:
    cid = provider.default_app.client_id
    provider.verify_access_token(provider.mint_access_token(cid, KV + "/"), audience=KV)
    provider.verify_access_token(provider.mint_access_token(cid, KV), audience=KV + "/")


def test_wrong_audience_is_akv10022(provider: IdentityProvider) -> None:
    token = provider.mint_access_token(provider.default_app.client_id, "https://management.azure.com/")
    err = rejected(provider, token)
    assert err.akv_code == "AKV10022"
    assert err.message == f"AKV10022: Invalid audience. Expected {KV}, found: https://management.azure.com/."


def test_other_tenant_is_akv10032(provider: IdentityProvider) -> None:
    other = str(uuid.uuid4())
    err = rejected(provider, provider.mint_access_token(provider.default_app.client_id, tenant_id=other))
    assert err.akv_code == "AKV10032"
    assert err.message.startswith(
        f"AKV10032: Invalid issuer. Expected one of https://sts.windows.net/{TENANT}/"
    )
    assert err.message.endswith(f"found https://sts.windows.net/{other}/.")


def test_expiry_is_exact(provider: IdentityProvider) -> None:
    start = time.time()
    provider.clock = lambda: start
    token = provider.mint_access_token(provider.default_app.client_id, lifetime=300)
    provider.clock = lambda: start + 299
    provider.verify_access_token(token, audience=KV)
    provider.clock = lambda: start + 300
    err = rejected(provider, token)
    assert err.akv_code == "TokenExpired"
    assert err.message == "[TokenExpired] Error validating token: 'S2S12086'."


def test_token_lifetime_drives_expiry(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = make_provider(monkeypatch)
    provider.token_lifetime = 60
    start = time.time()
    provider.clock = lambda: start
    token = provider.mint_access_token(provider.default_app.client_id)
    provider.clock = lambda: start + 61
    assert rejected(provider, token).akv_code == "TokenExpired"


def test_not_yet_valid(provider: IdentityProvider) -> None:
    provider.clock = lambda: time.time() + 3600
    token = provider.mint_access_token(provider.default_app.client_id)
    provider.clock = time.time
    assert rejected(provider, token).akv_code == "TokenNotYetValid"


def test_token_from_another_emulator_has_unknown_key(
    monkeypatch: pytest.MonkeyPatch, provider: IdentityProvider
) -> None:
    other = make_provider(monkeypatch)
    assert other.entra_key.kid != provider.entra_key.kid
    err = rejected(provider, other.mint_access_token(other.default_app.client_id))
    assert err.akv_code == "AKV10046"


def test_bad_signature_with_known_kid(provider: IdentityProvider) -> None:
    good = provider.mint_access_token(provider.default_app.client_id)
    claims = jwt.decode(good, options={"verify_signature": False})
    foreign = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    headers = {"kid": provider.entra_key.kid, "x5t": provider.entra_key.x5t}
    assert (
        rejected(provider, jwt.encode(claims, foreign, algorithm="RS256", headers=headers)).akv_code
        == "AKV10047"
    )
    head, body, sig = good.split(".")
    tampered = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(body).replace(b'"ver":"1.0"', b'"ver":"2.0"')
    ).decode()
    assert rejected(provider, f"{head}.{tampered}.{sig}").akv_code == "AKV10047"


def test_unsigned_token_is_refused(provider: IdentityProvider) -> None:
    claims = jwt.decode(
        provider.mint_access_token(provider.default_app.client_id), options={"verify_signature": False}
    )
    unsigned = jwt.encode(claims, None, algorithm="none", headers={"kid": provider.entra_key.kid})
    assert rejected(provider, unsigned).akv_code == "AKV10046"


def test_missing_and_malformed(provider: IdentityProvider) -> None:
    err = rejected(provider, "")
    assert err.akv_code == "AKV10000" and err.message == "AKV10000: Request is missing a Bearer or PoP token."
    assert rejected(provider, "garbage-token-value").akv_code == "AKV10001"


def test_rejections_never_carry_the_token(provider: IdentityProvider) -> None:
    token = provider.mint_access_token(provider.default_app.client_id, "https://other/")
    err = rejected(provider, token)
    for text in (str(err), repr(err), err.message):
        assert token not in text and token.split(".")[2] not in text


def test_directory_is_safe_across_threads(provider: IdentityProvider) -> None:
    made: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            app = provider.add_app()
            provider.add_federated_credential(app.client_id, issuer=ISSUER, subject=f"s-{app.client_id}")
            with lock:
                made.append(app.client_id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 200
    assert all(provider.find_app(cid) is not None for cid in made)
