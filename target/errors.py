"""Errors shared by the service and its front doors (control socket, CLI),
in their own module so a client need not import the service to catch them."""
from __future__ import annotations


class ServiceError(Exception):
    """Refused; the message says why and, where it can, what to do."""


def clip(value: object, n: int = 60) -> str:
    """repr of a client-supplied value, cut to ``n`` characters: error
    messages and log lines stay bounded whatever a client sends."""
    text = repr(value)
    return text if len(text) <= n else text[:n] + "..."


def one_line(text: str, n: int = 1000) -> str:
    """An error reply is one bounded line, whatever a message embeds."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
