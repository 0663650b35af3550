"""Who may reach a cluster: only the user who started it.

- **Files.** Every cluster keeps its connection files, keys, certificates and
  logs in a directory of its own inside :func:`runtime_dir`, a per-user
  directory (``$XDG_RUNTIME_DIR/cloudlab``, else ``<tmp>/cloudlab-<uid>``) that
  only its owner can enter (0700, checked, never trusted if someone else made
  it). Cloudlab's processes create files with umask 077: 0600.
- **ipyparallel** signs every message with the HMAC key of its connection file
  (ipyparallel's default): a process without the file can reach the ports but
  cannot make an engine do anything. Between machines, CurveZMQ also encrypts
  and authenticates every connection (:func:`ipyparallel_env`).
- **Dask** has no authentication of its own. Locally, its scheduler and
  workers close at once any connection whose other end belongs to another
  user (:func:`accept_only_this_user`: the kernel's socket table names the
  owner of each local socket); this costs nothing per message, where TLS cost
  about 15 % of a round trip. Between machines, scheduler, workers and client
  use mutual TLS (:func:`dask_tls`): a connection without the cluster's
  certificate and key is refused.
- Everything binds to 127.0.0.1 locally, and no dashboard is started.

Remote backends call the same functions for their keys and certificates.
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError


def runtime_dir() -> Path:
    """This user's directory for running clusters, created 0700 and checked."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base, "cloudlab") if base and os.path.isdir(base) else \
        Path(tempfile.gettempdir(), f"cloudlab-{os.getuid()}")
    try:
        path.mkdir(mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"Cannot create cloudlab's runtime directory {path} ({e}); set "
                          f"XDG_RUNTIME_DIR to a directory of your own.") from None
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to someone else (or is not a directory), so "
                          f"cloudlab will not keep keys there; remove it, or set "
                          f"XDG_RUNTIME_DIR to a directory of your own.")
    if stat.S_IMODE(info.st_mode) != 0o700:
        path.chmod(0o700)
    return path


def private_dir(prefix: str) -> Path:
    """A new directory inside :func:`runtime_dir`, for one cluster's files."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir=runtime_dir()))


@dataclass(frozen=True)
class TLSFiles:
    """A certificate authority, and a certificate and key it signed, as 0600 PEM files."""

    ca: Path
    cert: Path
    key: Path


def ipyparallel_env(remote: bool) -> dict[str, str]:
    """Environment for an ipyparallel controller: with ``remote``, CurveZMQ on every
    connection (the controller makes the key pair and puts its public key in the
    connection files, from which engines and client take it)."""
    return {"IPP_ENABLE_CURVE": "1"} if remote else {}


def dask_tls(folder: Path) -> TLSFiles:
    """Fresh credentials for one Dask cluster: scheduler, workers and client all present
    this certificate and accept only peers that present it too.

    An elliptic-curve key (P-256), where Dask's own ``Security.temporary`` makes
    an RSA one: a few milliseconds instead of a noticeable part of a start.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dask-internal")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("dask-internal")]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    files = TLSFiles(folder / "tls-ca.pem", folder / "tls-cert.pem", folder / "tls-key.pem")
    for path, data in ((files.ca, cert_pem), (files.cert, cert_pem), (files.key, key_pem)):
        write_private(path, data)
    return files


def write_private(path: Path, data: bytes) -> None:
    """Create ``path`` readable by its owner only (it must not exist yet)."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(data)


def dask_security(files: TLSFiles):
    """The client's side of :func:`dask_tls`."""
    from distributed.security import Security

    return Security(tls_ca_file=str(files.ca), tls_client_cert=str(files.cert),
                    tls_client_key=str(files.key), require_encryption=True)


# ------------------------------------------------------------ local peers' owners
def socket_owner(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The uid owning the IPv4 TCP socket bound to ``local`` and connected to
    ``remote``, from /proc/net/tcp (None if there is none, or no such table)."""
    def key(address: tuple[str, int]) -> str:
        host, port = address[:2]
        return f"{socket.inet_aton(host)[::-1].hex().upper()}:{port:04X}"

    wanted = (key(local), key(remote))
    try:
        with open("/proc/net/tcp") as table:
            next(table)
            for line in table:
                fields = line.split()
                if (fields[1], fields[2]) == wanted:
                    return int(fields[7])
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return None


def peer_is_this_user(sock: socket.socket) -> bool:
    """Whether the other end of a loopback TCP connection belongs to this process's user."""
    try:
        peer, ours = sock.getpeername(), sock.getsockname()
    except OSError:
        return False
    return socket_owner(peer, ours) == os.getuid()


def accept_only_this_user() -> None:
    """Make Dask's plain-TCP listeners in this process close, before a byte is read, every
    connection from another user's process (call it in a scheduler or worker process)."""
    from distributed.comm import tcp

    prepare = tcp.TCPListener._prepare_stream

    async def prepare_for_this_user_only(self, stream, address):
        if not peer_is_this_user(stream.socket):
            stream.close()
            return None
        return await prepare(self, stream, address)

    tcp.TCPListener._prepare_stream = prepare_for_this_user_only  # type: ignore[method-assign]
