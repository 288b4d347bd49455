"""Operational key negotiation rules (RFC 7143 section 13 result functions)."""
import pytest

from target.iscsi.params import (Negotiator, TargetPreferences, TextError, encode_text, parse_text)

PREFS = TargetPreferences(max_recv_data_segment_length=262144, max_burst_length=1048576,
                          first_burst_length=262144, immediate_data=True, initial_r2t=False,
                          max_outstanding_r2t=16, default_time2wait=2, default_time2retain=0)

TABLE = [
    # key, initiator value, our answer, attribute, resulting value
    ("MaxBurstLength", "262144", "262144", "max_burst_length", 262144),
    ("MaxBurstLength", "16776192", "1048576", "max_burst_length", 1048576),
    ("MaxBurstLength", "100", "Reject", "max_burst_length", 262144),          # below 512
    ("MaxBurstLength", "abc", "Reject", "max_burst_length", 262144),
    ("FirstBurstLength", "65536", "65536", "first_burst_length", 65536),
    ("FirstBurstLength", "0x100000", "262144", "first_burst_length", 262144),   # hex accepted
    ("MaxOutstandingR2T", "1", "1", "max_outstanding_r2t", 1),
    ("MaxOutstandingR2T", "64", "16", "max_outstanding_r2t", 16),
    ("MaxConnections", "8", "1", "max_connections", 1),
    ("ErrorRecoveryLevel", "2", "0", "error_recovery_level", 0),
    ("DefaultTime2Wait", "0", "2", "default_time2wait", 2),                    # max()
    ("DefaultTime2Wait", "5", "5", "default_time2wait", 5),
    ("DefaultTime2Retain", "20", "0", "default_time2retain", 0),               # min()
    ("InitialR2T", "Yes", "Yes", "initial_r2t", True),                         # OR
    ("InitialR2T", "No", "No", "initial_r2t", False),
    ("ImmediateData", "No", "No", "immediate_data", False),                    # AND
    ("ImmediateData", "Yes", "Yes", "immediate_data", True),
    ("ImmediateData", "maybe", "Reject", "immediate_data", True),
    ("DataPDUInOrder", "No", "Yes", "data_pdu_in_order", True),                # OR with our Yes
    ("DataSequenceInOrder", "No", "Yes", "data_sequence_in_order", True),
    ("HeaderDigest", "CRC32C,None", "CRC32C", "header_digest", True),
    ("HeaderDigest", "None,CRC32C", "None", "header_digest", False),
    ("DataDigest", "CRC32C", "CRC32C", "data_digest", True),
    ("DataDigest", "MD5", "Reject", "data_digest", False),
    ("IFMarker", "Yes", "No", None, None),
    ("OFMarker", "No", "No", None, None),
    ("IFMarkInt", "2048~8192", "Irrelevant", None, None),
    ("X-com.example.Foo", "bar", "NotUnderstood", None, None),
    ("FooBar", "1", "NotUnderstood", None, None),
    ("TargetAlias", "x", "Reject", None, None),                              # target-only key
]


@pytest.mark.parametrize("key,value,answer,attr,result", TABLE)
def test_negotiation_table(key, value, answer, attr, result):
    n = Negotiator(PREFS)
    assert n.offer([(key, value)]) == [(key, answer)]
    if attr:
        assert getattr(n.params, attr) == result


def test_mrdsl_is_declarative_both_ways():
    n = Negotiator(PREFS)
    assert n.offer([("MaxRecvDataSegmentLength", "8192")]) == [("MaxRecvDataSegmentLength", "262144")]
    assert n.params.initiator_mrdsl == 8192        # what we may send
    assert n.params.target_mrdsl == 262144         # what we accept
    assert n.finish() == []                        # already declared


def test_mrdsl_declared_at_end_if_initiator_silent():
    n = Negotiator(PREFS)
    n.offer([("HeaderDigest", "None")])
    assert n.finish() == [("MaxRecvDataSegmentLength", "262144")]
    assert n.params.initiator_mrdsl == 8192        # RFC default


def test_defaults_when_not_negotiated():
    n = Negotiator(PREFS)
    n.finish()
    p = n.params
    assert (p.initial_r2t, p.immediate_data, p.max_burst_length, p.first_burst_length,
            p.max_outstanding_r2t, p.header_digest, p.data_digest) == (True, True, 262144, 65536, 1,
                                                                        False, False)


def test_first_burst_never_exceeds_max_burst():
    n = Negotiator(PREFS)
    out = dict(n.offer([("MaxBurstLength", "65536"), ("FirstBurstLength", "262144")]))
    assert out == {"MaxBurstLength": "65536", "FirstBurstLength": "65536"}
    n = Negotiator(PREFS)
    n.offer([("FirstBurstLength", "200000"), ("MaxBurstLength", "65536")])
    n.finish()
    assert n.params.first_burst_length == 65536


def test_declaratives_and_session_type():
    n = Negotiator(PREFS)
    out = n.offer([("InitiatorName", "iqn.2025-01.org.x:i"), ("InitiatorAlias", "host"),
                   ("SessionType", "Discovery"), ("TargetName", "iqn.2025-01.org.x:t")])
    assert out == []
    assert n.params.session_type == "Discovery"
    assert n.params.initiator_name == "iqn.2025-01.org.x:i"
    assert n.offer([("SessionType", "Weird")]) == [("SessionType", "Reject")]


def test_key_negotiated_twice_is_an_error():
    n = Negotiator(PREFS)
    n.offer([("MaxBurstLength", "65536")])
    n.offer([("MaxBurstLength", "8192")])
    assert n.errors and n.params.max_burst_length == 65536


def test_answers_to_our_proposals_get_no_reply():
    n = Negotiator(PREFS)
    assert n.offer([("Foo", "NotUnderstood"), ("Bar", "Irrelevant")]) == []


def test_digest_policy_can_require_crc():
    n = Negotiator(TargetPreferences(header_digests=("CRC32C",)))
    assert n.offer([("HeaderDigest", "None")]) == [("HeaderDigest", "Reject")]


def test_text_codec():
    raw = b"A=1\0B=x,y\0Empty=\0"
    assert parse_text(raw) == [("A", "1"), ("B", "x,y"), ("Empty", "")]
    assert encode_text([("A", "1"), ("B", "x,y"), ("Empty", "")]) == raw
    assert parse_text(b"A=1") == [("A", "1")]           # last NUL may be missing
    for bad in (b"novalue\0", b"=v\0", b"k" * 64 + b"=1\0", b"b\xffd=1\0", b"sp ace=1\0"):
        with pytest.raises(TextError):
            parse_text(bad)
