"""Loading kubeconfig files and the in-cluster config, and using them over
real TLS: a local HTTPS server that checks our client certificate or token."""

import json
import os
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from engine.kube.client import ApiError, Client
from engine.kube.kubeconfig import KubeconfigError, in_cluster, load, load_kubeconfig
from pki import PKI, kubeconfig


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    p = PKI(str(tmp_path_factory.mktemp("pki")))
    p.server = p.issue("server", "server", client=False, server_names=("127.0.0.1", "localhost"))
    p.client = p.issue("client", "engine-node", groups=("engine:nodes",))
    return p


@pytest.fixture(scope="module")
def tls_server(pki):
    """Answers GET /whoami with the client certificate's CN or the bearer token."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            cert = self.connection.getpeercert()
            cn = dict(x[0] for x in cert["subject"])["commonName"] if cert else None
            auth = self.headers.get("Authorization")
            body = json.dumps({"cn": cn, "auth": auth}).encode()
            self.send_response(200 if (cn or auth == "Bearer sekrit") else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki.ca_file)
    ctx.load_cert_chain(*pki.server)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("inline", [False, True])
def test_client_certificate_over_tls(tmp_path, pki, tls_server, inline):
    kc = kubeconfig(str(tmp_path / "kc"), tls_server, pki.ca_file, *pki.client, inline=inline)
    cfg = load_kubeconfig(kc)
    assert cfg.server == tls_server and (cfg.ca_data is not None) == inline
    assert Client(cfg).get("/whoami") == {"cn": "engine-node", "auth": None}


def test_token_over_tls_and_token_file_is_reread(tmp_path, pki, tls_server):
    kc = kubeconfig(str(tmp_path / "kc"), tls_server, pki.ca_file, token="sekrit")
    assert Client(load(kc)).get("/whoami")["auth"] == "Bearer sekrit"
    # tokenFile (relative to the kubeconfig) is read on each request: rotation works
    doc = yaml.safe_load(open(kc))
    doc["users"][0]["user"] = {"tokenFile": "tok"}
    (tmp_path / "kc2").write_text(yaml.safe_dump(doc))
    (tmp_path / "tok").write_text("old\n")
    c = Client(load(str(tmp_path / "kc2")))
    with pytest.raises(ApiError) as e:
        c.get("/whoami")
    assert e.value.status == 401
    (tmp_path / "tok").write_text("sekrit\n")
    assert c.get("/whoami")["auth"] == "Bearer sekrit"


def test_wrong_ca_is_refused(tmp_path, pki, tls_server):
    other = PKI(str(tmp_path / "other"))
    kc = kubeconfig(str(tmp_path / "kc"), tls_server, other.ca_file, token="sekrit")
    import urllib3
    with pytest.raises(urllib3.exceptions.SSLError):
        Client(load(kc)).get("/whoami")


def test_relative_paths_and_named_context(tmp_path):
    (tmp_path / "ca.crt").write_text("x")
    doc = {"current-context": "a",
           "clusters": [{"name": "c1", "cluster": {"server": "https://one:6443/", "certificate-authority": "ca.crt"}},
                        {"name": "c2", "cluster": {"server": "https://two:6443", "insecure-skip-tls-verify": True}}],
           "users": [{"name": "u", "user": {"client-certificate": "/abs/c.crt", "client-key": "k.key"}}],
           "contexts": [{"name": "a", "context": {"cluster": "c1", "user": "u"}},
                        {"name": "b", "context": {"cluster": "c2"}}]}
    (tmp_path / "kc").write_text(yaml.safe_dump(doc))
    a = load_kubeconfig(str(tmp_path / "kc"))
    assert a.server == "https://one:6443"
    assert a.ca_file == str(tmp_path / "ca.crt") and a.key_file == str(tmp_path / "k.key")
    assert a.cert_file == "/abs/c.crt"
    b = load_kubeconfig(str(tmp_path / "kc"), context="b")
    assert b.server == "https://two:6443" and b.insecure and b.cert_file is None


@pytest.mark.parametrize("doc, message", [
    ("just text", "not a mapping"),
    ({"clusters": []}, "no current-context"),
    ({"current-context": "x", "contexts": []}, "no context named 'x'"),
    ({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c"}}],
      "clusters": [{"name": "c", "cluster": {}}]}, "has no server"),
    ({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
      "clusters": [{"name": "c", "cluster": {"server": "https://s"}}],
      "users": [{"name": "u", "user": {"exec": {"command": "aws"}}}]}, "exec and auth-provider"),
    ({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
      "clusters": [{"name": "c", "cluster": {"server": "https://s"}}],
      "users": [{"name": "u", "user": {"client-certificate": "c.crt"}}]}, "without a key"),
    ({"current-context": "x", "contexts": [{"name": "x", "context": {"cluster": "c"}}],
      "clusters": [{"name": "c", "cluster": {"server": "https://s", "certificate-authority-data": "@@"}}]},
     "not base64"),
])
def test_bad_kubeconfig_is_a_clear_error(tmp_path, doc, message):
    (tmp_path / "kc").write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    with pytest.raises(KubeconfigError, match=message):
        load_kubeconfig(str(tmp_path / "kc"))


def test_missing_kubeconfig(tmp_path):
    with pytest.raises(KubeconfigError, match="cannot read kubeconfig"):
        load(str(tmp_path / "nope"))


def test_in_cluster(tmp_path, pki, tls_server):
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("sekrit")
    with open(pki.ca_file) as f:
        (sa / "ca.crt").write_text(f.read())
    host, port = tls_server.rsplit("/", 1)[1].split(":")
    env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
    cfg = load(None, env=env, sa_dir=str(sa))
    assert cfg.server == tls_server and cfg.token_file == str(sa / "token")
    assert Client(cfg).get("/whoami")["auth"] == "Bearer sekrit"
    # IPv6 service host gets brackets
    v6 = in_cluster({"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, sa_dir=str(sa))
    assert v6.server == "https://[fd00::1]:443"
    with pytest.raises(KubeconfigError, match="not in a cluster"):
        load(None, env={}, sa_dir=str(sa))
    os.unlink(sa / "token")
    with pytest.raises(KubeconfigError, match="no service-account token"):
        load(None, env=env, sa_dir=str(sa))
