"""Description -> LIO plan, without a kernel: plans are checked directly and
by carrying them out on a LioState the way LIO would (a LUN takes its
mapped LUNs with it, a backstore its LUNs, a target its TPGs)."""
from __future__ import annotations

import copy

import pytest

from target.lio.plan import converge as converge_from, skipped_mappings
from target.lio.plan import AclState, BackstoreState, LioState, TpgState, plan, plan_teardown
from target.lio.spec import Chap, Description, Portal, SpecError

IQN = "iqn.2026-11.org.liverestore:t1"
HOST = "iqn.1994-05.com.redhat:host1"
HOST2 = "iqn.1994-05.com.redhat:host2"


def desc(**over) -> Description:
    d = {"volumes": [{"name": "vol1", "size": 64 << 20}, {"name": "vol2", "size": 32 << 20}],
         "targets": [{"iqn": IQN, "tpgs": [{
             "tag": 1, "portals": ["127.0.0.1:3260"],
             "luns": [{"lun": 0, "volume": "vol1"}, {"lun": 1, "volume": "vol2"}],
             "acls": [{"initiator": HOST, "chap": {"userid": "host1", "password": "secretsecret1"}}]}]}]}
    d.update(over)
    return Description.from_dict(d)


def simulate(state: LioState, changes) -> LioState:
    s = copy.deepcopy(state)

    def tpg(iqn, tag):
        return s.targets[iqn][tag]

    for c in changes:
        a = c.args
        if c.action == "create_backstore":
            v = a[0]
            ref = f"user:{v.backstore}"
            assert ref not in s.backstores
            s.backstores[ref] = BackstoreState(v.backstore, "user", v.config, v.size,
                                               {"cmd_time_out": "30", "hw_queue_depth": "128"})
        elif c.action == "set_backstore_attribute":
            s.backstores[f"user:{a[0]}"].attributes[a[1]] = a[2]
        elif c.action == "delete_backstore":
            ref = f"user:{a[0]}"
            del s.backstores[ref]
            for tpgs in s.targets.values():
                for t in tpgs.values():
                    for lun in [n for n, r in t.luns.items() if r == ref]:
                        del t.luns[lun]
                        for acl in t.acls.values():
                            acl.mapped = {m: x for m, x in acl.mapped.items() if x != lun}
        elif c.action == "create_target":
            assert a[0] not in s.targets
            s.targets[a[0]] = {}
        elif c.action == "delete_target":
            del s.targets[a[0]]
        elif c.action == "create_tpg":
            assert a[1] not in s.targets[a[0]]
            s.targets[a[0]][a[1]] = TpgState(a[1])
        elif c.action == "delete_tpg":
            del s.targets[a[0]][a[1]]
        elif c.action == "enable_tpg":
            assert s.backstores, "enabled before anything exists"
            tpg(a[0], a[1]).enabled = True
        elif c.action == "set_tpg_attribute":
            tpg(a[0], a[1]).attributes[a[2]] = a[3]
        elif c.action == "set_tpg_chap":
            tpg(a[0], a[1]).chap = a[2]
        elif c.action == "create_portal":
            assert a[2] not in tpg(a[0], a[1]).portals
            tpg(a[0], a[1]).portals.add(a[2])
        elif c.action == "delete_portal":
            tpg(a[0], a[1]).portals.remove(a[2])
        elif c.action == "create_lun":
            t = tpg(a[0], a[1])
            assert a[2] not in t.luns and a[3] in s.backstores
            t.luns[a[2]] = a[3]
        elif c.action == "delete_lun":
            t = tpg(a[0], a[1])
            if a[2] in t.luns:
                del t.luns[a[2]]
            for acl in t.acls.values():
                acl.mapped = {m: x for m, x in acl.mapped.items() if x != a[2]}
        elif c.action == "create_acl":
            assert a[2] not in tpg(a[0], a[1]).acls
            tpg(a[0], a[1]).acls[a[2]] = AclState(a[2])
        elif c.action == "delete_acl":
            tpg(a[0], a[1]).acls.pop(a[2], None)
        elif c.action == "set_acl_chap":
            tpg(a[0], a[1]).acls[a[2]].chap = a[3]
        elif c.action == "create_mapped_lun":
            t = tpg(a[0], a[1])
            acl = t.acls[a[2]]
            assert a[3] not in acl.mapped and a[4] in t.luns
            acl.mapped[a[3]] = a[4]
        elif c.action == "delete_mapped_lun":
            acl = tpg(a[0], a[1]).acls.get(a[2])
            if acl is not None:
                acl.mapped.pop(a[3], None)
        else:
            raise AssertionError(c.action)
    return s


