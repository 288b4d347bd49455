"""Declarative description of what LIO should export, one class per LIO
object kind (as rtslib has them): Volume -> ``user:liverestore`` backstore,
IscsiTarget -> Tpg -> Portal / Lun / Acl (with CHAP and mapped LUNs).

``Description.from_dict`` reads the plain JSON/YAML-style form::

    {"volumes": [{"name": "vol1", "size": 1073741824}],
     "targets": [{"iqn": "iqn.2026-11.org.example:t1",
                  "tpgs": [{"tag": 1,
                            "portals": ["127.0.0.1:3260"],
                            "luns": [{"lun": 0, "volume": "vol1"}],
                            "chap": {"userid": "u", "password": "p"},
                            "acls": [{"initiator": "iqn.1994-05.com.redhat:h1",
                                      "chap": {"userid": "u", "password": "secret12345"},
                                      "mapped_luns": {"0": 0}}]}]}]}

An ACL without ``mapped_luns`` sees every LUN of the TPG at its own number.
A TPG with no ACLs runs in demo mode (generate_node_acls=1).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..iscsi.names import valid_iscsi_name

SUBTYPE = "liverestore"
DEFAULT_CONTROL = "nl_reply_supported=-1"
# LIO's own limit on backstore names; matched with fullmatch ("$" lets "\n" through).
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,128}")


class SpecError(ValueError):
    pass


@dataclass(frozen=True)
class Chap:
    userid: str
    password: str
    mutual_userid: str = ""
    mutual_password: str = ""

    @classmethod
    def from_dict(cls, d: dict | None) -> "Chap | None":
        if not d:
            return None
        c = cls(str(d["userid"]), str(d["password"]), str(d.get("mutual_userid", "")),
                str(d.get("mutual_password", "")))
        if not c.userid or not c.password:
            raise SpecError("CHAP needs userid and password")
        if bool(c.mutual_userid) != bool(c.mutual_password):
            raise SpecError("mutual CHAP needs both mutual_userid and mutual_password")
        return c


@dataclass(frozen=True)
class Volume:
    name: str
    size: int
    block_size: int = 512
    wwn: str | None = None                     # unit serial; LIO generates one if None
    hw_max_sectors: int | None = None
    control: str = DEFAULT_CONTROL
    # configfs attrib/ values to converge, e.g. (("cmd_time_out", "60"),)
    attributes: tuple[tuple[str, str], ...] = ()

    @property
    def config(self) -> str:
        return f"{SUBTYPE}/{self.name}"

    @property
    def backstore(self) -> str:
        """The configfs storage object name (under core/user_N/)."""
        return self.name

    def control_string(self) -> str:
        parts = [p for p in self.control.split(",") if p]
        if self.block_size != 512 and not any(p.startswith("hw_block_size=") for p in parts):
            parts.append(f"hw_block_size={self.block_size}")
        return ",".join(parts)

    @classmethod
    def from_dict(cls, d: dict) -> "Volume":
        v = cls(str(d["name"]), int(d["size"]), int(d.get("block_size", 512)), d.get("wwn"),
                d.get("hw_max_sectors"), d.get("control", DEFAULT_CONTROL),
                tuple(sorted((str(k), str(x)) for k, x in d.get("attributes", {}).items())))
        if not _NAME.fullmatch(v.name):
            raise SpecError(f"volume name {v.name!r}: letters, digits, _ . - only")
        if v.block_size not in (512, 1024, 2048, 4096) or v.size <= 0 or v.size % v.block_size:
            raise SpecError(f"volume {v.name}: size {v.size} must be a positive multiple of {v.block_size}")
        return v


@dataclass(frozen=True)
class Portal:
    ip: str
    port: int = 3260

    @classmethod
    def parse(cls, s) -> "Portal":
        if isinstance(s, dict):
            return cls(str(s["ip"]), int(s.get("port", 3260)))
        s = str(s)
        if s.startswith("["):                       # [v6]:port
            host, _, port = s[1:].partition("]")
            return cls(host, int(port.lstrip(":") or 3260))
        if s.count(":") == 1:
            host, port = s.split(":")
            return cls(host, int(port))
        return cls(s)


@dataclass(frozen=True)
class Lun:
    lun: int
    volume: str


@dataclass(frozen=True)
class Acl:
    initiator: str
    chap: Chap | None = None
    mapped_luns: tuple[tuple[int, int], ...] | None = None     # (mapped LUN, TPG LUN)

    @classmethod
    def from_dict(cls, d: dict) -> "Acl":
        ml = d.get("mapped_luns")
        mapped = None if ml is None else tuple(sorted((int(k), int(v)) for k, v in dict(ml).items()))
        a = cls(str(d["initiator"]), Chap.from_dict(d.get("chap")), mapped)
        if not valid_iscsi_name(a.initiator):
            raise SpecError(f"initiator name {a.initiator!r} is not an iSCSI name")
        return a


@dataclass(frozen=True)
class Tpg:
    tag: int = 1
    portals: tuple[Portal, ...] = ()
    luns: tuple[Lun, ...] = ()
    acls: tuple[Acl, ...] = ()
    chap: Chap | None = None                   # demo-mode (no ACL) CHAP
    attributes: tuple[tuple[str, str], ...] = ()

    def wanted_attributes(self) -> dict[str, str]:
        demo = not self.acls
        auth = self.chap is not None or any(a.chap for a in self.acls)
        a = {"generate_node_acls": "1" if demo else "0",
             "authentication": "1" if auth else "0",
             "demo_mode_write_protect": "0",
             "cache_dynamic_acls": "1" if demo else "0"}
        a.update(dict(self.attributes))
        return a

    @classmethod
    def from_dict(cls, d: dict) -> "Tpg":
        t = cls(int(d.get("tag", 1)),
                tuple(Portal.parse(p) for p in d.get("portals", [])),
                tuple(Lun(int(x["lun"]), str(x["volume"])) for x in d.get("luns", [])),
                tuple(Acl.from_dict(a) for a in d.get("acls", [])),
                Chap.from_dict(d.get("chap")),
                tuple(sorted((str(k), str(v)) for k, v in d.get("attributes", {}).items())))
        if len({x.lun for x in t.luns}) != len(t.luns):
            raise SpecError(f"TPG {t.tag}: duplicate LUN numbers")
        if len({a.initiator for a in t.acls}) != len(t.acls):
            raise SpecError(f"TPG {t.tag}: duplicate ACLs")
        luns = {x.lun for x in t.luns}
        for a in t.acls:
            for _m, tl in a.mapped_luns or ():
                if tl not in luns:
                    raise SpecError(f"ACL {a.initiator}: maps TPG LUN {tl} that does not exist")
        return t


@dataclass(frozen=True)
class IscsiTarget:
    iqn: str
    tpgs: tuple[Tpg, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "IscsiTarget":
        t = cls(str(d["iqn"]), tuple(Tpg.from_dict(x) for x in d.get("tpgs", [{}])))
        if not valid_iscsi_name(t.iqn):
            raise SpecError(f"target name {t.iqn!r} is not an iSCSI name")
        if len({x.tag for x in t.tpgs}) != len(t.tpgs):
            raise SpecError(f"{t.iqn}: duplicate TPG tags")
        return t


@dataclass(frozen=True)
class Description:
    volumes: tuple[Volume, ...] = ()
    targets: tuple[IscsiTarget, ...] = ()

    @classmethod
    def from_dict(cls, d: dict) -> "Description":
        desc = cls(tuple(Volume.from_dict(v) for v in d.get("volumes", [])),
                   tuple(IscsiTarget.from_dict(t) for t in d.get("targets", [])))
        names = [v.name for v in desc.volumes]
        if len(set(names)) != len(names):
            raise SpecError("duplicate volume names")
        if len({t.iqn for t in desc.targets}) != len(desc.targets):
            raise SpecError("duplicate target IQNs")
        for t in desc.targets:
            for tpg in t.tpgs:
                for lun in tpg.luns:
                    if lun.volume not in names:
                        raise SpecError(f"{t.iqn} TPG {tpg.tag} LUN {lun.lun}: unknown volume {lun.volume!r}")
        return desc

    def volume(self, name: str) -> Volume:
        return next(v for v in self.volumes if v.name == name)
