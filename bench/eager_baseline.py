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

from kvfs.auth.flows import AssertionCredential
from kvfs.auth.tokensource import FileTokenSource
from kvfs.net.http import make_http_client


async def main(info_file: str, vault: str, outdir: str, names: list[str]) -> None:
    info = json.loads(Path(info_file).read_text())
    async with make_http_client() as http:
        workload = AssertionCredential(
            info["authority_host"], info["tenant_id"], info["app"]["client_id"],
            FileTokenSource(info["sa_token_file"]), http,
        )
        token = await workload.get_token(info["kv_resource"].rstrip("/") + "/.default")
        headers = {"Authorization": f"Bearer {token.token}"}
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
