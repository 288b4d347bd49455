"""iSCSI names (RFC 7143 section 4.2.7): the one check that every entry
point uses (control API, saved configurations, the embedded target, LIO).

A name ends up in SendTargets replies, the shell tree and log lines, so it
must be one printable token: no whitespace, no control or line-separator
characters. The pattern is matched with fullmatch, never ``re.match`` with
``$``, because ``$`` also matches before a trailing newline.
"""
from __future__ import annotations

import re

#: RFC 7143 4.2.7.1: an iSCSI name is at most 223 bytes in UTF-8.
MAX_ISCSI_NAME_BYTES = 223

_ISCSI_NAME = re.compile(r"iqn\.\d{4}-\d{2}\.[^\s,]+"
                         r"|eui\.[0-9A-Fa-f]{16}"
                         r"|naa\.[0-9A-Fa-f]{16}(?:[0-9A-Fa-f]{16})?")

ISCSI_NAME_HELP = ("iqn.YYYY-MM.reverse.domain[:id], eui.<16 hex> or naa.<16|32 hex>, "
                   f"at most {MAX_ISCSI_NAME_BYTES} bytes, no spaces or control characters")


def printable_token(text: str) -> bool:
    """True when ``text`` is non-empty and has no whitespace, control,
    format, line-separator or lone-surrogate character (str.isprintable
    refuses all of those but the ASCII space)."""
    return bool(text) and text.isprintable() and " " not in text


def valid_iscsi_name(name: object) -> bool:
    return (isinstance(name, str) and printable_token(name)
            and _ISCSI_NAME.fullmatch(name) is not None
            and len(name.encode()) <= MAX_ISCSI_NAME_BYTES)


#: CHAP_N is a text value in a NUL-separated key=value list (RFC 7143 6.1);
#: 255 bytes is what Linux initiators and LIO accept.
MAX_CHAP_NAME_BYTES = 255


def valid_chap_name(name: object) -> bool:
    """A CHAP user name: printable text (spaces allowed, no control or
    line-separator characters), 1 to 255 bytes."""
    return (isinstance(name, str) and bool(name) and name.isprintable()
            and len(name.encode()) <= MAX_CHAP_NAME_BYTES)
