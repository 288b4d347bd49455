#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: liverestore contributors
# Apache License 2.0 (see the liverestore repository)
from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: export
short_description: Manage liverestore iSCSI targets (LUNs, ACL, CHAP)
version_added: "0.1.0"
description:
  - Creates, updates or removes an iSCSI target of the liverestore daemon through its
    control socket, with the volumes it exports as LUNs, the initiators allowed to log in
    and CHAP authentication.
  - The daemon never reveals CHAP secrets, so an existing secret cannot be compared; see
    I(update_secret).
options:
  iqn:
    description: The target's iSCSI name, e.g. C(iqn.2026-11.com.example:db).
    type: str
    required: true
  state:
    description: Whether the target should exist.
    type: str
    choices: [present, absent]
    default: present
  luns:
    description:
      - "LUN number to volume name, e.g. C({0: db1, 1: db1-clone}). When given, exactly these
        LUNs are exported; omitted, the LUNs are left as they are."
    type: dict
  acl:
    description:
      - Initiator iSCSI names allowed to log in. An empty list allows any initiator.
        Omitted, the ACL is left as it is.
    type: list
    elements: str
  chap_user:
    description:
      - CHAP user name initiators log in as. An empty string turns CHAP (and mutual CHAP) off.
        Omitted, CHAP is left as it is.
    type: str
  chap_secret:
    description: CHAP secret, 12 to 255 characters. Never logged or returned.
    type: str
  mutual_user:
    description: User name the target answers mutual CHAP as (needs CHAP).
    type: str
  mutual_secret:
    description: Mutual CHAP secret, 12 to 255 characters, different from I(chap_secret).
    type: str
  update_secret:
    description:
      - C(on_create) sets the secrets only when the target is created or when the CHAP user
        changes; C(always) sends them on every run (which then always reports a change,
        since the daemon cannot be asked whether they differ).
    type: str
    choices: [on_create, always]
    default: on_create
  force:
    description:
      - With I(state=absent), remove the target even while initiators are logged in (they
        lose their disks). Without it the daemon refuses and names them.
    type: bool
    default: false
notes:
  - Supports check mode and diff mode; secrets appear in neither output nor diff.
extends_documentation_fragment:
  - liverestore.storage.daemon
author:
  - liverestore contributors
"""

EXAMPLES = r"""
- name: Export the source and its clone to one host, with CHAP
  liverestore.storage.export:
    iqn: iqn.2026-11.com.example:db
    luns:
      0: db1
      1: db1-clone
    acl:
      - iqn.1994-05.com.redhat:db-host
    chap_user: dbhost
    chap_secret: "{{ vault_chap_secret }}"

- name: Remove the target (the volumes stay)
  liverestore.storage.export:
    iqn: iqn.2026-11.com.example:db
    state: absent
"""

RETURN = r"""
export:
  description: The target as the daemon describes it; CHAP secrets are masked.
  returned: when state is present
  type: dict
  sample:
    iqn: iqn.2026-11.com.example:db
    luns: {"0": db1, "1": db1-clone}
    acl: [iqn.1994-05.com.redhat:db-host]
    tpgt: 1
    chap: {user: dbhost, secret: "********"}
    mutual_chap: null
    portals: ["0.0.0.0:3260"]
