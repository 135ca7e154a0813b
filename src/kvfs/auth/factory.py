"""Pick the credential for a volume's auth mode and put the token cache in front of it."""

from __future__ import annotations

import logging

import httpx

from kvfs.auth.base import Credential, TokenSource
from kvfs.auth.cache import CachingCredential
from kvfs.auth.default_chain import DefaultChainCredential
from kvfs.auth.flows import AssertionCredential, ClientSecretCredential, ImdsCredential, NmiCredential
from kvfs.auth.tokensource import FileTokenSource, PushedTokenSource
from kvfs.config.model import MountConfig
from kvfs.errors import ConfigError

log = logging.getLogger(__name__)


def build_credential(
    config: MountConfig,
    http: httpx.AsyncClient,
    *,
    token_source: TokenSource | None = None,
    local_http: httpx.AsyncClient | None = None,
) -> CachingCredential:
    """One cached credential for the volume's identity.

    `http` reaches Entra ID (HTTPS, SSL_CERT_FILE, proxies allowed); `local_http` reaches IMDS/NMI
    and must be built with `trust_env=False`. Without it the IMDS/NMI credential makes its own
    proxy-free client and closes it in `aclose()`. The caller owns `http` and `local_http`.
    """
    auth = config.auth
    cloud = config.cloud
    flow: Credential
    if auth.mode == "workload_identity":
        # parse_parameters guarantees a token (CSI) or a token file (cli), and `kvfs mount`
        # checks that the file exists; FileTokenSource reports a file that goes missing later.
        source: TokenSource
        if token_source is not None:
            source = token_source
        elif auth.sa_token:
            source = PushedTokenSource(auth.sa_token)
        else:
            source = FileTokenSource(auth.sa_token_file)
        flow = AssertionCredential(cloud.authority_host, auth.tenant_id, auth.client_id, source, http)
    elif auth.mode == "service_principal":
        flow = ClientSecretCredential(
            cloud.authority_host, auth.tenant_id, auth.client_id, auth.client_secret, http
        )
    elif auth.mode == "vm_managed_identity":
        flow = ImdsCredential(auth.user_assigned_identity_id or None, local_http)
    elif auth.mode == "pod_identity":
        flow = NmiCredential(
            auth.pod_name or config.pod_name, auth.pod_namespace or config.pod_namespace, local_http
        )
    elif auth.mode == "default_chain":
        flow = DefaultChainCredential(cloud, auth.tenant_id)
    else:
        raise ConfigError("auth mode", auth.mode, "is not supported", "this is a kvfs bug")
    log.debug("credential for %s: %r", auth.mode, flow)
    return CachingCredential(flow)
