"""engine command line: run, check, demo."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from . import config as config_mod
from . import servicemap, views

log = logging.getLogger("engine")

WATCH_INTERVAL = 0.25       # seconds between checks of the watched files, without inotify
DEFAULT_SOCKET = "/run/engine/engine.sock"


def _load(path):
    cfg = config_mod.load(path)
    smap = servicemap.build(cfg)
    return cfg, smap


def cmd_check(args):
    cfg, smap = _load(args.config)
    for n in cfg.notes:
        print(f"note: {n}", file=sys.stderr)
    for w in smap.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(views.services(smap, cfg.engine.dns))
    print()
    print(views.endpoints(smap))
    return 0


def cmd_run(args):
    from .control import ControlServer, http_endpoints, raise_fd_limit
    soft, _ = raise_fd_limit()
    config_mod.PARSE_IN_CHILD = True     # large YAML never parsed beside the fast path
    log.info("descriptor limit %d", soft)
    from .proxier import Engine
    cache = config_mod.FileCache()
    cfg = config_mod.load(args.config, cache=cache)
    if args.control_socket:
        cfg.engine.control_socket = args.control_socket
    if args.state_file:
        cfg.engine.state_file = args.state_file
    if args.kubeconfig:
        cfg.engine.kubeconfig = os.path.abspath(args.kubeconfig)
    if args.hostname_override:
        cfg.engine.hostname_override = args.hostname_override.strip().lower()
    for n in cfg.notes:
        log.info("%s", n)
    eng = Engine(cfg, file_cache=cache)
    stop = threading.Event()
    reload_ = threading.Event()
    wake = threading.Event()            # the main loop acts on a signal at once
    signal.signal(signal.SIGTERM, lambda *a: (stop.set(), wake.set()))
    signal.signal(signal.SIGINT, lambda *a: (stop.set(), wake.set()))
    signal.signal(signal.SIGHUP, lambda *a: (reload_.set(), wake.set()))
    servers = []
    watcher = None
    api = None

    def reload(why, noticed=None, paths=None):
        try:
            eng.reload(noticed=noticed, paths=paths)
            log.info("reloaded %s (%s)", args.config, why)
        except config_mod.ConfigError as e:
            log.error("reload refused, running table unchanged: %s", e)

    try:
        servers += http_endpoints(eng, cfg.engine.healthz_bind_address, cfg.engine.metrics_bind_address)
        eng.start()
        api = _start_api_source(eng, cfg, args.config)
        if cfg.engine.control_socket:
            servers.append(ControlServer(eng, cfg.engine.control_socket).start())
        try:
            from .watch import FileWatcher
            watcher = FileWatcher(eng.watched, lambda noticed, paths: reload("files changed", noticed, paths)).start()
        except (ImportError, OSError) as e:
            log.warning("no inotify (%s): watching the files by polling every %.2f s", e, WATCH_INTERVAL)
        log.info("engine running (pid %d); SIGTERM or SIGINT stops it, SIGHUP reloads", os.getpid())
        while not stop.is_set():
            wake.wait(WATCH_INTERVAL if watcher is None else 1.0)
            wake.clear()
            if reload_.is_set():
                reload_.clear()
                reload("SIGHUP")
            elif watcher is None:
                try:
                    if eng.watch_once():
                        log.info("reloaded %s (files changed)", args.config)
                except config_mod.ConfigError as e:
                    log.error("reload refused, running table unchanged: %s", e)
            eng.snapshot_if_due()
    finally:
        if api is not None:
            api.stop()
        if watcher is not None:
            watcher.close()
        for srv in servers:
            srv.close()
        eng.stop()
        log.info("engine stopped; TUN, routes and sysctls restored")
    return 0


def _start_api_source(eng, cfg, config_path):
    """Follow an API server when clientConnection.kubeconfig (or
    --kubeconfig) names one, or in a pod (the service-account config)."""
    kubeconfig = cfg.engine.kubeconfig
    if not kubeconfig and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return None
    from .kube.feed import EngineFeed
    from .kube.source import ApiSource
    if kubeconfig and not os.path.isabs(kubeconfig):     # relative to the configuration, as manifests
        kubeconfig = os.path.join(os.path.dirname(os.path.abspath(config_path)), kubeconfig)
    pools = [cfg.engine.load_balancer_cidr] if cfg.engine.load_balancer_cidr else []
    feed = EngineFeed(eng, on_node=eng.set_api_node_addresses, lb_pools=pools)
    source = ApiSource.from_config(kubeconfig, cfg.engine.hostname_override, feed,
                                   resync_period=cfg.engine.config_sync_period)
    eng.api = source
    parts = [source]
    if pools:
        # one engine of the cluster allocates LoadBalancer IPs and writes them to status
        from .kube.lbstatus import StatusWriter
        from .kube.lease import LeaderElector
        elector = LeaderElector(source.client, lease_namespace(), "engine-lb-ipam", source.node,
                                on_started_leading=lambda: writer.changed())
        writer = StatusWriter(source.client, source.reflector("Service").snapshot, pools, elector)
        feed.on_service = writer.changed
        eng.lb_elector = elector
        parts = [elector, writer] + parts
    source.start()
    for p in parts[:-1]:
        p.start()
    log.info("following the API server %s as node %s", source.client.config.server, source.node)
    return _Parts(*parts)


def lease_namespace():
    """The pod's namespace in a cluster, else kube-system (deploy/rbac.yaml)."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or "kube-system"
    except OSError:
        return os.environ.get("ENGINE_LEASE_NAMESPACE", "kube-system")


