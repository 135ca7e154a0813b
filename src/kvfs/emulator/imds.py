"""IMDS managed identity tokens and aad-pod-identity's NMI, as plain-HTTP emulator routes.

IMDS answers numbers as strings (`"expires_in": "3599"`); NMI wraps a Go `adal.Token`, whose
`json.Number` fields marshal as bare JSON numbers. Clients must cope with both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

if TYPE_CHECKING:
    from kvfs.emulator.identity import App, IdentityProvider

log = logging.getLogger(__name__)

IMDS_PATH = "/metadata/identity/oauth2/token"
MULTIPLE_UA = (
    "Multiple user assigned identities exist, please specify the clientId / resourceId of the "
    "identity in the token request"
)


def _imds_error(status: int, error: str, description: str) -> JSONResponse:
    return JSONResponse({"error": error, "error_description": description}, status_code=status)


def _valid_resource(resource: str) -> bool:
    return "://" in resource and not resource.endswith("/.default")


def _select(provider: IdentityProvider, request: Request) -> App | str:
    """The identity a token request names, or IMDS's error description."""
    query = request.query_params
    identities = provider.managed_identities()
    client_id = query.get("client_id")
    object_id = query.get("object_id")
    res_id = query.get("msi_res_id") or query.get("mi_res_id")
    user = [a for a in identities if not a.system_assigned]
    if client_id:
        found = [a for a in identities if a.client_id.lower() == client_id.lower()]
    elif object_id:
        found = [a for a in identities if a.object_id.lower() == object_id.lower()]
    elif res_id:
        found = [a for a in user if a.resource_id.lower() == res_id.lower()]
    else:
        system = [a for a in identities if a.system_assigned]
        if system:
            return system[0]
        if len(user) > 1:
            return MULTIPLE_UA
        found = user
    return found[0] if found else "Identity not found"


async def _imds(provider: IdentityProvider, request: Request) -> Response:
    selected = _select(provider, request)
    requested = request.query_params.get("client_id", "")
    provider.notify("imds", selected.client_id if not isinstance(selected, str) else requested)
    if request.headers.get("metadata", "").lower() != "true":
        return _imds_error(400, "bad_request_102", "Required metadata header not specified")
    if provider.outage:
        return _imds_error(503, "temporarily_unavailable", "Entra ID is temporarily unavailable")
    if not request.query_params.get("api-version"):
        return _imds_error(400, "invalid_request", "Required query variable 'api-version' is missing")
    resource = request.query_params.get("resource", "")
    if not resource:
        return _imds_error(400, "invalid_request", "Required query variable 'resource' is missing")
    if not _valid_resource(resource):
        return _imds_error(
            400,
            "invalid_resource",
            f"AADSTS50001: The application named {resource} was not found in the tenant named "
            f"{provider.tenant_id}. This can happen if the application has not been installed by the "
            "administrator of the tenant or consented to by any user in the tenant. You might have "
            "sent your authentication request to the wrong tenant.",
        )
    if isinstance(selected, str):
        log.info("IMDS token request refused: %s", selected)
        return _imds_error(400, "invalid_request", selected)
    token, iat, exp = provider.issue_access_token(selected, resource, appidacr="2")
    lifetime = str(exp - iat)
    return JSONResponse(
        {
            "access_token": token,
            "client_id": selected.client_id,
            "expires_in": lifetime,
            "expires_on": str(exp),
            "ext_expires_in": lifetime,
            "not_before": str(iat),
            "refresh_token": "",
            "resource": resource,
            "token_type": "Bearer",
        }
    )


async def _nmi(provider: IdentityProvider, request: Request) -> Response:
    podns = request.headers.get("podns", "")
    podname = request.headers.get("podname", "")
    app = provider.pod_identity(podns, podname) if podns and podname else None
    provider.notify("nmi", app.client_id if app else "")
    if not podns or not podname:
        return PlainTextResponse("missing podname and podns from request\n", status_code=400)
    if provider.outage:
        return PlainTextResponse(
            f"failed to get service principal token for pod:{podns}/{podname}, error: "
            "Entra ID is temporarily unavailable\n",
            status_code=500,
        )
    resource = request.query_params.get("resource", "")
    if not resource:
        return PlainTextResponse("parameter resource cannot be empty\n", status_code=400)
    if app is None:
        return PlainTextResponse(
            f"no AzureAssignedIdentity found for pod:{podns}/{podname} in assigned state\n",
            status_code=404,
        )
    token, iat, exp = provider.issue_access_token(app, resource, appidacr="2")
    return JSONResponse(
        {
            "token": {
                "access_token": token,
                "refresh_token": "",
                "expires_in": exp - iat,
                "expires_on": exp,
                "not_before": iat,
                "resource": resource,
                "token_type": "Bearer",
            },
            "clientid": app.client_id,
        }
    )


def routes(provider: IdentityProvider) -> list[BaseRoute]:
    async def imds(request: Request) -> Response:
        return await _imds(provider, request)

    async def nmi(request: Request) -> Response:
        return await _nmi(provider, request)

    return [
        Route(IMDS_PATH, imds, methods=["GET"]),
        Route("/host/token/", nmi, methods=["GET"]),
        Route("/host/token", nmi, methods=["GET"]),
    ]
