"""TLS credentials: the worker's server side, and the client side a pool (or a test) dials with.

PEM files are secrets (the keys) or pinned trust anchors (the CAs); they are read through
`hivemind.secrets.read_secret` so systemd credentials work, and no error here quotes a file's
contents, only its path.
"""

from __future__ import annotations

from collections.abc import Mapping

import grpc

from hivemind.secrets import read_secret


def read_pem(key: str, ref: str, environ: Mapping[str, str] | None = None) -> bytes:
    # read_secret strips whitespace; PEM parsers want the final newline back.
    return (read_secret(key, ref, environ).reveal() + "\n").encode("ascii", errors="replace")


def server_credentials(cert_pem: bytes, key_pem: bytes,
                       client_ca_pem: bytes | None = None) -> grpc.ServerCredentials:
    """Server TLS; with `client_ca_pem` a client certificate signed by that CA is required."""
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=client_ca_pem,
        require_client_auth=client_ca_pem is not None,
    )


def pool_channel_credentials(ca_file: str, *, cert_file: str = "", key_file: str = "",
                             token_file: str = "",
                             environ: Mapping[str, str] | None = None) -> grpc.ChannelCredentials:
    """Channel credentials for a client (the pool, or the worker reaching a TLS pool).

    `ca_file` pins the CA of the server's certificate; empty trusts the system CAs.
    `cert_file`+`key_file` present a client certificate (the worker's mtls mode).
    `token_file` adds `authorization: Bearer <token>` to every call (the worker's token mode).
    """
    root = read_pem("ca_file", ca_file, environ) if ca_file else None
    if bool(cert_file) != bool(key_file):
        raise ValueError("cert_file and key_file go together: set both or neither")
    chain = read_pem("cert_file", cert_file, environ) if cert_file else None
    key = read_pem("key_file", key_file, environ) if key_file else None
    creds = grpc.ssl_channel_credentials(root_certificates=root, private_key=key,
                                         certificate_chain=chain)
    if token_file:
        token = read_secret("token_file", token_file, environ)
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token.reveal()))
    return creds
