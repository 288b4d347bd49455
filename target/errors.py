"""Errors shared by the service and its front doors (control socket, CLI),
in their own module so a client need not import the service to catch them."""
from __future__ import annotations

# Client values in messages are cut by the one helper the logs use too.
from .logsafe import clip  # noqa: F401 - re-exported for the service's front doors


class ServiceError(Exception):
    """Refused; the message says why and, where it can, what to do."""


def one_line(text: str, n: int = 1000) -> str:
    """An error reply is one bounded line, whatever a message embeds."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."
