"""engine command line: run, check, demo."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from . import config as config_mod
from . import servicemap

log = logging.getLogger("engine")


def _load(path):
    cfg = config_mod.load(path)
    smap = servicemap.build(cfg)
    return cfg, smap


def _table(rows):
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def format_services(smap):
    """One line per service, as `kubectl get svc -A` prints them."""
    rows = [("NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)")]
    for info in smap.services.values():
        s = info.svc
        if s.type == "ExternalName":
            cip, ext = "<none>", s.external_name
        else:
            cip = info.cluster_ip
            exts = ([info.ingress_ip] if info.ingress_ip else
                    ["<pending>"] if s.type == "LoadBalancer" else []) + \
                [e for e in s.external_ips if e != info.ingress_ip]
            ext = ",".join(exts) or "<none>"
        ports = ",".join(f"{p.port.port}:{p.node_port}/{p.port.protocol}" if p.node_port
                         else f"{p.port.port}/{p.port.protocol}" for p in info.ports) or "<none>"
        rows.append((s.namespace, s.name, s.type, cip, ext, ports))
    return _table(rows)


def format_endpoints(smap):
    """As `kubectl get endpoints -A`: ready addresses per service."""
    rows = [("NAMESPACE", "NAME", "ENDPOINTS")]
    for info in smap.services.values():
        if info.svc.type == "ExternalName":
            continue
        eps = []
        for p in info.ports:
            eps += [f"{e.ip}:{e.port}" for e in p.usable if f"{e.ip}:{e.port}" not in eps]
        rows.append((info.svc.namespace, info.svc.name, ",".join(eps) or "<none>"))
    return _table(rows)


def cmd_check(args):
    cfg, smap = _load(args.config)
    for n in cfg.notes:
        print(f"note: {n}", file=sys.stderr)
    for w in smap.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(format_services(smap))
    print()
    print(format_endpoints(smap))
    return 0


def cmd_run(args):
    from .control import HTTPEndpoint
    from .dataplane import Engine
    cfg = config_mod.load(args.config)
    for n in cfg.notes:
        log.info("%s", n)
    eng = Engine(cfg)
    stop = threading.Event()
    reload_ = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    signal.signal(signal.SIGHUP, lambda *a: reload_.set())
    http = []
    try:
        for bind in {cfg.engine.healthz_bind_address, cfg.engine.metrics_bind_address} - {None}:
            http.append(HTTPEndpoint(eng, bind).start())
        eng.start()
        log.info("engine running (pid %d); SIGTERM or SIGINT stops it, SIGHUP reloads", os.getpid())
        while not stop.is_set():
            stop.wait(0.5)
            if reload_.is_set():
                reload_.clear()
                try:
                    eng.sync(config_mod.load(args.config))
                    log.info("reloaded %s", args.config)
                except config_mod.ConfigError as e:
                    log.error("reload refused, running table unchanged: %s", e)
    finally:
        eng.stop()
        for h in http:
            h.close()
        log.info("engine stopped; TUN, routes and sysctls restored")
    return 0


def cmd_demo(args):
    from .demo import run_demo
    return run_demo(requests=args.requests)


def main(argv=None):
    p = argparse.ArgumentParser(prog="engine", description="Kubernetes Service load balancer on a TUN device")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the engine in the foreground")
    r.add_argument("config")
    c = sub.add_parser("check", help="validate a configuration and print the resolved table")
    c.add_argument("config")
    d = sub.add_parser("demo", help="play the seed walkthrough in a namespace lab")
    d.add_argument("--requests", type=int, default=60)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return {"run": cmd_run, "check": cmd_check, "demo": cmd_demo}[args.cmd](args)
    except config_mod.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except PermissionError as e:
        print(f"error: {e} (engine run needs root: CAP_NET_ADMIN)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
