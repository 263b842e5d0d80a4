"""A tiny authoritative DNS server for labs and tests: the "upstream" the
engine's cluster DNS forwards to.

    python3 -m engine.lab.dns --bind 0.0.0.0 --port 53 \\
        --record google.com=A:192.168.50.80 --record www.example.org=CNAME:google.com

Types: A, AAAA, CNAME, TXT (repeat --record for several records of a name).
Answers authoritatively (AA) over UDP and TCP; follows its own CNAMEs; NODATA
for a known name without the type; NXDOMAIN for unknown names. Prints `ready`
on stdout once both sockets are bound. Stdlib + dnspython only.
"""
from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import threading

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset

TYPES = ("A", "AAAA", "CNAME", "TXT")


def parse_record(spec):
    """'name=TYPE:value' -> (dns.name.Name, rdtype, rdata)."""
    name, sep, rest = spec.partition("=")
    typ, sep2, value = rest.partition(":")
    typ = typ.strip().upper()
    if not sep or not sep2 or not name or typ not in TYPES:
        raise ValueError(f"bad --record {spec!r}: expected NAME=TYPE:VALUE with TYPE one of {', '.join(TYPES)}")
    rdtype = dns.rdatatype.from_text(typ)
    if typ == "TXT":
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    elif typ == "CNAME":
        value = value.rstrip(".") + "."
    return dns.name.from_text(name.rstrip(".") + "."), rdtype, dns.rdata.from_text(dns.rdataclass.IN, rdtype, value)


class LabDNS:
    def __init__(self, records, ttl=60):
        self.ttl = ttl
        self.table = {}            # name -> {rdtype: [rdata]}; Name hashing ignores case
        for name, rdtype, rd in records:
            self.table.setdefault(name, {}).setdefault(rdtype, []).append(rd)

    def answer(self, wire, udp=True):
        if len(wire) < 12:
            return None
        try:
            q = dns.message.from_wire(wire)
        except Exception:
            qid, flags = struct.unpack("!HH", wire[:4])
            if flags & dns.flags.QR:
                return None
            return struct.pack("!HHHHHH", qid, dns.flags.QR | (flags & 0x7900) | dns.rcode.FORMERR, 0, 0, 0, 0)
        if q.flags & dns.flags.QR:
            return None
        r = dns.message.make_response(q, recursion_available=False)
        r.flags |= dns.flags.AA
        if len(q.question) != 1:
            r.set_rcode(dns.rcode.FORMERR)
            return r.to_wire()
        qq = q.question[0]
        name, qtype, seen = qq.name, qq.rdtype, set()
        while True:
            recs = self.table.get(name)
            if recs is None:
                if not r.answer:
                    r.set_rcode(dns.rcode.NXDOMAIN)
                break
            cn = recs.get(dns.rdatatype.CNAME)
            if cn and qtype not in (dns.rdatatype.CNAME, dns.rdatatype.ANY):
                r.answer.append(self._rrset(name, dns.rdatatype.CNAME, cn[:1]))
                seen.add(name)
                name = cn[0].target
                if name in seen or name not in self.table:
                    break
                continue
            types = list(recs) if qtype == dns.rdatatype.ANY else [qtype] if qtype in recs else []
            for t in types:
                r.answer.append(self._rrset(name, t, recs[t]))
            break
        try:
            return r.to_wire(max_size=512 if udp and q.edns < 0 else max(512, q.payload) if udp else 65535)
        except dns.exception.TooBig:
            r.answer = []
            r.flags |= dns.flags.TC
            return r.to_wire()

    def _rrset(self, name, rdtype, rds):
        rr = dns.rrset.RRset(name, dns.rdataclass.IN, rdtype)
        for rd in rds:
            rr.add(rd, self.ttl)
        return rr


def serve(lab, bind, port, ready_out=sys.stdout):
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((bind, port))
    port = udp.getsockname()[1]
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((bind, port))
    tcp.listen(64)

    def udp_loop():
        while True:
            try:
                wire, addr = udp.recvfrom(65535)
            except OSError:
                continue
            out = lab.answer(wire, udp=True)
            if out:
                try:
                    udp.sendto(out, addr)
                except OSError:
                    pass

    def conn_loop(c):
        c.settimeout(10)
        try:
            while True:
                hdr = c.recv(2, socket.MSG_WAITALL)
                if len(hdr) < 2:
                    return
                n = struct.unpack("!H", hdr)[0]
                wire = c.recv(n, socket.MSG_WAITALL) if n else b""
                if len(wire) < n or n == 0:
                    return
                out = lab.answer(wire, udp=False)
                if out:
                    c.sendall(struct.pack("!H", len(out)) + out)
        except OSError:
            pass
        finally:
            c.close()

    def tcp_loop():
        while True:
            try:
                c, _ = tcp.accept()
            except OSError:
                continue
            threading.Thread(target=conn_loop, args=(c,), daemon=True).start()

    for f in (udp_loop, tcp_loop):
        threading.Thread(target=f, daemon=True).start()
    print("ready", file=ready_out, flush=True)
    return port


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m engine.lab.dns", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bind", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=53)
    ap.add_argument("--ttl", type=int, default=60)
    ap.add_argument("--record", action="append", default=[], metavar="NAME=TYPE:VALUE")
    args = ap.parse_args(argv)
    try:
        records = [parse_record(r) for r in args.record]
    except (ValueError, dns.exception.DNSException) as e:
        ap.error(str(e))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    serve(LabDNS(records, args.ttl), args.bind, args.port)
    stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