def converge(d: Description, state: LioState, **kw) -> LioState:
    changes = plan(d, state, **kw)
    after = simulate(state, changes)
    assert plan(d, after, **kw) == [], "second run must change nothing"
    return after


def test_from_scratch_creates_everything_in_order_and_is_idempotent():
    d = desc()
    changes = plan(d, LioState())
    acts = [c.action for c in changes]
    assert acts[:2] == ["create_backstore", "create_backstore"]
    assert acts[-1] == "enable_tpg"
    assert acts.index("create_lun") > acts.index("create_tpg") > acts.index("create_target")
    assert acts.index("create_mapped_lun") > acts.index("create_acl")
    v1 = changes[0].args[0]
    assert (v1.config, v1.size, v1.control_string()) == ("liverestore/vol1", 64 << 20, "nl_reply_supported=-1")
    s = converge(d, LioState())
    t = s.targets[IQN][1]
    assert t.enabled and t.portals == {Portal("127.0.0.1", 3260)}
    assert t.luns == {0: "user:vol1", 1: "user:vol2"}
    assert t.acls[HOST].mapped == {0: 0, 1: 1} and t.acls[HOST].chap == Chap("host1", "secretsecret1")
    assert t.attributes["generate_node_acls"] == "0" and t.attributes["authentication"] == "1"
    assert [str(c) for c in changes][0] == "create backstore user:vol1"


def test_only_the_difference_is_changed():
    s = converge(desc(), LioState())
    d2 = Description.from_dict({
        "volumes": [{"name": "vol1", "size": 64 << 20}, {"name": "vol2", "size": 32 << 20}],
        "targets": [{"iqn": IQN, "tpgs": [{
            "tag": 1, "portals": ["127.0.0.1:3261"],
            "luns": [{"lun": 0, "volume": "vol1"}, {"lun": 1, "volume": "vol2"}],
            "acls": [{"initiator": HOST, "chap": {"userid": "host1", "password": "secretsecret2"},
                      "mapped_luns": {"0": 1}},
                     {"initiator": HOST2}]}]}]})
    changes = plan(d2, s)
    got = sorted(str(c) for c in changes)
    assert got == sorted([
        f"delete portal {IQN}/tpg1/np/127.0.0.1:3260",
        f"create portal {IQN}/tpg1/np/127.0.0.1:3261",
        f"set acl chap {IQN}/tpg1/acls/{HOST}/auth",
        f"delete mapped lun {IQN}/tpg1/acls/{HOST}/lun0",
        f"delete mapped lun {IQN}/tpg1/acls/{HOST}/lun1",
        f"create mapped lun {IQN}/tpg1/acls/{HOST}/lun0->lun1",
        f"create acl {IQN}/tpg1/acls/{HOST2}",
        f"create mapped lun {IQN}/tpg1/acls/{HOST2}/lun0->lun0",
        f"create mapped lun {IQN}/tpg1/acls/{HOST2}/lun1->lun1",
    ])
    s2 = converge(d2, s)
    assert s2.targets[IQN][1].acls[HOST].mapped == {0: 1}


def test_resized_volume_is_recreated_with_its_lun_and_mappings():
    s = converge(desc(), LioState())
    d2 = desc(volumes=[{"name": "vol1", "size": 128 << 20}, {"name": "vol2", "size": 32 << 20}])
    changes = plan(d2, s)
    acts = [(c.action, c.path) for c in changes]
    assert ("delete_backstore", "user:vol1") in acts and ("create_backstore", "user:vol1") in acts
    assert ("delete_lun", f"{IQN}/tpg1/lun0") in acts and ("create_lun", f"{IQN}/tpg1/lun0") in acts
    assert not any(p.endswith("lun1") and a in ("delete_lun", "create_lun") for a, p in acts)
    s2 = converge(d2, s)
    assert s2.backstores["user:vol1"].size == 128 << 20 and s2.targets[IQN][1].acls[HOST].mapped == {0: 0, 1: 1}


