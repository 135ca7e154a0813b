"""kvfs end to end on this machine, with nothing from Azure.

1. start `kvfs emulator` (Key Vault + Entra ID + a Kubernetes-like OIDC issuer, HTTPS on loopback)
2. put sample secrets into its vault through the Key Vault REST API
3. `kvfs mount` a SecretProviderClass that uses workload identity (a service account token
   exchanged at Entra ID), list the folder and read a secret
4. rotate the secret and watch the file show the new value
5. unmount and stop the emulator
"""

from __future__ import annotations

import json
import shutil
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import trio

from kvfs.auth.flows import ClientSecretCredential
from kvfs.net.http import make_http_client

KVFS = [sys.executable, "-m", "kvfs"]
API_VERSION = "7.4"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: timed out waiting for {what}")
        time.sleep(0.1)


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as mounts:
        return any(line.split()[4] == str(path) for line in mounts)


async def put_secrets(info: dict, secrets: dict[str, str]) -> None:
    """Write secrets like any Key Vault client: client-credentials token, then PUT."""
    os.environ["SSL_CERT_FILE"] = info["ca_file"]
    async with make_http_client() as http:
        app = ClientSecretCredential(
            info["authority_host"], info["tenant_id"], info["app"]["client_id"], info["app"]["client_secret"], http
        )
        token = await app.get_token(info["kv_resource"].rstrip("/") + "/.default")
        headers = {"Authorization": f"Bearer {token.token}"}
        vault_url = info["vaults"]["demo"].rstrip("/")
        for name, value in secrets.items():
            reply = await http.put(
                f"{vault_url}/secrets/{name}",
                params={"api-version": API_VERSION},
                json={"value": value},
                headers=headers,
            )
            reply.raise_for_status()


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="kvfs-demo-"))
    emulator_dir, mountpoint = work / "emulator", work / "secrets"
    mountpoint.mkdir()

    say("starting the Key Vault + Entra ID emulator")
    emulator = subprocess.Popen([*KVFS, "emulator", "--dir", str(emulator_dir)])
    mount: subprocess.Popen[bytes] | None = None
    try:
        info_file = emulator_dir / "emulator.json"
        wait_for(info_file.exists, "the emulator")
        info = json.loads(info_file.read_text())
        print(f"vault demo at {info['vaults']['demo']}, tenant {info['tenant_id']}")

        trio.run(put_secrets, info, {"demo-secret": "hello from Key Vault", "db-password": "s3cr3t-v1"})

        spc = work / "spc.yaml"
        spc.write_text(
            textwrap.dedent(
                f"""\
                apiVersion: secrets-store.csi.x-k8s.io/v1
                kind: SecretProviderClass
                metadata:
                  name: demo
                spec:
                  provider: azure
                  parameters:
                    clientID: "{info['app']['client_id']}"
                    tenantId: "{info['tenant_id']}"
                    keyvaultName: demo
                    cloudName: AzureStackCloud
                    cloudEnvFileName: "{info['cloud_env_file']}"
                    objects: |
                      array:
                        - |
                          objectName: demo-secret
                          objectType: secret
                        - |
                          objectName: db-password
                          objectType: secret
                          objectAlias: db/password
                """
            )
        )
        say(f"kvfs mount --spc {spc} {mountpoint}   (workload identity)")
        env = dict(os.environ, SSL_CERT_FILE=info["ca_file"], AZURE_FEDERATED_TOKEN_FILE=info["sa_token_file"])
        mount = subprocess.Popen([*KVFS, "mount", "--spc", str(spc), str(mountpoint), "--refresh-interval", "2s"], env=env)
        wait_for(lambda: is_mounted(mountpoint), "the mount")

        say(f"ls {mountpoint}")
        print(*sorted(os.listdir(mountpoint)), sep="\n")
        say("cat demo-secret")
        print((mountpoint / "demo-secret").read_text())

        say("rotating demo-secret in Key Vault")
        trio.run(put_secrets, info, {"demo-secret": "hello again, rotated"})
        wait_for(lambda: (mountpoint / "demo-secret").read_text() == "hello again, rotated", "the rotation", 20)
        say("cat demo-secret (after rotation)")
        print((mountpoint / "demo-secret").read_text())

        say("unmounting")
        mount.send_signal(signal.SIGTERM)
        if mount.wait(timeout=20) != 0:
            raise SystemExit("demo: kvfs mount exited with an error")
        mount = None
        print("done: the secrets were only ever in memory.")
        return 0
    finally:
        if mount is not None:
            mount.send_signal(signal.SIGTERM)
            mount.wait(timeout=20)
        emulator.send_signal(signal.SIGTERM)
        emulator.wait(timeout=20)
        if not is_mounted(mountpoint):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
