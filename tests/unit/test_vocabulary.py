"""One vocabulary: schedulers, protocols and CIDRs are listed once, in
engine.model; the reference path and the parser agree with it."""
import pytest

from engine import config, model, refpath


def test_scheduler_ids_are_the_reference_paths():
    assert model.SCHEDULER_IDS == {"random": refpath.SCHED_RANDOM, "rr": refpath.SCHED_RR,
                                   "lc": refpath.SCHED_LC, "sh": refpath.SCHED_SH, "mh": refpath.SCHED_MH}


def test_protocol_numbers_are_the_reference_paths():
    assert (model.PROTOCOLS["TCP"], model.PROTOCOLS["UDP"], model.PROTO_ICMP) == \
        (refpath.PROTO_TCP, refpath.PROTO_UDP, refpath.PROTO_ICMP)


def test_an_unknown_scheduler_is_refused_with_the_list():
    with pytest.raises(config.ConfigError, match="one of random, rr, lc, sh, mh"):
        config.parse_text("kind: Service\nmetadata: {name: s, annotations: {engine.io/scheduler: wrr}}\n"
                          "spec: {ports: [{port: 80}]}\n", "x")


@pytest.mark.parametrize("text,want", [("10.96.1.5/12", (0x0A600000, 12)), ("1.2.3.4", (0x01020304, 32)),
                                       ("0.0.0.0/0", (0, 0))])
def test_cidr(text, want):
    assert model.cidr(text) == want
    assert model.cidr(model.cidr_text(want)) == want


@pytest.mark.parametrize("bad", ["10.96.0.0/33", "10.96/12", "x", "10.96.0.0/-1", ""])
def test_bad_cidr_is_a_value_error(bad):
    with pytest.raises(ValueError):
        model.cidr(bad)
