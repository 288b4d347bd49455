"""The shape of everything the daemon stores or restores, as JSON Schema:
the saveconfig document, one target's stored settings and the stored
settings (today only ``portals``).

restoreconfig validates a whole document before it changes anything, and
the daemon validates each stored value when it loads it, so no value can
reach start-up that start-up cannot use. Names are checked by the one
validator of their kind (registered here as JSON Schema formats), limits
come from the constants below, which the service's own checks use too.
"""
from __future__ import annotations

from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import ValidationError, best_match

from restore_core.engine import valid_volume_name
from restore_core.stores.spec import FILE_KINDS, RBD_KIND, RbdSpec, SpecError
from restore_core.throttle import KNOBS, RETIRED_THROTTLE_KNOBS, Knob

from .errors import clip, one_line
from .iscsi.names import valid_chap_name, valid_iscsi_name
from .portals import PortalError, parse_portal

CONFIG_VERSION = 1
#: LUN numbers the front ends accept (SAM flat addressing: 14 bits).
LUN_LIMIT = 16384
TPGT_MIN, TPGT_MAX = 1, 65535
#: RFC 7143 section 12.1.3: CHAP secrets of at least 12 bytes; 255 is LIO's limit.
SECRET_MIN, SECRET_MAX = 12, 255


def _lun_number(text: object) -> bool:
    return not isinstance(text, str) or (text.isascii() and text.isdigit()
                                         and str(int(text)) == text and int(text) < LUN_LIMIT)


def _portal(value: object) -> bool:
    parse_portal(value)
    return True


FORMATS = FormatChecker(formats=())
FORMATS.checks("volume-name")(lambda v: not isinstance(v, str) or valid_volume_name(v))
FORMATS.checks("iscsi-name")(lambda v: not isinstance(v, str) or valid_iscsi_name(v))
FORMATS.checks("chap-name")(lambda v: not isinstance(v, str) or valid_chap_name(v))
FORMATS.checks("lun-number")(_lun_number)
FORMATS.checks("portal", raises=PortalError)(_portal)
FORMATS.checks("rbd-location", raises=SpecError)(
    lambda v: not isinstance(v, str) or bool(RbdSpec.parse_location(v)))

_CHAP = {"oneOf": [{"type": "null"},
                   {"type": "array", "minItems": 2, "maxItems": 2,
                    "prefixItems": [{"type": "string", "format": "chap-name"},
                                    {"type": "string", "minLength": SECRET_MIN,
                                     "maxLength": SECRET_MAX}]}]}

#: One target as the database stores it (ConfigStore.put_target).
TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["luns"],
    "additionalProperties": False,
    "properties": {
        "luns": {"type": "object", "propertyNames": {"format": "lun-number"},
                 "additionalProperties": {"type": "string", "format": "volume-name"}},
        "acl": {"oneOf": [{"type": "null"},
                          {"type": "array",
                           "items": {"type": "string", "format": "iscsi-name"}}]},
        "chap": _CHAP,
        "mutual_chap": _CHAP,
        "tpgt": {"type": "integer", "minimum": TPGT_MIN, "maximum": TPGT_MAX},
    },
}

PORTALS_SCHEMA: dict[str, Any] = {"type": "array", "minItems": 1,
                                  "items": {"type": ["string", "array"], "format": "portal"}}

#: Every setting the daemon stores, by key.
SETTINGS_SCHEMAS: dict[str, dict[str, Any]] = {"portals": PORTALS_SCHEMA}

_SIZE = {"type": "integer", "minimum": 1}


def _knob_schema(k: Knob) -> dict[str, Any]:
    """A throttle knob's range, from the one table the engine checks too."""
    return {"type": "integer", "minimum": k.lo, **({} if k.hi is None else {"maximum": k.hi})}


DOCUMENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["version"],
    "additionalProperties": False,
    "properties": {
        "version": {"const": CONFIG_VERSION},
        "portals": PORTALS_SCHEMA,
        "volumes": {"type": "array", "items": {
            "type": "object", "required": ["name", "size"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "format": "volume-name"},
                           "path": {"type": ["string", "null"], "maxLength": 4096},
                           "size": _SIZE, "extent_size": _SIZE,
                           "kind": {"enum": [*FILE_KINDS, RBD_KIND]},
                           "created_at": {"type": "number"}},
            # an RBD volume's path is its location (rbd:POOL/IMAGE:conf=..:id=..);
            # a file's is absolute: relative to what would be ambiguous here
            "if": {"properties": {"kind": {"const": RBD_KIND}}, "required": ["kind"]},
            "then": {"required": ["path"], "properties": {"path": {
                "type": "string", "pattern": "^rbd:", "format": "rbd-location"}}},
            "else": {"properties": {"path": {"pattern": "^/"}}}}},
        "pairs": {"type": "array", "items": {
            "type": "object", "required": ["source", "clone"], "additionalProperties": False,
            "properties": {"source": {"type": "string", "format": "volume-name"},
                           "clone": {"type": "string", "format": "volume-name"},
                           "extent_size": _SIZE,
                           "throttle": {"type": "object", "additionalProperties": False,
                                        "properties": {**{k.name: _knob_schema(k) for k in KNOBS},
                                                       **{k: {"type": "integer", "minimum": 0}
                                                          for k in RETIRED_THROTTLE_KNOBS}}}}}},
        # consistency groups: members are pair ids (clone names)
        "groups": {"type": "array", "items": {
            "type": "object", "required": ["name", "pairs"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "format": "volume-name"},
                           "pairs": {"type": "array", "uniqueItems": True, "maxItems": 4096,
                                     "items": {"type": "string", "format": "volume-name"}}}}},
        "targets": {"type": "object", "propertyNames": {"format": "iscsi-name"},
                    "additionalProperties": TARGET_SCHEMA},
    },
}


class InvalidConfig(ValueError):
    """A document or stored value that does not fit its schema; one line
    naming where (a JSON path) and what is wrong."""


def _validator(schema: dict[str, Any]) -> Draft202012Validator:
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=FORMATS)


_DOCUMENT = _validator(DOCUMENT_SCHEMA)
_TARGET = _validator(TARGET_SCHEMA)
_SETTINGS = {k: _validator(s) for k, s in SETTINGS_SCHEMAS.items()}


def _message(err: ValidationError, root: str) -> str:
    where = root + err.json_path.removeprefix("$")
    what = err.message
    if err.cause is not None:              # a format check's own explanation
        what = str(err.cause)
    return one_line(f"{where}: {what}", 300)


def _check(validator: Draft202012Validator, value: Any, root: str) -> None:
    err = best_match(validator.iter_errors(value))
    if err is not None:
        raise InvalidConfig(_message(err, root))


def check_document(doc: Any) -> None:
    """The whole saveconfig document, before restoreconfig changes anything."""
    if not isinstance(doc, dict) or doc.get("version") != CONFIG_VERSION:
        raise InvalidConfig(f"not a liverestore saveconfig (version {CONFIG_VERSION}) document")
    _check(_DOCUMENT, doc, "$")


def check_target(iqn: str, stored: Any) -> None:
    """One target's stored settings, as loaded from the database."""
    if not valid_iscsi_name(iqn):
        raise InvalidConfig(f"target {clip(iqn, 80)} is not an iSCSI name")
    _check(_TARGET, stored, f"target {iqn}")


def check_setting(key: str, value: Any) -> None:
    validator = _SETTINGS.get(key)
    if validator is None:
        raise InvalidConfig(f"unknown setting {clip(key, 40)}")
    _check(validator, value, f"setting {key}")
