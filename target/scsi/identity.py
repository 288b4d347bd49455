"""Who a logical unit says it is (INQUIRY / VPD 83h) and how it behaves
(block limits, caching): plain data given by the caller, validated once so
the command handlers can encode it without further checks.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

VENDOR = "LIVERST"
_HEX = re.compile(r"[0-9a-fA-F]+")      # fullmatch: "$" would let a trailing newline in


def _ascii(name: str, value: str, limit: int) -> str:
    if len(value) > limit or not value.isascii() or not value.isprintable():
        raise ValueError(f"{name} must be at most {limit} printable ASCII characters: {value!r}")
    return value


@dataclass(frozen=True)
class DeviceIdentity:
    """Identity strings of one LU.

    ``naa`` is the LU's world wide name as hex digits, optionally prefixed by
    "naa." or "0x": 16 digits starting with 5 (NAA IEEE Registered) or 32
    starting with 6 (IEEE Registered Extended). ``t10_vendor_id`` is the
    vendor-specific part of the T10 vendor ID designator (the vendor field is
    prepended). Hosts use these to recognise the same LU across paths and
    restarts, so the caller must keep them stable.
    """

    product_id: str
    revision: str
    serial: str
    naa: str
    t10_vendor_id: str
    vendor: str = VENDOR

    def __post_init__(self) -> None:
        _ascii("vendor", self.vendor, 8)
        _ascii("product_id", self.product_id, 16)
        _ascii("revision", self.revision, 4)
        _ascii("serial", self.serial, 252)
        _ascii("t10_vendor_id", self.t10_vendor_id, 240)
        digits = self.naa_bytes()
        if digits[0] >> 4 not in (5, 6):
            raise ValueError(f"naa must be NAA-5 or NAA-6: {self.naa!r}")

    def naa_bytes(self) -> bytes:
        text = self.naa.lower()
        for prefix in ("naa.", "0x"):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if not _HEX.fullmatch(text or "x"):
            raise ValueError(f"naa must be hex digits: {self.naa!r}")
        if not ((len(text) == 16 and text[0] == "5") or (len(text) == 32 and text[0] == "6")):
            raise ValueError(f"naa must be 16 hex digits (NAA-5) or 32 (NAA-6): {self.naa!r}")
        return bytes.fromhex(text)


@dataclass(frozen=True)
class DeviceOptions:
    """Behaviour knobs. Block counts default from the block size (None)."""

    write_cache: bool = True               # WCE at creation (MODE SELECT can change it)
    thin_provisioning: bool = True         # LBPME: UNMAP, WRITE SAME UNMAP, GET LBA STATUS
    max_transfer_blocks: int | None = None  # default: 32 MiB
    optimal_granularity_blocks: int | None = None  # default: 4 KiB
    max_unmap_blocks: int | None = None    # per command; default: 1 GiB, <= 2^20 blocks
    max_unmap_descriptors: int = 64
    max_write_same_blocks: int | None = None  # default: 1 GiB
    max_compare_and_write_blocks: int = 1   # VMware ATS uses one block (as LIO)
    physical_block_size: int = 4096        # reported via READ CAPACITY(16) exponent
    read_only: bool = False                # force WP even if the LunIO allows writes


@dataclass(frozen=True)
class Limits:
    """DeviceOptions resolved for one block size (all in blocks)."""

    block_size: int
    max_transfer: int
    optimal_granularity: int
    max_unmap: int
    max_unmap_descriptors: int
    max_write_same: int
    max_compare_and_write: int
    physical_exponent: int

    @classmethod
    def resolve(cls, block_size: int, opts: DeviceOptions) -> "Limits":
        if block_size not in (512, 1024, 2048, 4096):
            raise ValueError(f"block size must be 512, 1024, 2048 or 4096, not {block_size}")

        def blocks(value: int | None, default_bytes: int) -> int:
            n = value if value is not None else max(1, default_bytes // block_size)
            if not 1 <= n <= 0xFFFFFFFF:
                raise ValueError(f"block limit out of range: {n}")
            return n

        phys = max(opts.physical_block_size, block_size)
        exponent = (phys // block_size).bit_length() - 1
        if block_size << exponent != phys:
            raise ValueError("physical_block_size must be a power-of-two multiple of block size")
        if not 0 <= opts.max_compare_and_write_blocks <= 255:
            raise ValueError("max_compare_and_write_blocks must fit a byte")
        return cls(
            block_size=block_size,
            max_transfer=blocks(opts.max_transfer_blocks, 32 << 20),
            optimal_granularity=blocks(opts.optimal_granularity_blocks, 4096),
            # 1 GiB, at most 2^20 blocks (what libiscsi's sanity check allows).
            max_unmap=min(blocks(opts.max_unmap_blocks, 1 << 30), 1 << 20)
            if opts.max_unmap_blocks is None else blocks(opts.max_unmap_blocks, 0),
            max_unmap_descriptors=opts.max_unmap_descriptors,
            max_write_same=blocks(opts.max_write_same_blocks, 1 << 30),
            max_compare_and_write=opts.max_compare_and_write_blocks,
            physical_exponent=exponent,
        )
