"""A throwaway TLS identity for local Redis deployments over TLS (`rediss://`,
`rediss+sentinel://`, `rediss+cluster://`): a self-signed certificate for 127.0.0.1 and
localhost, its own CA, for the tests and the benchmark."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    """The certificate, which is also the CA that clients trust (self-signed)."""
    key: Path

    def server_args(self) -> list[str]:
        """redis-server's TLS settings (with `--tls-port`): clients need no certificate, and
        replicas and sentinels speak TLS to their peers too."""
        return [
            "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no",
            "--tls-replication", "yes",
        ]  # fmt: skip

    @property
    def url_query(self) -> str:
        """What a REDIS_URL adds to trust the certificate."""
        return f"ssl_ca_certs={quote(str(self.cert))}"


def self_signed(directory: Path) -> TlsFiles:
    """A new key and certificate for 127.0.0.1 in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "cert.pem", directory / "key.pem")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files
