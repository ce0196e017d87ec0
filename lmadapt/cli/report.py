"""lmadapt report: rebuild results.csv and report.html from the run folders under a directory."""
from __future__ import annotations

from .common import table


def text_table(groups: list[dict]) -> str:
    """The report's tables as plain text, one per task (mean ± std over seeds)."""
    from ..report import task_table
    parts = []
    for task in sorted({g["task"] for g in groups}):
        header, rows = task_table([g for g in groups if g["task"] == task])
        parts.append(f"{task}\n" + table(rows, header))
    return "\n\n".join(parts)


def print_report(runs, out=None, title=None) -> dict:
    from ..report import build_report, which_to_use
    res = build_report(runs, out, title)
    print()
    print(text_table(res["groups"]))
    for task in sorted({g["task"] for g in res["groups"]}):
        lines = which_to_use([g for g in res["groups"] if g["task"] == task])
        if lines:
            print(f"\nwhich to use ({task}):")
            for line in lines:
                print("  - " + line.replace("<b>", "").replace("</b>", ""))
    if res["failures"]:
        print(f"\n{len(res['failures'])} failed (error.json + traceback.txt in each folder):")
        for f in res["failures"]:
            print(f"  {f['run']}: {f['error'].splitlines()[0] if f['error'] else '?'}")
    print(f"\nwrote {res['csv']} and {res['html']} (one self-contained file: open it in a browser)")
    return res


def cmd_report(a) -> int:
    print_report(a.runs, a.out, a.title)
    return 0


def register(sub) -> None:
    r = sub.add_parser("report", help="results.csv + report.html from run folders (e.g. a compare --out)",
                       description="Read every result.json under RUNS (the cells of `lmadapt compare`, or `lmadapt "
                                   "train` runs) and write RUNS/results.csv and RUNS/report.html: plots embedded, "
                                   "tables of mean ± std over seeds, a 'which to use' summary. Example: "
                                   "lmadapt report runs/cmp")
    r.add_argument("runs", help="folder holding the run folders")
    r.add_argument("--out", help="write results.csv and report.html here instead of RUNS")
    r.add_argument("--title", help="the report's title")
    r.set_defaults(func=cmd_report)
