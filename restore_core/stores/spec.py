"""Where a volume's data lives, as the volume record persists it.

A spec is parsed from the record's (kind, path) pair and from client
input, and checked strictly on both ways in: pool, image and client names
and the ceph.conf path reach librados and qemu-style URIs, so they are
kept to characters that cannot change the meaning of either. An RBD
location is written the way qemu names one (``rbd:POOL/IMAGE:conf=PATH:
id=ID``), so an independent client can open exactly what the daemon does.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

#: The ceph.conf and client of an RBD volume that names none (Ceph's defaults).
DEFAULT_CEPH_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CEPH_ID = "admin"

#: Kinds a volume record may have; "file" and "blockdev" share one store.
FILE_KINDS = ("file", "blockdev")
RBD_KIND = "rbd"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
_CONF = re.compile(r"/[A-Za-z0-9_.+/-]{1,4095}")
RBD_NAME_HELP = ("pool and image names: letters, digits, '_', '.', '-', starting with a letter or "
                 "digit, at most 100 characters")
CONF_HELP = ("the ceph.conf path must be absolute and normalised, made of letters, digits and "
             "'_', '.', '+', '-', '/'")


class SpecError(ValueError):
    """A store spec that cannot be used; the message says which part and why."""


@dataclass(frozen=True)
class FileSpec:
    """An image file or a block device at an absolute path."""
    path: str

    @property
    def location(self) -> str:
        return self.path


@dataclass(frozen=True)
class RbdSpec:
    """A Ceph RBD image, reached with one ceph.conf and client id."""
    pool: str
    image: str
    conf: str = DEFAULT_CEPH_CONF
    client_id: str = DEFAULT_CEPH_ID

    def __post_init__(self) -> None:
        for what, value in (("pool", self.pool), ("image", self.image)):
            if not isinstance(value, str) or not _NAME.fullmatch(value):
                raise SpecError(f"bad RBD {what} name {value!r}: {RBD_NAME_HELP}")
        if not isinstance(self.client_id, str) or not _NAME.fullmatch(self.client_id):
            raise SpecError(f"bad Ceph client id {self.client_id!r}: letters, digits, '_', '.', "
                            "'-', at most 100 characters")
        if (not isinstance(self.conf, str) or not _CONF.fullmatch(self.conf)
                or os.path.normpath(self.conf) != self.conf):
            raise SpecError(f"bad ceph.conf path {self.conf!r}: {CONF_HELP}")

    @property
    def location(self) -> str:
        """The qemu-style name: what the record's path holds."""
        return f"rbd:{self.pool}/{self.image}:conf={self.conf}:id={self.client_id}"

    @property
    def image_name(self) -> str:
        return f"{self.pool}/{self.image}"

    @classmethod
    def parse_image(cls, text: object, conf: object = None, client_id: object = None) -> RbdSpec:
        """From client input: ``POOL/IMAGE`` and the optional conf and id."""
        if not isinstance(text, str) or text.count("/") != 1:
            raise SpecError(f"bad RBD image {text!r}: give POOL/IMAGE")
        pool, image = text.split("/")
        return cls(pool, image, DEFAULT_CEPH_CONF if conf in (None, "") else conf,  # type: ignore[arg-type]
                   DEFAULT_CEPH_ID if client_id in (None, "") else client_id)  # type: ignore[arg-type]

    @classmethod
    def parse_location(cls, text: str) -> RbdSpec:
        m = re.fullmatch(r"rbd:([^/:]+)/([^/:]+):conf=([^:]+):id=([^:]+)", text)
        if not m:
            raise SpecError(f"bad RBD location {text!r}: expected rbd:POOL/IMAGE:conf=PATH:id=ID")
        return cls(*m.groups())


StoreSpec = FileSpec | RbdSpec


def spec_of_record(kind: str, path: str) -> StoreSpec:
    """The spec a volume record describes (its kind and path, read back)."""
    if kind in FILE_KINDS:
        return FileSpec(path)
    if kind == RBD_KIND:
        return RbdSpec.parse_location(path)
    raise SpecError(f"unknown store kind {kind!r} (this version knows "
                    f"{', '.join(FILE_KINDS + (RBD_KIND,))})")
