"""Certificates for TLS tests and benchmarks, made with the ``openssl`` command (no Python package needed).

:func:`make_pki` writes a CA and, signed by it, a server certificate for
``localhost`` / 127.0.0.1 and a client certificate, with the extensions
QEMU's ``tls-creds-x509`` checks when it loads a folder (a CA's basic
constraints and key usage; a server's and a client's key usage and purpose).
:func:`creds_dir` lays out one endpoint's folder as QEMU names the files.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "30"
_LEAF = ["basicConstraints=critical,CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment"]


@dataclass(frozen=True)
class Pki:
    """One CA and the pairs it signed: ``server`` and ``client`` are (certificate, key) paths."""

    ca_cert: Path
    ca_key: Path
    server: tuple[Path, Path]
    client: tuple[Path, Path]


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _key(path: Path) -> Path:
    _openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(path))
    return path


def _leaf(folder: Path, name: str, ca_cert: Path, ca_key: Path, extensions: list[str]) -> tuple[Path, Path]:
    key = _key(folder / f"{name}-key.pem")
    csr, cert = folder / f"{name}.csr", folder / f"{name}-cert.pem"
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN=vmsd test {name}", "-out", str(csr))
    ext = folder / f"{name}.ext"
    ext.write_text("".join(f"{line}\n" for line in [*_LEAF, *extensions]))
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
             "-days", _DAYS, "-sha256", "-extfile", str(ext), "-out", str(cert))
    return cert, key


def make_pki(folder: Path, name: str = "ca", hostnames: tuple[str, ...] = ("DNS:localhost", "IP:127.0.0.1")) -> Pki:
    """A CA called ``name`` in ``folder``, with a server certificate for ``hostnames`` and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = _key(folder / f"{name}-key.pem")
    ca_cert = folder / f"{name}-cert.pem"
    _openssl("req", "-x509", "-new", "-key", str(ca_key), "-subj", f"/CN=vmsd test {name}", "-days", _DAYS,
             "-sha256", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", "-out", str(ca_cert))
    server = _leaf(folder, f"{name}-server", ca_cert, ca_key,
                   ["extendedKeyUsage=serverAuth", f"subjectAltName={','.join(hostnames)}"])
    client = _leaf(folder, f"{name}-client", ca_cert, ca_key, ["extendedKeyUsage=clientAuth"])
    return Pki(ca_cert, ca_key, server, client)


def creds_dir(folder: Path, ca: Path, server: tuple[Path, Path] | None = None,
              client: tuple[Path, Path] | None = None) -> Path:
    """A ``tls-creds-x509`` folder: ``ca`` as ca-cert.pem, and the server's and/or client's pair."""
    folder.mkdir(parents=True)
    shutil.copy(ca, folder / "ca-cert.pem")
    for role, pair in (("server", server), ("client", client)):
        if pair is not None:
            shutil.copy(pair[0], folder / f"{role}-cert.pem")
            shutil.copy(pair[1], folder / f"{role}-key.pem")
    return folder
