"""Test support, not product: the network-namespace lab of the end-to-end
tests, benchmarks and `engine demo`, with what runs inside it.

    netns.py      the lab itself (namespaces, bridges, pods, an engine in the node)
    podserver.py  the HTTP + UDP echo server of each lab pod (python -m engine.lab.podserver)
    dns.py        a small authoritative DNS server, the lab's upstream (python -m engine.lab.dns)
    demo.py       `engine demo`: the seed walkthrough played in a lab
"""

from .netns import (CLIENT_IP, NODE_IP, POD_GATEWAY, POD_NET, EngineProc, Host, Lab, LabError, Pod,
                    cleanup_stale, netns_list)

__all__ = ["CLIENT_IP", "NODE_IP", "POD_GATEWAY", "POD_NET", "EngineProc", "Host", "Lab", "LabError", "Pod",
           "cleanup_stale", "netns_list"]
