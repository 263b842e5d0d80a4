"""Configuration helpers of the API source: Go durations (configSyncPeriod)
and the node name (hostnameOverride)."""

import socket

import pytest

from engine.kube.source import node_name, parse_duration
@pytest.mark.parametrize("text, seconds", [("15m", 900), ("1h30m", 5400), ("90s", 90), ("1.5s", 1.5),
                                           ("500ms", 0.5), (30, 30), ("45", 45), ("1m0.5s", 60.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "15 m", "m", "1d", "15m junk", "-"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_node_name():
    assert node_name("  Node-A ") == "node-a"
    assert node_name(None) == socket.gethostname().lower()