def test_foreign_objects_are_left_alone_unless_pruned():
    s = converge(desc(), LioState())
    s.backstores["fileio:f1"] = BackstoreState("f1", "fileio")
    s.backstores["user:old"] = BackstoreState("old", "user", "liverestore/old", 1 << 20)
    s.backstores["user:glfs"] = BackstoreState("glfs", "user", "glfs/x", 1 << 20)
    s.targets["iqn.2026-11.org.other:t"] = {1: TpgState(1, True, luns={0: "user:old", 1: "fileio:f1"})}
    assert plan(desc(), s) == []
    pruned = plan(desc(), s, prune=True)
    assert [str(c) for c in pruned] == ["delete lun iqn.2026-11.org.other:t/tpg1/lun0",
                                        "delete backstore user:old"]
    s2 = converge(desc(), s, prune=True)
    assert "user:glfs" in s2.backstores and "fileio:f1" in s2.backstores
    assert s2.targets["iqn.2026-11.org.other:t"][1].luns == {1: "fileio:f1"}


def test_extra_objects_inside_a_managed_target_go():
    s = converge(desc(), LioState())
    s.targets[IQN][2] = TpgState(2, True)
    s.targets[IQN][1].portals.add(Portal("0.0.0.0", 3260))
    s.targets[IQN][1].acls["iqn.1994-05.com.redhat:stranger"] = AclState("iqn.1994-05.com.redhat:stranger")
    got = sorted(str(c) for c in plan(desc(), s))
    assert got == sorted([f"delete tpg {IQN}/tpg2", f"delete portal {IQN}/tpg1/np/0.0.0.0:3260",
                          f"delete acl {IQN}/tpg1/acls/iqn.1994-05.com.redhat:stranger"])
    converge(desc(), s)


def test_backstore_attributes_converge():
    d = desc(volumes=[{"name": "vol1", "size": 64 << 20, "attributes": {"cmd_time_out": 90}},
                      {"name": "vol2", "size": 32 << 20}])
    s = converge(d, LioState())
    assert s.backstores["user:vol1"].attributes["cmd_time_out"] == "90"
    s.backstores["user:vol1"].attributes["cmd_time_out"] = "30"        # changed behind our back
    assert [str(c) for c in plan(d, s)] == ["set backstore attribute user:vol1/attrib/cmd_time_out=90"]
    converge(d, s)


def test_demo_mode_tpg_with_chap():
    d = Description.from_dict({"volumes": [{"name": "v", "size": 1 << 20}],
                               "targets": [{"iqn": IQN, "tpgs": [{"luns": [{"lun": 0, "volume": "v"}],
                                                                  "chap": {"userid": "u", "password": "p"}}]}]})
    s = converge(d, LioState())
    t = s.targets[IQN][1]
    assert t.attributes["generate_node_acls"] == "1" and t.attributes["authentication"] == "1"
    assert t.chap == Chap("u", "p") and t.acls == {}


def test_teardown_removes_what_the_description_made():
    s = converge(desc(), LioState())
    s.targets["iqn.2026-11.org.other:t"] = {1: TpgState(1, True, luns={0: "user:vol2"})}
    changes = plan_teardown(desc(), s)
    s2 = simulate(s, changes)
    assert IQN not in s2.targets and "user:vol1" not in s2.backstores and "user:vol2" not in s2.backstores
    assert s2.targets["iqn.2026-11.org.other:t"][1].luns == {}
    assert plan_teardown(desc(), s2) == []


@pytest.mark.parametrize("bad", [
    {"volumes": [{"name": "a b", "size": 512}]},
    {"volumes": [{"name": "a", "size": 1000}]},
    {"volumes": [{"name": "a", "size": 512}, {"name": "a", "size": 512}]},
    {"targets": [{"iqn": "not-an-iqn"}]},
    {"targets": [{"iqn": IQN, "tpgs": [{"luns": [{"lun": 0, "volume": "nope"}]}]}]},
    {"volumes": [{"name": "a", "size": 512}],
     "targets": [{"iqn": IQN, "tpgs": [{"luns": [{"lun": 0, "volume": "a"}],
                                        "acls": [{"initiator": HOST, "mapped_luns": {"0": 5}}]}]}]},
    {"targets": [{"iqn": IQN, "tpgs": [{"acls": [{"initiator": HOST, "chap": {"userid": "u"}}]}]}]},
])
def test_bad_descriptions_are_refused(bad):
    with pytest.raises((SpecError, KeyError)):
        Description.from_dict(bad)


