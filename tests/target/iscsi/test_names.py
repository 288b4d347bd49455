"""The one iSCSI-name check (target.iscsi.names) at its limits: one
printable token, fullmatch (a trailing newline is not "the end"), 223 bytes."""
from __future__ import annotations

import pytest

from target.iscsi.names import (MAX_CHAP_NAME_BYTES, MAX_ISCSI_NAME_BYTES, valid_chap_name,
                                 valid_iscsi_name)
from target.iscsi.server import IscsiTargetConfig

GOOD = ["iqn.2026-11.io.liverestore:t1", "iqn.1994-05.com.redhat:abc", "eui.0123456789ABCDEF",
        "naa.0123456789abcdef", "naa.0123456789abcdef0123456789abcdef"]
# Every way a name could break a line of SendTargets text, the shell tree or a log.
BAD_CHARS = ["\n", "\r", "\t", "\x00", "\x7f", "\x85", "\u2028", "\u2029", " ", "\x1b",
             "\ud800", "\u200b"]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name) -> None:
    assert valid_iscsi_name(name)


@pytest.mark.parametrize("bad", BAD_CHARS)
@pytest.mark.parametrize("where", ["end", "middle"])
def test_control_and_separator_characters_are_refused(bad, where) -> None:
    name = GOOD[0] + bad if where == "end" else GOOD[0][:10] + bad + GOOD[0][10:]
    assert not valid_iscsi_name(name)
    with pytest.raises(ValueError):
        IscsiTargetConfig(iqn=name, scsi_target=None)


def test_length_limit_is_223_bytes() -> None:
    head = "iqn.2026-11.io.x:"
    assert valid_iscsi_name(head + "a" * (MAX_ISCSI_NAME_BYTES - len(head)))
    assert not valid_iscsi_name(head + "a" * (MAX_ISCSI_NAME_BYTES - len(head) + 1))
    # bytes, not characters
    assert not valid_iscsi_name(head + "é" * ((MAX_ISCSI_NAME_BYTES - len(head)) // 2 + 1))


@pytest.mark.parametrize("name", ["", "iqn.", "iqn.2026-11.", "eui.0123", "naa.0123456789abcdef0",
                                  "IQN.2026-11.x", None, 5])
def test_not_names(name) -> None:
    assert not valid_iscsi_name(name)


def test_chap_names() -> None:
    assert valid_chap_name("user") and valid_chap_name("two words")
    assert valid_chap_name("u" * MAX_CHAP_NAME_BYTES)
    assert not valid_chap_name("u" * (MAX_CHAP_NAME_BYTES + 1))
    assert not valid_chap_name("")
    for bad in BAD_CHARS:
        if bad != " ":
            assert not valid_chap_name("user" + bad), repr(bad)
