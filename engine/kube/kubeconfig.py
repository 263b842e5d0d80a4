"""How to reach the API server: a kubeconfig file (as kube-proxy's
`clientConnection.kubeconfig` / `--kubeconfig`) or, inside a pod, the
service-account config (KUBERNETES_SERVICE_HOST/PORT and the mounted token
and CA), the same order kube-proxy uses: an explicit kubeconfig wins."""

import base64
import dataclasses
import ipaddress
import os
import ssl
import tempfile

import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


class KubeconfigError(ValueError):
    pass


@dataclasses.dataclass
class ClusterConfig:
    server: str                      # https://host:port, no trailing slash
    ca_file: str = None
    ca_data: bytes = None            # PEM
    cert_file: str = None
    key_file: str = None
    cert_data: bytes = None          # PEM
    key_data: bytes = None           # PEM
    token: str = None
    token_file: str = None           # re-read on use: projected tokens rotate
    insecure: bool = False
    tls_server_name: str = None
    source: str = ""                 # where this came from, for messages

    def bearer_token(self):
        if self.token_file:
            try:
                with open(self.token_file) as f:
                    return f.read().strip()
            except OSError as e:
                raise KubeconfigError(f"{self.source}: cannot read token file {self.token_file}: {e}") from e
        return self.token

    def ssl_context(self):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        elif self.ca_file or self.ca_data:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=self.ca_file,
                                             cadata=self.ca_data.decode() if self.ca_data else None)
        if self.cert_file or self.cert_data:
            _load_client_cert(ctx, self)
        return ctx


def _load_client_cert(ctx, cfg):
    # ssl wants files; inline data goes through a private temporary file that
    # is gone once loaded (the context keeps the key in memory).
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
        return
    if not cfg.key_data:
        raise KubeconfigError(f"{cfg.source}: client-certificate-data without client-key-data")
    with tempfile.TemporaryDirectory(prefix="engine-kube-") as d:
        cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert, cfg.cert_data), (key, cfg.key_data)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert, key)


def _named(items, name, what, where):
    for it in items or ():
        if isinstance(it, dict) and it.get("name") == name:
            return it.get(what) or {}
    raise KubeconfigError(f"{where}: no {what} named {name!r}")


def _b64(where, field, value):
    try:
        return base64.b64decode(value, validate=True)
    except (ValueError, TypeError) as e:
        raise KubeconfigError(f"{where}: {field} is not base64: {e}") from e


def load_kubeconfig(path, context=None):
    """The cluster, user and credentials of the current (or given) context."""
    try:
        with open(path) as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {e}") from e
    except yaml.YAMLError as e:
        raise KubeconfigError(f"kubeconfig {path} is not YAML: {e}") from e
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path}: not a mapping")
    base = os.path.dirname(os.path.abspath(path))

    def rel(p):  # paths in a kubeconfig are relative to the file
        return p if p is None or os.path.isabs(p) else os.path.join(base, p)

    context = context or doc.get("current-context")
    if not context:
        raise KubeconfigError(f"kubeconfig {path}: no current-context")
    ctx = _named(doc.get("contexts"), context, "context", path)
    cluster = _named(doc.get("clusters"), ctx.get("cluster"), "cluster", path)
    user = _named(doc.get("users"), ctx.get("user"), "user", path) if ctx.get("user") else {}
    server = cluster.get("server")
    if not server:
        raise KubeconfigError(f"kubeconfig {path}: cluster {ctx.get('cluster')!r} has no server")
    if "exec" in user or "auth-provider" in user:
        raise KubeconfigError(f"kubeconfig {path}: user {ctx.get('user')!r}: exec and auth-provider "
                              "credentials are not supported; use a client certificate or a token")
    cfg = ClusterConfig(server=server.rstrip("/"), source=path,
                        insecure=bool(cluster.get("insecure-skip-tls-verify")),
                        tls_server_name=cluster.get("tls-server-name"),
                        ca_file=rel(cluster.get("certificate-authority")),
                        cert_file=rel(user.get("client-certificate")),
                        key_file=rel(user.get("client-key")),
                        token=user.get("token"), token_file=rel(user.get("tokenFile")))
    if cluster.get("certificate-authority-data"):
        cfg.ca_data = _b64(path, "certificate-authority-data", cluster["certificate-authority-data"])
    if user.get("client-certificate-data"):
        cfg.cert_data = _b64(path, "client-certificate-data", user["client-certificate-data"])
    if user.get("client-key-data"):
        cfg.key_data = _b64(path, "client-key-data", user["client-key-data"])
    if bool(cfg.cert_file or cfg.cert_data) != bool(cfg.key_file or cfg.key_data):
        raise KubeconfigError(f"kubeconfig {path}: user {ctx.get('user')!r} has a client certificate "
                              "without a key or a key without a certificate")
    return cfg


def in_cluster(env=None, sa_dir=SERVICE_ACCOUNT_DIR):
    """The pod's service-account config, as client-go's rest.InClusterConfig."""
    env = os.environ if env is None else env
    host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
    if not host or not port:
        raise KubeconfigError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set "
                              "(give clientConnection.kubeconfig or --kubeconfig)")
    try:
        host = f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        pass
    token = os.path.join(sa_dir, "token")
    if not os.path.exists(token):
        raise KubeconfigError(f"in-cluster config: no service-account token at {token}")
    ca = os.path.join(sa_dir, "ca.crt")
    return ClusterConfig(server=f"https://{host}:{port}", token_file=token,
                         ca_file=ca if os.path.exists(ca) else None, source="in-cluster config")


def load(kubeconfig=None, env=None, sa_dir=SERVICE_ACCOUNT_DIR):
    """kube-proxy's order: the kubeconfig given, else the in-cluster config."""
    if kubeconfig:
        return load_kubeconfig(kubeconfig)
    return in_cluster(env, sa_dir)
