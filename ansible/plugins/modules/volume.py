#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liverestore contributors
# Apache License 2.0 (see the liverestore repository)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: volume
short_description: Manage liverestore volumes (image files, block devices, Ceph RBD images)
version_added: "0.1.0"
description:
  - Creates or forgets a volume of the liverestore daemon through its control socket.
  - A volume is a new image file of a given size, or an existing file or block device, or a
    Ceph RBD image (I(rbd)).
  - An existing file or block device is adopted exactly as it is; its size is the volume's
    and is never changed (I(size), if given, must be that size).
  - liverestore never shrinks or moves a volume; asking for a different size or path of an
    existing volume fails instead of silently doing nothing, unless I(grow) asks to grow it.
  - Forgetting a volume leaves its image file in place.
options:
  name:
    description: "Volume name: 1-64 of letters, digits and C(_), C(.), C(:), C(-)."
    type: str
    required: true
  state:
    description: Whether the volume should exist.
    type: str
    choices: [present, absent]
    default: present
  size:
    description:
      - Size of a new image file, in bytes or with a unit, e.g. C(512M), C(10G).
      - Required to create a volume whose I(path) does not exist yet.
    type: str
  path:
    description:
      - Image file or block device; by default a file in the daemon's state directory.
      - A relative path is taken relative to the module's working directory on the managed host.
    type: path
  rbd:
    description:
      - A Ceph RBD image, C(POOL/IMAGE), instead of a I(path); created with I(size) if it does
        not exist, else adopted at its own size (never resized on adoption).
      - Pool and image names are letters, digits, C(_), C(.), C(-); passed to the daemon as
        written (no path handling).
    type: str
  ceph_conf:
    description: With I(rbd), the cluster's C(ceph.conf) (C(/etc/ceph/ceph.conf) if not given).
    type: path
  ceph_id:
    description: With I(rbd), the Ceph client id (C(admin) if not given).
    type: str
  grow:
    description:
      - Grow an existing volume to a larger I(size) (C(liverestore volume resize)). Never shrinks;
        a block device must have been grown first; not while the volume is in a pair.
    type: bool
    default: false
  extent_size:
    description:
      - Default extent size of pairs made of this volume (power of two, 4K to 64M).
      - C(64K) when a volume is created without it; not checked on an existing volume unless given.
    type: str
notes:
  - Supports check mode and diff mode.
extends_documentation_fragment:
  - liverestore.storage.daemon
author:
  - liverestore contributors
"""

EXAMPLES = r"""
- name: A 10 GiB database volume in the state directory
  liverestore.storage.volume:
    name: db1
    size: 10G

- name: Adopt an existing block device
  liverestore.storage.volume:
    name: db1-clone
    path: /dev/vg0/db1-clone

- name: The clone on Ceph, a new 10 GiB RBD image
  liverestore.storage.volume:
    name: db1-clone
    rbd: rbd/db1-clone
    size: 10G

- name: Grow db1 to 20 GiB
  liverestore.storage.volume:
    name: db1
    size: 20G
    grow: true

- name: Forget a volume (the file stays)
  liverestore.storage.volume:
    name: old
    state: absent
"""

RETURN = r"""
volume:
  description: The volume as the daemon describes it (absent after deletion).
  returned: when state is present
  type: dict
  sample:
    name: db1
    path: /var/lib/liverestore/volumes/db1.img
    size: 10737418240
    extent_size: 65536
    kind: file
    role: source
    access: read-write
    exported_by: iqn.2026-11.com.example:db
    pairs: [db1-clone]
