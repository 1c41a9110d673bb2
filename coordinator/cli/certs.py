"""`coordinator certs`: the cluster's own CA, node certificates and client certificates (cryptography).

- The CA: a self-signed P-256 certificate that may sign leaf certificates only (path length 0).
- A node certificate: common name "node" (what internal RPCs require), the given host names and IP
  addresses as SANs, usable as a TLS server and as a TLS client (every node is both).
- A client certificate: common name NAME, usable as a TLS client only.
Keys are written 0600 from the start; certificates 0644. Nothing is overwritten unless asked (`overwrite`).
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

from shardline.tls import (
    CA_CERT,
    CA_KEY,
    NODE_CERT,
    NODE_KEY,
    NODE_NAME,
    SERVER_CERT,
    SERVER_KEY,
    SERVER_NAME,
    client_files,
    write_private,
)

DEFAULT_CA_DAYS = 3650
DEFAULT_DAYS = 365
CLOCK_SKEW = datetime.timedelta(minutes=5)  # a certificate is valid from a little before it was made


class CertError(ValueError):
    """A certificate cannot be made: the message says what to do."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    not_after: datetime.datetime


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
           overwrite: bool) -> Issued:
    for path in (cert_path, key_path):
        if path.exists() and not overwrite:
            raise CertError(f"{path} exists: pass --overwrite to replace it")
    write_private(key_path, _key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)
    return Issued(cert_path, key_path, cert.not_valid_after_utc)


def _window(days: float, not_before: datetime.datetime | None) -> tuple[datetime.datetime, datetime.datetime]:
    """When a certificate is valid: from a little before now (or `not_before`, for tests) for `days`."""
    if days <= 0:
        raise CertError(f"a certificate must be valid for a positive number of days, not {days}")
    start = not_before or _now() - CLOCK_SKEW
    return start, start + (CLOCK_SKEW if not_before is None else datetime.timedelta()) + datetime.timedelta(days=days)


def create_ca(certs_dir: Path, days: float = DEFAULT_CA_DAYS, ca_key: Path | None = None,
              overwrite: bool = False, common_name: str = "shardline CA") -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shardline"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    start, end = _window(days, None)
    cert = builder.not_valid_before(start).not_valid_after(end).sign(key, hashes.SHA256())
    return _write(certs_dir / CA_CERT, ca_key or certs_dir / CA_KEY, cert, key, overwrite)


def _load_ca(certs_dir: Path, ca_key: Path | None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = certs_dir / CA_CERT, ca_key or certs_dir / CA_KEY
    for path in (cert_path, key_path):
        if not path.is_file():
            raise CertError(f"{path} does not exist: create the CA first with `coordinator certs create-ca "
                            f"--certs-dir {certs_dir}`")
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CertError(f"{cert_path} or {key_path} is not a PEM certificate / unencrypted PEM key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CertError(f"{key_path} is not the key of {cert_path}")
    return cert, key


def _leaf(certs_dir: Path, common_name: str, sans: list[x509.GeneralName], usages: list[x509.ObjectIdentifier],
          days: float | None, ca_key: Path | None, not_before: datetime.datetime | None) -> tuple[x509.Certificate,
                                                                                         ec.EllipticCurvePrivateKey]:
    ca_cert, ca = _load_ca(certs_dir, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shardline"),
                                        x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    start, end = _window(days or DEFAULT_DAYS, not_before)
    if days is None:  # the default: a year, or until the CA expires if that is sooner
        end = min(end, ca_cert.not_valid_after_utc)
    elif end > ca_cert.not_valid_after_utc:
        raise CertError(f"the certificate would outlive the CA (valid until {ca_cert.not_valid_after_utc:%Y-%m-%d}): "
                        "give fewer --days")
    return builder.not_valid_before(start).not_valid_after(end).sign(ca, hashes.SHA256()), key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        pass
    label = host.removeprefix("*.")
    if not host or len(host) > 253 or not all(part and len(part) <= 63 and part.replace("-", "").replace("_", "")
                                              .isalnum() for part in label.split(".")):
        raise CertError(f"{host!r} is not a host name or an IP address")
    return x509.DNSName(host)


def create_node(certs_dir: Path, hosts: list[str], days: float | None = None, ca_key: Path | None = None,
                overwrite: bool = False, not_before: datetime.datetime | None = None) -> Issued:
    """A node certificate for every host name / IP address a node is reached on (`*.domain` allowed)."""
    if not hosts:
        raise CertError("give the host names and IP addresses this node is reached on (e.g. localhost 127.0.0.1)")
    sans = [_san(h) for h in hosts]
    cert, key = _leaf(certs_dir, NODE_NAME, sans, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                      days, ca_key, not_before)
    return _write(certs_dir / NODE_CERT, certs_dir / NODE_KEY, cert, key, overwrite)


def create_server(certs_dir: Path, hosts: list[str], days: float | None = None, ca_key: Path | None = None,
                  overwrite: bool = False) -> Issued:
    """The HTTPS gateway's certificate (server.crt, server.key): server authentication only, its own key, so
    the public edge never holds the node key that internal links trust."""
    if not hosts:
        raise CertError("give the host names and IP addresses HTTPS clients reach the gateway on")
    cert, key = _leaf(certs_dir, SERVER_NAME, [_san(h) for h in hosts], [ExtendedKeyUsageOID.SERVER_AUTH], days,
                      ca_key, None)
    return _write(certs_dir / SERVER_CERT, certs_dir / SERVER_KEY, cert, key, overwrite)


def create_client(certs_dir: Path, name: str, days: float | None = None, ca_key: Path | None = None,
                  overwrite: bool = False) -> Issued:
    plain = name.replace("-", "").replace("_", "").replace(".", "")
    if not name or name in (NODE_NAME, SERVER_NAME) or not plain.isalnum():
        raise CertError(f"client name {name!r} must be letters, digits, '-', '_' or '.', and neither "
                        f"{NODE_NAME!r} nor {SERVER_NAME!r}")
    cert, key = _leaf(certs_dir, name, [], [ExtendedKeyUsageOID.CLIENT_AUTH], days, ca_key, None)
    cert_name, key_name = client_files(name)
    return _write(certs_dir / cert_name, certs_dir / key_name, cert, key, overwrite)
