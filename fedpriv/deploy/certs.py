"""TLS certificates (a CA, the SuperLink's) and SuperNode keys, made with ``cryptography``."""

from __future__ import annotations

import datetime as _dt
import ipaddress
from pathlib import Path
from typing import Any, Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpriv.deploy.common import HOST, DeployError, Echo, print_line


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _builder(key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    """A certificate for ``key``'s public half, valid from 5 minutes ago for ``days`` days."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
    )


def _write_pair(out: Path, stem: str, cert: x509.Certificate, key: Any) -> tuple[Path, Path]:
    """``<out>/<stem>.pem`` (the certificate) and ``<out>/<stem>.key`` (PKCS#8, owner-only)."""
    cert_path, key_path = out / f"{stem}.pem", out / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


def make_ca(out: Path, name: str = "fedpriv federation CA", days: int = 30) -> tuple[Path, Path]:
    """A self-signed CA (ECDSA P-256): ``<out>/ca.pem`` and ``<out>/ca.key``."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        _builder(key, days)
        .subject_name(subject)
        .issuer_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _write_pair(out, "ca", cert, key)


def make_server_cert(out: Path, ca_cert: Path, ca_key: Path, hosts: Iterable[str] = (HOST,), days: int = 30) -> tuple[Path, Path]:
    """The SuperLink's certificate signed by the CA, with a SAN for every host (IP or DNS name)."""
    hosts = list(dict.fromkeys(hosts))
    if not hosts:
        raise DeployError("the server certificate needs at least one host name or IP address")
    ca = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signer = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(key, days)
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca.subject)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    return _write_pair(out, "server", cert, key)


def make_node_key(out: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes)."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    priv, pub = out / name, out / f"{name}.pub"
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return priv, pub


def make_deployment_certs(out: Path, hosts: list[str], keys: int, echo: Echo = print_line) -> None:
    """CA + SuperLink certificate for ``hosts``, and ``keys`` SuperNode key pairs, for real machines."""
    ca, ca_key = make_ca(out, days=365)
    cert, key = make_server_cert(out, ca, ca_key, hosts, days=365)
    echo(f"deploy: CA {ca} (keep {ca_key} offline), SuperLink certificate {cert} + {key} for {', '.join(hosts)}")
    for i in range(keys):
        priv, pub = make_node_key(out / "supernodes", f"supernode-{i}")
        echo(f"deploy: SuperNode key {priv} (give to owner {i}), public key {pub} (register on the SuperLink)")
