"""The TLS checks of the gRPC path, on both sides, made before gRPC can fail obscurely.

gRPC reports TLS problems late and vaguely: a client whose CA does not fit the server's
certificate sees the same "not ready" as for a server that is down, and a server given a
key that is not its certificate's fails with a traceback once it starts. Python's ssl
module and `cryptography` (a dependency of Flower) say exactly what is wrong, so these
functions ask them first and return the reason in one line (or None); each side raises
its own error with it:

- tls_problem: can a client with this CA (or none) talk to the server at this address?
  (client.py, through federation/grpc_client.py)
- certificates_problem: can these three PEM files serve TLS? (server.py, through
  federation/grpc_server.py)
"""

import socket
import ssl

CERTIFICATE_FILES = ("ca.crt", "server.pem", "server.key")  # as make_certificates.py writes


def _tls_handshake(host: str, port: int, context: ssl.SSLContext,
                   timeout: float) -> bytes | None:
    """The server's certificate (DER) after one TLS handshake, or None if it has no TLS.

    Raises OSError if nobody answers, ssl.SSLCertVerificationError if `context` rejects
    the certificate.
    """
    context.set_alpn_protocols(["h2"])  # as gRPC does: its server rejects TLS without it
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                return tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError:
        raise
    except (ssl.SSLError, ConnectionResetError):
        return None  # it answered, but not with TLS (a plaintext gRPC server hangs up)


def _signed_by(certificate_der: bytes, ca_pem: bytes) -> bool:
    """Whether a CA certificate in ca_pem signed the certificate."""
    from cryptography import x509  # noqa: PLC0415  (a dependency of flwr; TLS only)
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415
    certificate = x509.load_der_x509_certificate(certificate_der)
    for ca in x509.load_pem_x509_certificates(ca_pem):
        try:
            certificate.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def tls_problem(address: str, root_certificates: bytes | None, root_name: str,
                timeout: float = 5.0) -> str | None:
    """Why this client's TLS setting cannot work with the server at address, or None.

    gRPC reports a failed handshake only as "not ready", which looks the same as a
    server that is down; it retries, and both sides log an error each time. Python's ssl
    module tells exactly what is wrong, so ask it first. The first handshake verifies
    nothing (so the server sees a normal handshake, not a rejected one, and logs
    nothing); the certificate it returns is then checked against the CA. None also when
    nobody listens or the answer is unclear: the gRPC connection then decides.
    """
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    try:
        certificate = _tls_handshake(host, int(port), unverified, timeout)
    except (OSError, ValueError):
        return None  # nobody listens (yet), or it does not answer: let gRPC decide
    if certificate is None:
        return (f"the server at {address} does not use TLS: drop --root-certificate, or "
                "start server.py with --certificates" if root_certificates else None)
    if root_certificates is None:
        return (f"the server at {address} uses TLS: pass --root-certificate with the CA "
                "that signed its certificate (ca.crt from make_certificates.py)")
    if not _signed_by(certificate, root_certificates):
        return (f"the server at {address} uses TLS and its certificate is not signed by "
                f"{root_name} (pass the ca.crt from the server's make_certificates.py)")
    try:  # signed by our CA; what gRPC also checks: the host name and the dates
        _tls_handshake(host, int(port),
                       ssl.create_default_context(cadata=root_certificates.decode("ascii")),
                       timeout)
    except ssl.SSLCertVerificationError as e:
        return f"the certificate of the server at {address} is not valid: {e.verify_message}"
    except (OSError, ValueError):
        return None
    return None


def certificates_problem(ca: bytes, certificate: bytes, key: bytes) -> str | None:
    """Why the three PEM files cannot serve TLS, or None.

    gRPC reads them only once the server starts, and then fails with a traceback (or
    a bare "SSL_CTX_use_PrivateKey" log line): `cryptography`, a dependency of Flower,
    says which file is wrong first.
    """
    from cryptography import x509  # noqa: PLC0415  (TLS only)
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    try:
        x509.load_pem_x509_certificates(ca)
    except ValueError:
        return f"{CERTIFICATE_FILES[0]} is not a PEM certificate"
    try:
        server_certificate = x509.load_pem_x509_certificate(certificate)
    except ValueError:
        return f"{CERTIFICATE_FILES[1]} is not a PEM certificate"
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):  # TypeError: it has a passphrase
        return f"{CERTIFICATE_FILES[2]} is not an unencrypted PEM private key"
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (private_key.public_key().public_bytes(serialization.Encoding.PEM, public)
            != server_certificate.public_key().public_bytes(serialization.Encoding.PEM, public)):
        return f"{CERTIFICATE_FILES[2]} is not the private key of {CERTIFICATE_FILES[1]}"
    return None
