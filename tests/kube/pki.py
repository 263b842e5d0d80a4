"""Test certificates: a CA, a serving certificate for loopback, client
certificates (the CN is the user name, each O a group, as the API server
reads them) and the service-account signing key."""

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _write(path, data, mode=0o600):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PKI:
    def __init__(self, directory):
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "engine-test-ca")])
        self.ca_cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                        .public_key(self.ca_key.public_key()).serial_number(x509.random_serial_number())
                        .not_valid_before(now - datetime.timedelta(minutes=5))
                        .not_valid_after(now + datetime.timedelta(days=2))
                        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                     content_commitment=False, key_encipherment=False,
                                                     data_encipherment=False, key_agreement=False,
                                                     encipher_only=False, decipher_only=False), critical=True)
                        .sign(self.ca_key, hashes.SHA256()))
        self.ca_file = _write(os.path.join(directory, "ca.crt"),
                              self.ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)

    def issue(self, name, cn, groups=(), server_names=(), client=True):
        """Writes NAME.crt and NAME.key; returns their paths."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        subject += [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        b = (x509.CertificateBuilder().subject_name(x509.Name(subject)).issuer_name(self.ca_cert.subject)
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(
                 [ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]), critical=False))
        if server_names:
            alt = []
            for n in server_names:
                try:
                    alt.append(x509.IPAddress(ipaddress.ip_address(n)))
                except ValueError:
                    alt.append(x509.DNSName(n))
            b = b.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = b.sign(self.ca_key, hashes.SHA256())
        crt = _write(os.path.join(self.dir, f"{name}.crt"), cert.public_bytes(serialization.Encoding.PEM), 0o644)
        return crt, _write(os.path.join(self.dir, f"{name}.key"), _key_pem(key))

    def service_account_keys(self):
        """sa.key (signing) and sa.pub (verifying), RSA as kubeadm makes them."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return (_write(os.path.join(self.dir, "sa.key"), _key_pem(key)),
                _write(os.path.join(self.dir, "sa.pub"), pub, 0o644))


def kubeconfig(path, server, ca_file, cert=None, key=None, token=None, user="user", inline=False):
    """A kubeconfig with one context; inline=True embeds the files as *-data."""
    import base64

    import yaml

    def data(p):
        with open(p, "rb") as f:
            return base64.b64encode(f.read()).decode()

    cluster = {"server": server}
    cluster.update({"certificate-authority-data": data(ca_file)} if inline else {"certificate-authority": ca_file})
    u = {}
    if cert:
        u.update({"client-certificate-data": data(cert), "client-key-data": data(key)} if inline
                 else {"client-certificate": cert, "client-key": key})
    if token:
        u["token"] = token
    doc = {"apiVersion": "v1", "kind": "Config", "current-context": "test",
           "clusters": [{"name": "test", "cluster": cluster}],
           "users": [{"name": user, "user": u}],
           "contexts": [{"name": "test", "context": {"cluster": "test", "user": user}}]}
    _write(path, yaml.safe_dump(doc).encode())
    return path
