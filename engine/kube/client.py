"""A small Kubernetes API client on urllib3: JSON requests and a line-by-line
watch stream with a client-side read timeout (a silently dead connection
raises instead of hanging, the pitfall of the official client's watch)."""

import json
import urllib.parse

import urllib3

from .kubeconfig import ClusterConfig

# Collection paths of the resources the engine uses, by kind.
RESOURCES = {
    "Service": ("v1", "/api/v1", "services"),
    "Endpoints": ("v1", "/api/v1", "endpoints"),
    "Node": ("v1", "/api/v1", "nodes"),
    "Pod": ("v1", "/api/v1", "pods"),
    "Namespace": ("v1", "/api/v1", "namespaces"),
    "ServiceAccount": ("v1", "/api/v1", "serviceaccounts"),
    "EndpointSlice": ("discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1", "endpointslices"),
    "Lease": ("coordination.k8s.io/v1", "/apis/coordination.k8s.io/v1", "leases"),
    "ClusterRole": ("rbac.authorization.k8s.io/v1", "/apis/rbac.authorization.k8s.io/v1", "clusterroles"),
    "ClusterRoleBinding": ("rbac.authorization.k8s.io/v1", "/apis/rbac.authorization.k8s.io/v1",
                           "clusterrolebindings"),
    "Role": ("rbac.authorization.k8s.io/v1", "/apis/rbac.authorization.k8s.io/v1", "roles"),
    "RoleBinding": ("rbac.authorization.k8s.io/v1", "/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    "DaemonSet": ("apps/v1", "/apis/apps/v1", "daemonsets"),
    "ConfigMap": ("v1", "/api/v1", "configmaps"),
}
CLUSTER_SCOPED = {"Node", "Namespace", "ClusterRole", "ClusterRoleBinding"}


class ApiError(Exception):
    """An HTTP error status from the API server, with its Status object."""

    def __init__(self, status, body, what=""):
        self.status = status
        self.body = body if isinstance(body, dict) else {}
        msg = self.body.get("message") or (body if isinstance(body, str) else "")
        super().__init__(f"{what}: HTTP {status}: {msg}".strip(": "))


def path_for(kind, namespace=None, name=None, subresource=None):
    """The URL path of a collection (name None) or of one object."""
    try:
        _, prefix, plural = RESOURCES[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind}") from None
    p = prefix
    if namespace and kind not in CLUSTER_SCOPED:
        p += f"/namespaces/{urllib.parse.quote(namespace, safe='')}"
    p += f"/{plural}"
    if name:
        p += f"/{urllib.parse.quote(name, safe='')}"
        if subresource:
            p += f"/{subresource}"
    return p


class Client:
    def __init__(self, config: ClusterConfig, connect_timeout=5.0, request_timeout=30.0, user_agent="engine"):
        self.config = config
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        kw = {}
        if config.server.startswith("https://"):
            kw["ssl_context"] = config.ssl_context()
            if config.tls_server_name:
                kw["server_hostname"] = config.tls_server_name
            if config.insecure:
                kw["cert_reqs"] = "CERT_NONE"
        # retries are the reflector's business (with backoff), not urllib3's
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=8, retries=False, **kw)
        self.user_agent = user_agent

    def _headers(self, content_type=None):
        h = {"Accept": "application/json", "User-Agent": self.user_agent}
        token = self.config.bearer_token()
        if token:
            h["Authorization"] = f"Bearer {token}"
        if content_type:
            h["Content-Type"] = content_type
        return h

    def url(self, path, params=None):
        q = {k: v for k, v in (params or {}).items() if v is not None and v != ""}
        return self.config.server + path + ("?" + urllib.parse.urlencode(q) if q else "")

    def request(self, method, path, params=None, body=None, content_type="application/json"):
        """One request; the decoded JSON answer, or ApiError for status >= 400.
        Connection problems raise urllib3's errors (HTTPError subclasses)."""
        data = None
        if body is not None:
            data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        r = self.pool.request(method, self.url(path, params), body=data,
                              headers=self._headers(content_type if data is not None else None),
                              timeout=urllib3.Timeout(connect=self.connect_timeout, read=self.request_timeout))
        try:
            answer = json.loads(r.data) if r.data else {}
        except ValueError:
            answer = r.data.decode(errors="replace")
        if r.status >= 400:
            raise ApiError(r.status, answer, f"{method} {path}")
        return answer

    def get(self, path, params=None):
        return self.request("GET", path, params)

    def create(self, path, obj):
        return self.request("POST", path, body=obj)

    def replace(self, path, obj):
        return self.request("PUT", path, body=obj)

    def delete(self, path):
        return self.request("DELETE", path)

    def merge_patch(self, path, patch):
        return self.request("PATCH", path, body=patch, content_type="application/merge-patch+json")

    def apply(self, obj, field_manager="engine", force=True):
        """Server-side apply of one object, with strict field validation so the
        server refuses unknown or duplicate fields."""
        md = obj.get("metadata") or {}
        return self.request("PATCH", path_for(obj["kind"], md.get("namespace"), md["name"]),
                            params={"fieldManager": field_manager, "force": "true" if force else None,
                                    "fieldValidation": "Strict"},
                            body=json.dumps(obj), content_type="application/apply-patch+yaml")

    def watch(self, path, params, read_timeout):
        """Opens a watch of `path` (ApiError if the server refuses it); iterate
        the returned Watch for its events."""
        r = self.pool.request("GET", self.url(path, dict(params, watch="true")), headers=self._headers(),
                              preload_content=False, retries=False,
                              timeout=urllib3.Timeout(connect=self.connect_timeout, read=read_timeout))
        if r.status >= 400:
            data = r.read()
            r.close()
            r.release_conn()
            try:
                body = json.loads(data)
            except ValueError:
                body = data.decode(errors="replace")
            raise ApiError(r.status, body, f"watch {path}")
        return Watch(r)


class Watch:
    """The events of one watch response, as dicts. Iteration raises urllib3
    errors when the connection fails or stays silent for the read timeout,
    ValueError on a line that is not JSON, and ends when the server ends the
    watch. close() (from any thread) ends it early."""

    def __init__(self, response):
        self.response = response
        self._closed = False

    def __iter__(self):
        buf = b""
        try:
            for chunk in self.response.stream(64 * 1024, decode_content=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
            if buf.strip():
                yield json.loads(buf)
        finally:
            self.close()

    def close(self):
        # a watch is never drained: its connection is dropped, not pooled.
        # shutdown() wakes a read blocked in another thread.
        if self._closed:
            return
        self._closed = True
        try:
            self.response.shutdown()
        except (RuntimeError, OSError):   # already ended and released
            pass
        self.response.close()
        self.response.release_conn()
