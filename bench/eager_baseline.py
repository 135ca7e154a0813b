"""The upstream way, as a baseline: fetch every object sequentially, write files, then read one.

Usage: eager_baseline.py EMULATOR_JSON VAULT OUTDIR NAME... — prints nothing; exits 0 when the
first file has been read back. Same HTTPS, same token exchange as kvfs (workload identity).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import trio

from kvfs.vault.transport import make_http_client


async def main(info_file: str, vault: str, outdir: str, names: list[str]) -> None:
    info = json.loads(Path(info_file).read_text())
    async with make_http_client() as http:
        token = await http.post(
            f"{info['authority_host'].rstrip('/')}/{info['tenant_id']}/oauth2/v2.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": info["app"]["client_id"],
                "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                "client_assertion": Path(info["sa_token_file"]).read_text().strip(),
                "scope": info["kv_resource"].rstrip("/") + "/.default",
            },
        )
        token.raise_for_status()
        headers = {"Authorization": f"Bearer {token.json()['access_token']}"}
        base = info["vaults"][vault].rstrip("/")
        out = Path(outdir)
        for name in names:  # sequential, like the provider's Mount
            reply = await http.get(f"{base}/secrets/{name}", params={"api-version": "7.4"}, headers=headers)
            reply.raise_for_status()
            (out / name).write_text(reply.json()["value"])
    with open(out / names[0], "rb") as first:
        first.read()


if __name__ == "__main__":
    os.environ.setdefault("SSL_CERT_FILE", json.loads(Path(sys.argv[1]).read_text())["ca_file"])
    trio.run(main, sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
