"""Test helper: a throwaway PKI (CA, server and client certificates) written as PEM files.

EC P-256 keys keep generation fast (milliseconds). Nothing here is used outside tests.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path                 # CA that signs the server and the good clients
    server: CertPair         # SAN: localhost, 127.0.0.1
    client: CertPair         # CN "hivemind-pool", SAN DNS "pool.example"
    other_name_client: CertPair   # signed by the CA, CN/SAN "intruder"
    rogue_ca: Path           # an unrelated CA
    rogue_client: CertPair   # CN "hivemind-pool" but signed by the rogue CA

    def key_texts(self) -> list[str]:
        """Base64 bodies of every private key, for "never logged" assertions."""
        out = []
        for pair in (self.server, self.client, self.other_name_client, self.rogue_client):
            body = "".join(pair.key.read_text().splitlines()[1:-1])
            out.append(body[:40])
        return out


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _make_ca(dirpath: Path, stem: str, cn: str) -> tuple[Path, x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = dirpath / f"{stem}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, cert, key


def _issue(dirpath: Path, stem: str, cn: str, sans: list[x509.GeneralName], server: bool,
           ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (x509.CertificateBuilder()
            .subject_name(_name(cn)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pair = CertPair(dirpath / f"{stem}.crt", dirpath / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def make_pki(dirpath: Path) -> PKI:
    dirpath.mkdir(parents=True, exist_ok=True)
    ca, ca_cert, ca_key = _make_ca(dirpath, "ca", "hivemind test CA")
    rogue_ca, rogue_cert, rogue_key = _make_ca(dirpath, "rogue-ca", "rogue CA")
    server = _issue(dirpath, "server", "worker",
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
                    True, ca_cert, ca_key)
    client = _issue(dirpath, "client", "hivemind-pool", [x509.DNSName("pool.example")],
                    False, ca_cert, ca_key)
    other = _issue(dirpath, "intruder", "intruder", [x509.DNSName("intruder")],
                   False, ca_cert, ca_key)
    rogue_client = _issue(dirpath, "rogue-client", "hivemind-pool", [x509.DNSName("pool.example")],
                          False, rogue_cert, rogue_key)
    return PKI(ca=ca, server=server, client=client, other_name_client=other,
                   rogue_ca=rogue_ca, rogue_client=rogue_client)
