"""The node name the API source follows (hostnameOverride)."""

import socket

from engine.kube.source import node_name
def test_node_name():
    assert node_name("  Node-A ") == "node-a"
    assert node_name(None) == socket.gethostname().lower()
