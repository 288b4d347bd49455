"""Errors shared by the service and its front doors (control socket, CLI),
in their own module so a client need not import the service to catch them."""
from __future__ import annotations


class ServiceError(Exception):
    """Refused; the message says why and, where it can, what to do."""