def test_portal_forms():
    assert Portal.parse("10.0.0.1") == Portal("10.0.0.1", 3260)
    assert Portal.parse("[::1]:3261") == Portal("::1", 3261)
    assert Portal.parse({"ip": "127.0.0.1", "port": 3262}) == Portal("127.0.0.1", 3262)


# -- admin changes inside our targets (issue 15): left and reported, never reverted --------------
ADMIN = "iqn.1994-05.com.example:admin-host"


def _admin_edits(s: LioState) -> LioState:
    """What an admin does with targetcli: an ACL with a mapped LUN, a portal,
    a changed TPG attribute, a user:liverestore backstore of their own."""
    s = copy.deepcopy(s)
    t = s.targets[IQN][1]
    t.acls[ADMIN] = AclState(ADMIN, None, {0: 1})
    t.portals.add(Portal("127.0.0.2", 3260))
    t.attributes["demo_mode_write_protect"] = "1"
    s.backstores["user:adm"] = BackstoreState("adm", "user", "liverestore/vol1", 64 << 20)
    return s


def test_admin_changes_are_left_and_reported_as_drift():
    d = desc()
    s = _admin_edits(converge(d, LioState()))
    # an unrelated change of the daemon's own configuration: one more volume exported
    d2 = desc(volumes=[{"name": "vol1", "size": 64 << 20}, {"name": "vol2", "size": 32 << 20},
                       {"name": "vol3", "size": 32 << 20}],
              targets=[{"iqn": IQN, "tpgs": [{
                  "tag": 1, "portals": ["127.0.0.1:3260"],
                  "luns": [{"lun": 0, "volume": "vol1"}, {"lun": 1, "volume": "vol2"}, {"lun": 2, "volume": "vol3"}],
                  "acls": [{"initiator": HOST, "chap": {"userid": "host1", "password": "secretsecret1"}}]}]}])
    p = converge_from(d2, s, prune=True, previous=d)
    assert [str(c) for c in p.changes] == [
        "create backstore user:vol3", f"create lun {IQN}/tpg1/lun2", f"create mapped lun {IQN}/tpg1/acls/{HOST}/lun2->lun2"]
    after = simulate(s, p.changes)
    t = after.targets[IQN][1]
    assert t.acls[ADMIN].mapped == {0: 1} and Portal("127.0.0.2", 3260) in t.portals
    assert t.attributes["demo_mode_write_protect"] == "1" and "user:adm" in after.backstores
    assert sorted(x.path for x in p.drift) == sorted([
        f"{IQN}/tpg1/acls/{ADMIN}", f"{IQN}/tpg1/np/127.0.0.2:3260", f"{IQN}/tpg1/attrib/demo_mode_write_protect",
        "user:adm"])
    # the same at the daemon's start (previous = what it wants): nothing reverted either
    assert converge_from(d, s, prune=True, previous=d).changes == []
    # the whole-truth mode (python -m target.lio apply) still converges everything
    assert {c.action for c in plan(d, s, prune=True)} >= {"delete_acl", "delete_portal", "set_tpg_attribute",
                                                          "delete_backstore"}


def test_what_the_daemon_made_it_removes_and_a_changed_wish_is_written():
    two = desc(targets=[{"iqn": IQN, "tpgs": [{
        "tag": 1, "portals": ["127.0.0.1:3260"], "luns": [{"lun": 0, "volume": "vol1"}, {"lun": 1, "volume": "vol2"}],
        "acls": [{"initiator": HOST, "chap": {"userid": "host1", "password": "secretsecret1"}},
                 {"initiator": HOST2}]}]}])
    s = converge(two, LioState())
    # export acl delete HOST2 + a new CHAP secret for HOST: the daemon's own intent changed
    one = desc(targets=[{"iqn": IQN, "tpgs": [{
        "tag": 1, "portals": ["127.0.0.1:3260"], "luns": [{"lun": 0, "volume": "vol1"}, {"lun": 1, "volume": "vol2"}],
        "acls": [{"initiator": HOST, "chap": {"userid": "host1", "password": "secretsecret2"}}]}]}])
    p = converge_from(one, s, prune=True, previous=two)
    assert {str(c) for c in p.changes} >= {f"delete acl {IQN}/tpg1/acls/{HOST2}",
                                          f"set acl chap {IQN}/tpg1/acls/{HOST}/auth"}
    assert p.drift == []
    # the admin changed HOST's CHAP with targetcli: kept while the daemon's wish is the same
    s2 = simulate(s, p.changes)
    s2.targets[IQN][1].acls[HOST].chap = Chap("admin", "adminsecret12")
    p2 = converge_from(one, s2, prune=True, previous=one)
    assert p2.changes == [] and [x.path for x in p2.drift] == [f"{IQN}/tpg1/acls/{HOST}/auth"]
    assert "adminsecret" not in str(p2.drift)                  # drift never shows a secret