class _Parts:
    def __init__(self, *parts):
        self.parts = parts

    def stop(self):
        for p in self.parts:
            p.stop()


def _control(args, req):
    from .control import request
    try:
        resp = request(args.socket, req)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"error: no engine is listening on {args.socket}", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"error: {args.socket}: permission denied (the control socket is root-only)", file=sys.stderr)
        return 1
    if not resp.get("ok"):
        print(f"error: {resp.get('error')}", file=sys.stderr)
        return 1
    print(resp["text"])
    return 0


def _read_file(path):
    if path == "-":
        return sys.stdin.read(), "<stdin>"
    with open(path, encoding="utf-8") as f:
        return f.read(), os.path.abspath(path)


def cmd_get(args):
    return _control(args, {"cmd": "get", "what": args.resource})


def cmd_describe(args):
    if args.resource not in ("svc", "service", "services"):
        print(f"error: can describe svc only, not {args.resource!r}", file=sys.stderr)
        return 1
    return _control(args, {"cmd": "describe", "name": args.name, "namespace": args.namespace})


def cmd_conntrack(args):
    filters = {k: getattr(args, k) for k in ("proto", "src", "dst", "sport", "dport", "service")
               if getattr(args, k) is not None}
    return _control(args, {"cmd": "conntrack", "filters": filters})


def cmd_stats(args):
    return _control(args, {"cmd": "stats"})


def cmd_apply(args, delete=False):
    try:
        text, name = _read_file(args.filename)
    except OSError as e:
        print(f"error: {args.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except UnicodeDecodeError as e:
        print(f"error: {args.filename}: not UTF-8 text: {e}", file=sys.stderr)
        return 1
    return _control(args, {"cmd": "delete" if delete else "apply", "text": text, "name": name})


def cmd_demo(args):
    from .lab.demo import run_demo
    return run_demo(requests=args.requests)


def _version():
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("engine")
    except PackageNotFoundError:   # run from a checkout that was never installed
        return "unknown (not installed: run scripts/setup.sh)"


def main(argv=None):
    p = argparse.ArgumentParser(prog="engine", description="Kubernetes Service load balancer on a TUN device")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version="engine " + _version())
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the engine in the foreground")
    r.add_argument("config")
    r.add_argument("--control-socket", help="overrides controlSocket of the configuration")
    r.add_argument("--state-file", help="overrides stateFile of the configuration")
    r.add_argument("--kubeconfig", help="follow this API server (overrides clientConnection.kubeconfig)")
    r.add_argument("--hostname-override", help="this node's name (overrides hostnameOverride)")
    c = sub.add_parser("check", help="validate a configuration and print the resolved table")
    c.add_argument("config")
    d = sub.add_parser("demo", help="play the seed walkthrough in a namespace lab")
    d.add_argument("--requests", type=int, default=60)

    def control_parser(name, help_):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("--socket", default=DEFAULT_SOCKET, help="control socket of the running engine")
        return sp
    g = control_parser("get", "list services or endpoints (kubectl get)")
    g.add_argument("resource", choices=["svc", "service", "services", "endpoints", "ep"])
    ds = control_parser("describe", "show one service in detail (kubectl describe)")
    ds.add_argument("resource")
    ds.add_argument("name")
    ds.add_argument("-n", "--namespace", default="default")
    ct = control_parser("conntrack", "list tracked flows (conntrack -L)")
    ct.add_argument("-p", "--proto", choices=["tcp", "udp"])
    ct.add_argument("-s", "--src")
    ct.add_argument("-d", "--dst")
    ct.add_argument("--sport", type=int)
    ct.add_argument("--dport", type=int)
    ct.add_argument("--service", help="namespace/name[:port] prefix")
    control_parser("stats", "fast-path counters")
    ap = control_parser("apply", "create or replace objects in the running engine")
    ap.add_argument("-f", "--filename", required=True)
    de = control_parser("delete", "remove objects from the running engine")
    de.add_argument("-f", "--filename", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return {"run": cmd_run, "check": cmd_check, "demo": cmd_demo, "get": cmd_get,
                "describe": cmd_describe, "conntrack": cmd_conntrack, "stats": cmd_stats,
                "apply": cmd_apply, "delete": lambda a: cmd_apply(a, delete=True)}[args.cmd](args)
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"error: {e} (engine run needs root: CAP_NET_ADMIN)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