"""

import os

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.liverestore.storage.plugins.module_utils.liverestore import (
    Client, LiverestoreError, common_argument_spec, exit_absent, find, parse_size)


def main():
    spec = common_argument_spec()
    spec.update(
        name=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        size=dict(type="str"),
        path=dict(type="path"),
        rbd=dict(type="str"),
        ceph_conf=dict(type="path"),
        ceph_id=dict(type="str"),
        extent_size=dict(type="str"),
        grow=dict(type="bool", default=False),
    )
    module = AnsibleModule(argument_spec=spec, supports_check_mode=True,
                           mutually_exclusive=[("path", "rbd")],
                           required_by={"ceph_conf": "rbd", "ceph_id": "rbd"})
    p = module.params
    try:
        want_size = parse_size(p["size"]) if p["size"] else None
        want_es = parse_size(p["extent_size"]) if p["extent_size"] else None
    except ValueError as e:
        module.fail_json(msg=str(e))
    # the daemon refuses relative paths: resolve them here, where they were meant
    path = os.path.abspath(p["path"]) if p["path"] else None
    rbd = _rbd_args(p)
    client = Client(p["socket"], p["timeout"])
    try:
        cur = find(client.call("volume.list"), "name", p["name"])
        before = _view(cur)
        if p["state"] == "absent":
            exit_absent(module, client, cur, before, "volume.delete", name=p["name"])
        if cur is not None:
            problems = []
            grow = p["grow"] and want_size is not None and want_size > cur["size"]
            if want_size is not None and want_size != cur["size"] and not grow:
                problems.append("is %d bytes, not %d (liverestore does not resize volumes but "
                                "grows them with grow=true; it never shrinks one)"
                                % (cur["size"], want_size))
            if path and os.path.realpath(path) != cur["path"]:
                problems.append("is at %s, not %s" % (cur["path"], path))
            if rbd and cur["path"] != _rbd_location(rbd):
                problems.append("is at %s, not %s" % (cur["path"], _rbd_location(rbd)))
            if want_es is not None and want_es != cur["extent_size"]:
                problems.append("has extent size %d, not %d" % (cur["extent_size"], want_es))
            if problems:
                module.fail_json(msg="volume %s %s; delete and recreate it to change that"
                                 % (p["name"], "; ".join(problems)), volume=cur)
            if grow:
                after = dict(before, size=want_size)
                if module.check_mode:
                    module.exit_json(changed=True, diff=dict(before=before, after=after))
                vol = client.call("volume.resize", name=p["name"], size=want_size)
                module.exit_json(changed=True, volume=vol,
                                 diff=dict(before=before, after=_view(vol)))
            module.exit_json(changed=False, volume=cur)
        after = dict(name=p["name"], size=want_size,
                     path=_rbd_location(rbd) if rbd else path,
                     extent_size=want_es or parse_size(DEFAULT_EXTENT))
        if module.check_mode:
            module.exit_json(changed=True, diff=dict(before={}, after=after))
        vol = client.call("volume.create", name=p["name"], size=p["size"], path=path,
                          extent_size=p["extent_size"] or DEFAULT_EXTENT, **rbd)
        module.exit_json(changed=True, volume=vol, diff=dict(before={}, after=_view(vol)))
    except LiverestoreError as e:
        module.fail_json(msg=str(e))
    finally:
        client.close()


DEFAULT_EXTENT = "64K"
# The daemon's defaults for an RBD image that names no ceph.conf or client.
DEFAULT_CEPH_CONF = "/etc/ceph/ceph.conf"
DEFAULT_CEPH_ID = "admin"


def _rbd_args(p):
    """The RBD image as given (its names are not paths), the conf made absolute."""
    if not p["rbd"]:
        return {}
    return dict(rbd=p["rbd"], ceph_conf=os.path.abspath(p["ceph_conf"] or DEFAULT_CEPH_CONF),
                ceph_id=p["ceph_id"] or DEFAULT_CEPH_ID)


def _rbd_location(rbd):
    """How the daemon records an RBD volume's place (its path)."""
    return "rbd:%s:conf=%s:id=%s" % (rbd["rbd"], rbd["ceph_conf"], rbd["ceph_id"])


def _view(v):
    if v is None:
        return {}
    return dict(name=v["name"], size=v["size"], path=v["path"], extent_size=v["extent_size"])


if __name__ == "__main__":
    main()