def test_saved_mappings_restore_skipped_are_put_back_for_other_acls_only():
    """targetctl restore with tcmu-runner up: our backstores and LUNs were
    skipped, and with them the admin ACL's mapped LUNs; the daemon's start
    recreated LUNs and its own mappings, the saved file gives back the rest."""
    d = desc()
    s = converge(d, LioState())
    s.targets[IQN][1].acls[ADMIN] = AclState(ADMIN)                    # restored, but without mappings
    saved = {"targets": [{"fabric": "iscsi", "wwn": IQN, "tpgs": [{
        "tag": 1,
        "luns": [{"index": 0, "storage_object": "/backstores/user/vol1"},
                 {"index": 1, "storage_object": "/backstores/user/vol2"}],
        "node_acls": [{"node_wwn": ADMIN, "mapped_luns": [{"index": 0, "tpg_lun": 1, "write_protect": False},
                                                          {"index": 5, "tpg_lun": 7}]},
                      {"node_wwn": HOST, "mapped_luns": [{"index": 9, "tpg_lun": 0}]},
                      {"node_wwn": "iqn.1994-05.com.example:gone", "mapped_luns": [{"index": 0, "tpg_lun": 0}]}]}]},
        {"fabric": "iscsi", "wwn": "iqn.2026-11.org.other:t", "tpgs": []}]}
    changes = skipped_mappings(d, s, saved)
    assert [str(c) for c in changes] == [f"create mapped lun {IQN}/tpg1/acls/{ADMIN}/lun0->lun1"]
    after = simulate(s, changes)
    assert after.targets[IQN][1].acls[ADMIN].mapped == {0: 1}
    assert skipped_mappings(d, after, saved) == []                      # once only
    # a LUN now on another backstore than saved is not mapped blindly
    s.targets[IQN][1].luns[1] = "user:other"
    assert skipped_mappings(d, s, saved) == []
    assert skipped_mappings(d, s, {"targets": "junk"}) == [] and skipped_mappings(d, s, []) == []
    assert skipped_mappings(d, s, {"targets": [{"fabric": "iscsi", "wwn": [IQN], "tpgs": [{"tag": [1]}]}]}) == []


def test_an_admin_targets_saved_luns_on_our_backstores_are_put_back():
    """An admin's own target mapping one of our backstores (made with
    targetcli): restore with tcmu-runner up skipped its LUN with our
    backstore; once the daemon recreated the backstore, the saved LUN and its
    ACL's mapping come back. A LUN on someone else's backstore, a taken
    index, or a backstore not back yet are left alone."""
    other = "iqn.2026-11.org.admin:own"
    d = desc()
    s = converge(d, LioState())
    s.targets[other] = {1: TpgState(1, acls={ADMIN: AclState(ADMIN)})}
    saved = {"targets": [{"fabric": "iscsi", "wwn": other, "tpgs": [{
        "tag": 1,
        "luns": [{"index": 3, "storage_object": "/backstores/user/vol1"},
                 {"index": 4, "storage_object": "/backstores/fileio/theirs"},
                 {"index": 5, "storage_object": "/backstores/user/vol2"}],
        "node_acls": [{"node_wwn": ADMIN, "mapped_luns": [{"index": 0, "tpg_lun": 3},
                                                          {"index": 1, "tpg_lun": 4}]}]}]}]}
    s.targets[other][1].luns[5] = "user:vol1"                          # index 5 taken since
    changes = skipped_mappings(d, s, saved)
    assert [str(c) for c in changes] == [f"create lun {other}/tpg1/lun3",
                                         f"create mapped lun {other}/tpg1/acls/{ADMIN}/lun0->lun3"]
    after = simulate(s, changes)
    assert after.targets[other][1].luns[3] == "user:vol1"
    assert after.targets[other][1].acls[ADMIN].mapped == {0: 3}
    assert skipped_mappings(d, after, saved) == []                      # once only
    del s.backstores["user:vol1"]                                       # not back (yet): nothing to map onto
    assert skipped_mappings(d, s, saved) == []
