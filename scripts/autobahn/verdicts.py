"""Condenses an Autobahn|Testsuite report into one line per case and compares it with the
expected verdicts kept in the repository (tests/autobahn/expected.txt).

Runs under wstest's own Python 2.7 (the only Python scripts/autobahn.sh is sure to have set
up) and under Python 3, so it uses nothing newer than both have.

    verdicts.py condense OUT REPORT_DIR...                  # REPORT_DIR/index.json -> OUT
    verdicts.py compare EXPECTED ACTUAL [--subset] REPORT_DIR...

Several report directories are merged: scripts/autobahn.sh runs the cases in several wstest
processes, each with its own report.

A line is `CASE BEHAVIOR BEHAVIOR_CLOSE`, e.g. `3.1 OK OK` or `2.5 OK FAILED BY CLIENT`:
BEHAVIOR never contains a space, BEHAVIOR_CLOSE may, so the line splits on the first two
spaces. Lines starting with `#` and blank lines are comments.
"""

from __future__ import print_function

import io
import json
import os
import sys


def case_key(case):
    """Numeric order, so 1.1.10 follows 1.1.9 (a plain string sort would not)."""
    return tuple(int(part) for part in case.split("."))


def load_index(report_dirs):
    """Case -> its summary from the index.json of every report directory, with the path of
    its JSON report. Each report must hold one agent, and a case may appear only once."""
    cases = {}
    for report_dir in report_dirs:
        with io.open(os.path.join(report_dir, "index.json"), encoding="utf-8") as f:
            index = json.load(f)
        if len(index) != 1:
            sys.exit("%s: expected one agent in index.json, found %d" % (report_dir, len(index)))
        for case, entry in list(index.values())[0].items():
            if case in cases:
                sys.exit("case %s is in more than one report" % case)
            entry["path"] = os.path.join(report_dir, entry["reportfile"])
            cases[case] = entry
    return cases


def read_verdicts(path):
    """Case -> 'BEHAVIOR BEHAVIOR_CLOSE' from an expected or condensed file."""
    verdicts = {}
    with io.open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(" ", 1)
            if len(parts) != 2 or " " not in parts[1]:
                sys.exit("%s:%d: not `CASE BEHAVIOR BEHAVIOR_CLOSE`: %r" % (path, number, line))
            verdicts[parts[0]] = parts[1]
    return verdicts


def condense(out, report_dirs):
    cases = load_index(report_dirs)
    lines = [
        u"%s %s %s" % (case, cases[case]["behavior"], cases[case]["behaviorClose"])
        for case in sorted(cases, key=case_key)
    ]
    with io.open(out, "w", encoding="utf-8") as f:
        f.write(u"\n".join(lines) + u"\n")
    counts = {}
    for case in cases.values():
        verdict = "%s/%s" % (case["behavior"], case["behaviorClose"])
        counts[verdict] = counts.get(verdict, 0) + 1
    print("autobahn: %d cases: %s" % (
        len(cases), ", ".join("%s %d" % (v, n) for v, n in sorted(counts.items()))))


def explain(cases, case):
    """What the report says about one case: enough to start from without opening the HTML."""
    entry = cases.get(case)
    if entry is None:
        return ""
    try:
        with io.open(entry["path"], encoding="utf-8") as f:
            detail = json.load(f)
    except (IOError, OSError, ValueError):
        return ""
    return "      %s / %s (close code %s, %s ms; report %s)" % (
        detail.get("result"), detail.get("resultClose"), detail.get("remoteCloseCode"),
        detail.get("duration"), entry["path"])


def compare(expected_path, actual_path, report_dirs, subset):
    """Prints every case whose verdict differs; returns the number of differences. With
    `subset` (only some cases were run) expected cases that did not run are not differences."""
    expected = read_verdicts(expected_path)
    actual = read_verdicts(actual_path)
    cases = load_index(report_dirs)
    differences = 0
    for case in sorted(set(expected) | set(actual), key=case_key):
        want, got = expected.get(case), actual.get(case)
        if want == got or (subset and got is None):
            continue
        differences += 1
        print("  %-8s expected %-28s got %s" % (case, want or "(not listed)", got or "(not run)"))
        detail = explain(cases, case)
        if detail:
            print(detail)
    return differences


def main(argv):
    if len(argv) >= 3 and argv[0] == "condense":
        condense(argv[1], argv[2:])
        return 0
    if len(argv) >= 4 and argv[0] == "compare":
        subset = argv[3] == "--subset"
        report_dirs = argv[4:] if subset else argv[3:]
        if not report_dirs:
            sys.exit(__doc__)
        differences = compare(argv[1], argv[2], report_dirs, subset)
        if differences:
            print("autobahn: %d case(s) differ from %s" % (differences, argv[1]))
            return 1
        print("autobahn: every verdict matches %s" % argv[1])
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
