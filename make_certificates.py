"""Create a private certificate authority and a TLS certificate for server.py.

Without TLS, model updates cross the network in plaintext and any process can pose as
the server. This writes, into --out-dir:

  ca.crt      the CA certificate: give it to clients (client.py --root-certificate)
  ca.key      the CA's private key: only needed to issue more certificates; keep it safe
  server.pem  the server certificate, valid for localhost and 127.0.0.1 (and --host ...)
  server.key  the server's private key (server.py --certificates DIR reads the last two)

    python make_certificates.py
    python server.py --certificates certificates
    python client.py --partition 0 --root-certificate certificates/ca.crt

Uses `cryptography` (already installed as a Flower dependency); no openssl needed.
"""

import argparse
import datetime
import ipaddress
import os
import pathlib
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import cli

MAX_DAYS = 36500  # 100 years; far more overflows datetime (year 9999)


def _name(common_name: str) -> x509.Name:
    """A subject/issuer name with just a common name."""
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_name(host: str) -> x509.GeneralName:
    """A subjectAltName entry: an IP address if host parses as one, else a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


KeyAndCertificate = tuple[ec.EllipticCurvePrivateKey, x509.Certificate]


def make_ca(days: int, now: datetime.datetime) -> KeyAndCertificate:
    """A self-signed CA that may sign server certificates and nothing below them."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name("Flower tutorial CA")).issuer_name(_name("Flower tutorial CA"))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_certificate(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
                            hosts: list[str], days: int,
                            now: datetime.datetime) -> KeyAndCertificate:
    """A server certificate for `hosts` (TLS checks the subjectAltName), signed by the CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (gRPC cannot read passphrase-protected keys)."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: pathlib.Path, data: bytes, private: bool) -> None:
    """Write atomically; private keys are readable by their owner only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_certificates(out_dir: str | os.PathLike, hosts: list[str], days: int) -> None:
    """Create ca.crt, ca.key, server.pem and server.key in out_dir."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Backdate a little so a client whose clock is slightly behind still accepts them.
    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key, ca_cert = make_ca(days, now)
    key, cert = make_server_certificate(ca_key, ca_cert, hosts, days, now)
    pem = serialization.Encoding.PEM
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "ca.crt", ca_cert.public_bytes(pem), private=False)
    _write(out / "server.pem", cert.public_bytes(pem), private=False)


def host(text: str) -> str:
    """An argparse type: a host name or IP address (a certificate cannot name anything else)."""
    problem = cli.host_problem(text)
    if not problem and len(text) > 64:  # X.509 caps a common name at 64 characters
        problem = "is longer than the 64 characters a certificate's name may have"
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r} {problem}")
    return text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default="certificates", type=cli.nonempty,
                   help="directory to write the four files to (default: %(default)s)")
    p.add_argument("--host", action="append", default=None, metavar="NAME_OR_IP", type=host,
                   help="a host name or IP clients use to reach the server; repeat for "
                        "several (default: localhost and 127.0.0.1)")
    p.add_argument("--days", type=cli.number(int, 1, MAX_DAYS), default=365,
                   help="validity of both certificates in days (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace certificates already in --out-dir (clients holding the old "
                        "ca.crt can no longer connect)")
    args = p.parse_args(argv)
    args.host = args.host or ["localhost", "127.0.0.1"]
    return args


def main(argv: list[str] | None = None) -> None:
    """Write the certificates and say where they went."""
    args = parse_args(argv)
    try:
        existing = [name for name in ("ca.crt", "ca.key", "server.pem", "server.key")
                    if (pathlib.Path(args.out_dir) / name).exists()]
    except OSError as e:  # e.g. a name too long: exists() raises rather than say False
        sys.exit(f"make_certificates.py: error: cannot write to {args.out_dir}: {e.strerror}")
    if existing and not args.force:
        sys.exit(f"make_certificates.py: error: {args.out_dir} already holds "
                 f"{', '.join(existing)}; a new CA would lock out clients that hold the old "
                 "ca.crt: pass --force to replace them, or choose another --out-dir")
    try:
        write_certificates(args.out_dir, args.host, args.days)
    except OSError as e:
        sys.exit(f"make_certificates.py: error: cannot write to {args.out_dir}: "
                 f"{e.strerror or e}")
    print(f"wrote {args.out_dir}/ca.crt, ca.key, server.pem, server.key "
          f"for {', '.join(args.host)} (valid {args.days} days)")


if __name__ == "__main__":
    main()
