"""Parse the text output of libiscsi's `iscsi-test-cu` (CUnit verbose mode)
into per-test results: which tests passed, which failed and why.

CUnit prints `Suite: NAME` / `  Test: NAME ...` then the test's own log lines,
then the verdict `passed` or `FAILED` (at the start of a line, or right after
the `...`), then numbered failed assertions. Suite names repeat across the
families (ALL, SCSI, iSCSI, LINUX), so results are matched by position to
`iscsi-test-cu -l` to get full FAMILY.Suite.Test names.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field

_SUITE = re.compile(r"^Suite: (\S+)")
_TEST = re.compile(r"^  Test: (\S+) \.\.\.(.*)$")
_ASSERT = re.compile(r"^\s+\d+\. (\S+:\d+)\s+- (.*)$")
_SUMMARY = re.compile(r"^\s+tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)")


@dataclass
class Result:
    total: int | None = None
    ran: int | None = None
    passed: int | None = None
    failed_count: int | None = None
    tests: list[str] = field(default_factory=list)            # in run order
    failed: dict[str, list[str]] = field(default_factory=dict)  # name -> reasons
    skipped: set[str] = field(default_factory=set)   # "passed" by a [SKIPPED] message

    @property
    def passed_names(self) -> set[str]:
        return set(self.tests) - set(self.failed)

    def consistent(self) -> bool:
        return (self.passed is not None and self.failed_count == len(self.failed)
                and self.ran == len(self.tests))


def listing(exe: str = "iscsi-test-cu") -> list[str]:
    """FAMILY.Suite.Test names in run order."""
    out = subprocess.run([exe, "-l"], capture_output=True, text=True, timeout=60).stdout
    return [n.strip() for n in out.splitlines() if n.strip().count(".") == 2]


def parse(text: str, names: list[str] | None = None) -> Result:
    r = Result()
    suite = test = None
    msgs: list[str] = []
    verdict_seen = True
    in_failure = False

    def verdict(v: str) -> None:
        nonlocal verdict_seen, in_failure
        verdict_seen = True
        if v == "passed" and any("[SKIPPED]" in x for x in msgs):
            r.skipped.add(test)
        if v == "FAILED":
            in_failure = True
            reasons = [x for x in msgs if "[FAILED]" in x or "[ERROR]" in x] or msgs[-3:]
            r.failed[test] = list(reasons)

    for line in text.splitlines():
        m = _SUMMARY.match(line)
        if m:
            r.total, r.ran, r.passed, r.failed_count = (int(m.group(i)) for i in range(1, 5))
            continue
        m = _SUITE.match(line)
        if m:
            suite, test, in_failure = m.group(1), None, False
            continue
        m = _TEST.match(line)
        if m and suite:
            test = f"{suite}.{m.group(1)}"
            if names is not None and len(r.tests) < len(names) \
                    and names[len(r.tests)].endswith("." + test):
                test = names[len(r.tests)]
            r.tests.append(test)
            msgs, verdict_seen, in_failure = [], False, False
            rest = m.group(2).strip()
            if rest.startswith(("passed", "FAILED")):
                verdict(rest[:6])
            elif rest:
                msgs.append(rest)
            continue
        if test is None:
            continue
        if not verdict_seen and line.startswith(("passed", "FAILED")):
            verdict(line[:6])
            continue
        m = _ASSERT.match(line)
        if m and in_failure:
            r.failed[test].append(f"{m.group(1)}: {m.group(2)}")
            continue
        if not verdict_seen and line.strip():
            msgs.append(line.strip())
    return r
