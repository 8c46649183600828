"""Condenses an Autobahn|Testsuite report into one line per case and compares it with the
expected verdicts kept in the repository (tests/autobahn/expected.txt).

Runs under wstest's own Python 2.7 (the only Python scripts/autobahn.sh is sure to have set
up) and under Python 3, so it uses nothing newer than both have.

    verdicts.py condense OUT REPORT_DIR...                  # REPORT_DIR/index.json -> OUT
    verdicts.py compare EXPECTED ACTUAL [--subset] REPORT_DIR...
    verdicts.py update EXPECTED ACTUAL                      # rewrite EXPECTED from ACTUAL

Several report directories are merged: scripts/autobahn.sh runs the cases in several wstest
processes, each with its own report.

A line is `CASE BEHAVIOR BEHAVIOR_CLOSE`, e.g. `3.1 OK OK` or `2.5 OK FAILED BY CLIENT`:
BEHAVIOR never contains a space, BEHAVIOR_CLOSE may, so the line splits on the first two
spaces. Lines starting with `#` and blank lines are comments.

In the expected file a case whose verdict depends on timing may list the verdicts it
accepts, separated by ` | `: `2.11 OK OK | FAILED OK`. `update` keeps such a line while the
new verdict is one of them, and keeps the comment lines at the top of the file.
"""

from __future__ import print_function

import io
import json
import os
import sys

# Separates the accepted verdicts of one case in the expected file.
ALTERNATIVES = " | "

# Written at the top of a new expected file (an existing file keeps its own comments).
HEADER = u"""\
# Autobahn|Testsuite 0.8.2 fuzzingclient verdicts for syncgate's /echo route: one
# line per case, CASE BEHAVIOR BEHAVIOR_CLOSE, sorted by case number; a case whose verdict
# depends on timing lists the verdicts it accepts, separated by ' | '.
# Checked by scripts/autobahn.sh; rewritten by scripts/autobahn.sh --update.
"""


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
    """Case -> list of accepted 'BEHAVIOR BEHAVIOR_CLOSE' verdicts, and the comment lines
    that open the file."""
    verdicts = {}
    header = []
    with io.open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if line.startswith("#") or not line.strip():
                if not verdicts:
                    header.append(line)
                continue
            parts = line.strip().split(" ", 1)
            accepted = [v.strip() for v in parts[1].split(ALTERNATIVES)] if len(parts) == 2 else []
            if not accepted or not all(" " in v for v in accepted):
                sys.exit("%s:%d: not `CASE BEHAVIOR BEHAVIOR_CLOSE`: %r" % (path, number, line))
            verdicts[parts[0]] = accepted
    return verdicts, header


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
    """Prints every case whose verdict is not an accepted one; returns how many. With
    `subset` (only some cases were run) expected cases that did not run are not differences."""
    expected, _ = read_verdicts(expected_path)
    actual, _ = read_verdicts(actual_path)
    cases = load_index(report_dirs)
    differences = 0
    for case in sorted(set(expected) | set(actual), key=case_key):
        want, got = expected.get(case), actual.get(case)
        if got is None and subset:
            continue
        if want is not None and got is not None and got[0] in want:
            continue
        differences += 1
        print("  %-8s expected %-28s got %s" % (
            case, ALTERNATIVES.join(want) if want else "(not listed)",
            got[0] if got else "(not run)"))
        detail = explain(cases, case)
        if detail:
            print(detail)
    return differences


def update(expected_path, actual_path):
    """Rewrites the expected file from a run, keeping its opening comments and any list of
    accepted verdicts that still holds the new one."""
    actual, _ = read_verdicts(actual_path)
    if os.path.exists(expected_path):
        expected, header = read_verdicts(expected_path)
    else:
        expected, header = {}, HEADER.rstrip("\n").split("\n")
    lines = list(header)
    for case in sorted(actual, key=case_key):
        got = actual[case][0]
        kept = expected.get(case)
        accepted = kept if kept and got in kept else [got]
        lines.append(u"%s %s" % (case, ALTERNATIVES.join(accepted)))
    with io.open(expected_path, "w", encoding="utf-8") as f:
        f.write(u"\n".join(lines) + u"\n")


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
    if len(argv) == 3 and argv[0] == "update":
        update(argv[1], argv[2])
        return 0
    sys.exit(__doc__)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