"""

from ansible.module_utils.basic import AnsibleModule
from ansible_collections.liverestore.storage.plugins.module_utils.liverestore import (
    Client, LiverestoreError, common_argument_spec, exit_absent, find)


def _view(e):
    """What diff mode shows: never a secret."""
    if not e:
        return {}
    return dict(iqn=e["iqn"], luns=dict(e["luns"]), acl=e.get("acl"),
                chap_user=(e.get("chap") or {}).get("user"),
                mutual_user=(e.get("mutual_chap") or {}).get("user"))


def wanted_changes(p, cur):
    """The export.update arguments that make `cur` what the parameters ask."""
    out = {}
    if p["luns"] is not None:
        luns = dict((str(k), v) for k, v in p["luns"].items())
        if luns != dict(cur["luns"]):
            out["luns"] = luns
    if p["acl"] is not None:
        acl = sorted(p["acl"]) or None
        if acl != (sorted(cur["acl"]) if cur.get("acl") else None):
            out["acl"] = acl
    if p["chap_user"] is not None:
        user = (cur.get("chap") or {}).get("user")
        if p["chap_user"] == "":
            if user is not None or cur.get("mutual_chap"):
                out.update(chap_user=None, chap_secret=None, mutual_user=None,
                           mutual_secret=None)
            return out
        if p["chap_user"] != user:
            out["chap_user"] = p["chap_user"]
            if p["chap_secret"] is not None:
                out["chap_secret"] = p["chap_secret"]
        elif p["update_secret"] == "always" and p["chap_secret"] is not None:
            out["chap_secret"] = p["chap_secret"]
    if p["mutual_user"] is not None:
        muser = (cur.get("mutual_chap") or {}).get("user")
        if p["mutual_user"] == "":
            if muser is not None:
                out.update(mutual_user=None, mutual_secret=None)
        elif p["mutual_user"] != muser:
            out["mutual_user"] = p["mutual_user"]
            if p["mutual_secret"] is not None:
                out["mutual_secret"] = p["mutual_secret"]
        elif p["update_secret"] == "always" and p["mutual_secret"] is not None:
            out["mutual_secret"] = p["mutual_secret"]
    return out


def main():
    spec = common_argument_spec()
    spec.update(
        iqn=dict(type="str", required=True),
        state=dict(type="str", choices=["present", "absent"], default="present"),
        luns=dict(type="dict"),
        acl=dict(type="list", elements="str"),
        chap_user=dict(type="str"),
        chap_secret=dict(type="str", no_log=True),
        mutual_user=dict(type="str"),
        mutual_secret=dict(type="str", no_log=True),
        update_secret=dict(type="str", choices=["on_create", "always"], default="on_create",
                           no_log=False),
        force=dict(type="bool", default=False),
    )
    module = AnsibleModule(
        argument_spec=spec, supports_check_mode=True,
        required_by=dict(chap_secret="chap_user", mutual_user="chap_user",
                         mutual_secret="mutual_user"),
    )
    p = module.params
    for lun in (p["luns"] or {}):
        if not str(lun).isdigit():
            module.fail_json(msg="luns: keys are LUN numbers (0-16383), not %r" % (lun,))
    client = Client(p["socket"], p["timeout"])
    try:
        cur = find(client.call("export.list"), "iqn", p["iqn"])
        before = _view(cur)
        if p["state"] == "absent":
            exit_absent(module, client, cur, before, "export.delete", iqn=p["iqn"],
                        force=p["force"])
        if cur is None:
            if p["chap_user"] and not p["chap_secret"]:
                module.fail_json(msg="chap_user needs chap_secret to create the target")
            args = dict(iqn=p["iqn"], luns=dict((str(k), v) for k, v in
                                                (p["luns"] or {}).items()),
                        acl=p["acl"] or None, chap_user=p["chap_user"] or None,
                        chap_secret=p["chap_secret"] if p["chap_user"] else None,
                        mutual_user=p["mutual_user"] or None,
                        mutual_secret=p["mutual_secret"] if p["mutual_user"] else None)
            after = dict(iqn=p["iqn"], luns=args["luns"], acl=args["acl"],
                         chap_user=args["chap_user"], mutual_user=args["mutual_user"])
            if module.check_mode:
                module.exit_json(changed=True, diff=dict(before={}, after=after))
            e = client.call("export.create", **args)
            if e.get("warning"):
                module.warn(e["warning"])
            module.exit_json(changed=True, export=e, diff=dict(before={}, after=_view(e)))
        changes = wanted_changes(p, cur)
        if not changes:
            module.exit_json(changed=False, export=cur)
        after = dict(before)
        for k in ("luns", "acl", "chap_user", "mutual_user"):
            if k in changes:
                after[k] = changes[k]
        if module.check_mode:
            module.exit_json(changed=True, diff=dict(before=before, after=after))
        e = client.call("export.update", iqn=p["iqn"], **changes)
        module.exit_json(changed=True, export=e, diff=dict(before=before, after=_view(e)))
    except LiverestoreError as e:
        module.fail_json(msg=str(e))
    finally:
        client.close()


if __name__ == "__main__":
    main()
