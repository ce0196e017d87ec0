"""result.json files -> results.csv and one self-contained report.html.

`build_report(root)` reads every run folder under root (what `lmadapt compare` and `lmadapt train`
write; PET's member runs nested inside a cell are not rows of their own), writes
root/results.csv (one row per run) and root/report.html: figures made with matplotlib and
embedded as base64 PNG (no CDN, no network: the file opens offline), tables of mean ± standard
deviation over seeds, and a "which to use" summary computed from the same numbers.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path

FIXED = ("run", "task", "method", "variant", "shots", "seed", "n_train", "metric", "dev", "ood_mean",
         "trainable_params", "trainable_percent", "bytes_on_disk", "train_seconds", "wall_seconds",
         "peak_memory_mb", "added_memory_mb", "examples_per_second", "lr", "steps", "best_step", "model",
         "device", "precision")
NEAR = 1.0  # points: a method this close to the best (or within the best's std) counts as "as good"


def main_metric(task: str, dev: dict) -> str:
    """The metric a task is judged by: the task's own (F1 for SQuAD) when known, else dev's first."""
    from .evaluation import MAIN_KEY
    try:
        from .tasks import get_task
        metric = get_task(task).metric
        key = MAIN_KEY.get(metric, metric)
        if key in dev:
            return key
    except ValueError:
        pass
    return next(k for k, v in dev.items() if k not in ("n", "n_available") and isinstance(v, (int, float)))


def _nested(folder: Path, root: Path) -> bool:
    """True when a folder above this one (under root) is itself a run: PET's members and final."""
    return any((p / "result.json").exists() for p in folder.parents if p != folder and root in p.parents)


def collect(root) -> tuple[list[dict], list[dict]]:
    """-> (one flat row per run, one row per failed cell) under root."""
    root = Path(root)
    rows, failures = [], []
    for path in sorted(root.rglob("result.json")):
        folder = path.parent
        if _nested(folder, root):
            continue
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            failures.append({"run": str(folder.relative_to(root)), "error": f"unreadable result.json: {e}"})
            continue
        if not isinstance(r, dict) or "method" not in r or not r.get("metrics", {}).get("dev"):
            continue
        rows.append(_row(r, folder, root))
    for path in sorted(root.rglob("error.json")):
        if not (path.parent / "result.json").exists():
            e = json.loads(path.read_text())
            failures.append({"run": str(path.parent.relative_to(root)), "error": e.get("error", "?"),
                             "traceback": str((path.parent / e.get("traceback", "traceback.txt")).relative_to(root))})
    return rows, failures


def _row(r: dict, folder: Path, root: Path) -> dict:
    dev = r["metrics"]["dev"]
    metric = main_metric(r["task"], dev)
    cell = {}
    if (folder / "cell.json").exists():
        cell = json.loads((folder / "cell.json").read_text())
    fixed_axes = ("task", "method", "shots", "seed")
    extra = {k: v for k, v in cell.get("cell", {}).items() if k not in fixed_axes}
    row = {"run": str(folder.relative_to(root)) if folder != root else ".", "task": r["task"],
           "method": r["method"], "variant": " ".join(f"{k}={v}" for k, v in extra.items()),
           "shots": r.get("shots", "full"), "seed": r.get("seed"), "n_train": r.get("n_train"),
           "metric": metric, "dev": dev.get(metric), "wall_seconds": cell.get("wall_seconds")}
    ood = [m.get(metric) for split, m in r["metrics"].items() if split != "dev" and m.get(metric) is not None]
    row["ood_mean"] = sum(ood) / len(ood) if ood else None
    for k in FIXED:
        if k not in row:
            row[k] = r.get(k)
    for split, m in r["metrics"].items():
        for k, v in m.items():
            if k not in ("n_available",) and isinstance(v, (int, float)):
                row[f"{split}.{k}"] = v
    return row


def write_csv(rows: list[dict], path) -> None:
    from .atomic import write_file
    extra = sorted({k for r in rows for k in r} - set(FIXED))
    cols = list(FIXED) + extra

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: r.get(k) for k in cols})
    write_file(path, write)


# --- aggregation ---------------------------------------------------------------------------------

class Spread(tuple):
    """(mean, std) that also knows how many values it summarizes (`n`)."""
    n: int = 0


def spread(values) -> tuple[float, float] | None:
    """(mean, sample standard deviation; 0 for one value) of the values that are not None, as a
    Spread (its .n: how many)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    out = Spread((mean, std))
    out.n = len(vals)
    return out


def _shots_key(shots) -> float:
    return math.inf if shots in (None, "full") else float(shots)


def aggregate(rows: list[dict]) -> list[dict]:
    """Rows grouped by (task, method + variant, shots) over seeds: {'task', 'method', 'shots',
    'seeds', 'dev': (mean, std), 'splits': {split: (mean, std)}, 'ood_mean', cost means}."""
    groups = defaultdict(list)
    for r in rows:
        label = r["method"] + (f" {r['variant']}" if r.get("variant") else "")
        groups[(r["task"], label, str(r["shots"]))].append(r)
    out = []
    for (task, method, shots), rs in groups.items():
        metric = rs[0]["metric"]
        splits = sorted({k.split(".")[0] for r in rs for k in r if k.endswith(f".{metric}") and not
                         k.startswith("dev.")})
        g = {"task": task, "method": method, "shots": rs[0]["shots"], "metric": metric, "seeds": len(rs),
             "dev": spread(r["dev"] for r in rs), "ood_mean": spread(r["ood_mean"] for r in rs),
             "splits": {s: spread(r.get(f"{s}.{metric}") for r in rs) for s in splits},
             # the dev metrics besides the main one (E2E's ROUGE-L next to BLEU, SQuAD's EM next to F1)
             "dev_extra": {k[4:]: spread(r.get(k) for r in rs) for k in sorted({k for r in rs for k in r})
                           if k.startswith("dev.") and k not in (f"dev.{metric}", "dev.n")}}
        for k in ("n_train", "trainable_percent", "trainable_params", "bytes_on_disk", "train_seconds",
                  "peak_memory_mb", "added_memory_mb"):
            m = spread(r.get(k) for r in rs)
            g[k] = m[0] if m else None
        out.append(g)
    out.sort(key=lambda g: (g["task"], g["method"], _shots_key(g["shots"])))
    return out


def largest(groups: list[dict]) -> list[dict]:
    """The groups at the largest shots setting of the grid ('full' where run): the in-domain
    comparison. Methods run only with fewer shots (PET) appear in the few-shot comparison."""
    if not groups:
        return []
    top = max(_shots_key(g["shots"]) for g in groups)
    return [g for g in groups if _shots_key(g["shots"]) == top]


# --- the summary ---------------------------------------------------------------------------------

def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _ms(m, digits=1) -> str:
    if m is None:
        return "-"
    if getattr(m, "n", 0) == 1:    # one seed: no spread to show (not "± 0.0")
        return f"{m[0]:.{digits}f} (1 seed)"
    return f"{m[0]:.{digits}f} ± {m[1]:.{digits}f}"


def which_to_use(groups: list[dict]) -> list[str]:
    """Sentences computed from one task's groups: the best in domain, out of domain, with the
    fewest examples, and the cheapest methods (storage, time, memory) as good as the best."""
    if not groups:
        return []
    def _n(g):
        return html.escape(g["method"])
    metric = groups[0]["metric"]
    top = [g for g in largest(groups) if g["dev"] is not None]
    if not top:
        return []
    at = f"shots={top[0]['shots']}"
    best = max(top, key=lambda g: g["dev"][0])
    margin = max(NEAR, best["dev"][1])
    good = [g for g in top if best["dev"][0] - g["dev"][0] <= margin]
    lines = [f"<b>In domain</b> ({at}): <b>{_n(best)}</b> is best with {metric} {_ms(best['dev'])}"
             + (f"; as good (within {margin:.1f} points): " + ", ".join(
                 f"{_n(g)} ({g['dev'][0]:.1f})" for g in good if g is not best) if len(good) > 1 else "")
             + "."]
    with_ood = [g for g in top if g["ood_mean"] is not None]
    if with_ood:
        b = max(with_ood, key=lambda g: g["ood_mean"][0])
        gap = b["dev"][0] - b["ood_mean"][0]
        where = f"{gap:.1f} points below" if gap >= 0 else f"{-gap:.1f} points above"
        lines.append(f"<b>Out of domain</b> (mean over {', '.join(sorted(b['splits']))}): <b>{_n(b)}</b> "
                     f"transfers best, {metric} {_ms(b['ood_mean'])} ({where} its in-domain score)"
                     + ("." if b is best else f"; the in-domain winner {_n(best)} reaches "
                        f"{best['ood_mean'][0]:.1f}." if best['ood_mean'] else "."))
    settings = sorted({str(g["shots"]) for g in groups}, key=_shots_key)
    if len(settings) > 1:
        low = [g for g in groups if str(g["shots"]) == settings[0] and g["dev"] is not None]
        if low:
            b = max(low, key=lambda g: g["dev"][0])
            rest = ", ".join(f"{_n(g)} {g['dev'][0]:.1f}" for g in sorted(low, key=lambda g: -g["dev"][0])
                             if g is not b)
            lines.append(f"<b>Fewest examples</b> (shots={settings[0]}, {b['n_train']:.0f} training examples): "
                         f"<b>{_n(b)}</b>, {metric} {_ms(b['dev'])}" + (f"; {rest}." if rest else "."))
    for key, what, fmt in (("bytes_on_disk", "stores a task in the fewest bytes", fmt_bytes),
                           ("train_seconds", "trains fastest", _secs),
                           ("added_memory_mb", "needs the least training memory", lambda m: f"{m:.0f} MB added")):
        cands = [g for g in good if g.get(key) is not None]
        if len(cands) > 1 and min(g[key] for g in cands) < max(g[key] for g in cands):
            c = min(cands, key=lambda g: g[key])
            others = max(cands, key=lambda g: g[key])
            lines.append(f"Of the methods as good as the best in domain, <b>{_n(c)}</b> {what}: "
                         f"{fmt(c[key])} (vs {fmt(others[key])} for {_n(others)}).")
    return lines


# --- figures -------------------------------------------------------------------------------------

def _secs(s) -> str:
    return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"


def _plain_log_ticks(axis) -> None:
    """Log-scale ticks as plain numbers (16, 64, 0.1), not 2x10^1."""
    from matplotlib.ticker import FuncFormatter
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def figures(task: str, groups: list[dict]) -> list[tuple[str, str]]:
    """-> [(title, base64 PNG)] for one task."""
    # Figure objects, not pyplot: no GUI backend is touched and nothing global is left open.
    import matplotlib
    import matplotlib.ticker
    from matplotlib.figure import Figure

    def subplots(*grid, figsize):
        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*grid)
    metric = groups[0]["metric"]
    top = [g for g in largest(groups) if g["dev"] is not None]
    methods = sorted({g["method"] for g in groups})
    colors = {m: matplotlib.colormaps["tab10"](i % 10) for i, m in enumerate(methods)}
    out = []

    pos = [g for g in top if g.get("trainable_percent")]
    if pos:
        fig, ax = subplots(figsize=(6.4, 4))
        for g in pos:
            ax.errorbar(g["trainable_percent"], g["dev"][0], yerr=g["dev"][1], fmt="o", color=colors[g["method"]],
                        capsize=3)
            ax.annotate(g["method"], (g["trainable_percent"], g["dev"][0]), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.set(xlabel="trainable parameters (% of the model, log scale)", ylabel=f"dev {metric}",
               title=f"{task}: {metric} vs trainable %")
        ax.grid(alpha=0.3)
        out.append((f"{metric} vs trainable parameters", _png(fig)))

    if len({str(g["shots"]) for g in groups}) > 1:
        fig, ax = subplots(figsize=(6.4, 4))
        for m in methods:
            gs = sorted((g for g in groups if g["method"] == m and g["dev"] and g["n_train"]),
                        key=lambda g: g["n_train"])
            if gs:
                ax.errorbar([g["n_train"] for g in gs], [g["dev"][0] for g in gs], yerr=[g["dev"][1] for g in gs],
                            marker="o", capsize=3, label=m, color=colors[m])
        ax.set_xscale("log")
        ns = sorted({g["n_train"] for g in groups if g["n_train"]})
        ax.set_xticks(ns, [f"{n:g}" for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel="training examples (shots; log scale)", ylabel=f"dev {metric}",
               title=f"{task}: {metric} vs training examples")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        out.append((f"{metric} vs shots", _png(fig)))

    splits = sorted({s for g in top for s in g["splits"]})
    if splits:
        fig, ax = subplots(figsize=(max(6.4, 1.2 * len(top)), 4))
        names = ["dev (in domain)"] + splits
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            vals = [(g["dev"] if j == 0 else g["splits"].get(name)) for g in top]
            ax.bar([i + j * width for i in range(len(top))], [v[0] if v else 0 for v in vals], width,
                   yerr=[v[1] if v else 0 for v in vals], label=name, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(top))], [g["method"] for g in top], rotation=30)
        ax.set(ylabel=metric, title=f"{task}: in domain vs out of domain")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
        out.append(("in domain vs out of domain", _png(fig)))

    cost = [g for g in top if g.get("train_seconds") is not None]
    if cost:
        fig, (a1, a2) = subplots(1, 2, figsize=(9, max(2.5, 0.4 * len(cost) + 1)))
        names = [g["method"] for g in cost]
        a1.barh(names, [g["train_seconds"] for g in cost], color=[colors[n] for n in names])
        a1.set(xlabel="train time (s)", title="time")
        a2.barh(names, [g.get("peak_memory_mb") or 0 for g in cost], color="lightgray", label="peak (process)")
        a2.barh(names, [g.get("added_memory_mb") or 0 for g in cost], color=[colors[n] for n in names],
                label="added by training")
        a2.set(xlabel="memory (MB)", title="peak memory")
        a2.legend(fontsize=7)
        a2.set_yticklabels([])
        out.append(("time and peak memory per method", _png(fig)))

    stored = [g for g in top if g.get("bytes_on_disk")]
    if stored:
        fig, ax = subplots(figsize=(6.4, max(2.5, 0.4 * len(stored) + 1)))
        names = [g["method"] for g in stored]
        ax.barh(names, [g["bytes_on_disk"] for g in stored], color=[colors[n] for n in names])
        for i, g in enumerate(stored):
            ax.text(g["bytes_on_disk"], i, " " + fmt_bytes(g["bytes_on_disk"]), va="center", fontsize=8)
        ax.set_xscale("log")
        ax.set(xlabel="bytes stored per task (artifact on disk, log scale)", title=f"{task}: storage per task")
        out.append(("bytes stored per task", _png(fig)))
    return out


# --- HTML ----------------------------------------------------------------------------------------

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:1em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.figs{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}figcaption{font-size:.85em;color:#555}
img{max-width:100%;border:1px solid #eee}.summary li{margin:.3em 0}.fail{color:#a00}"""


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{body}</tbody></table>'


def task_table(groups: list[dict]) -> tuple[list[str], list[list]]:
    metric = groups[0]["metric"]
    splits = sorted({s for g in groups for s in g["splits"]})
    extra = sorted({k for g in groups for k in g.get("dev_extra", {})})
    header = ["method", "shots", "seeds", f"dev {metric}"] + [f"dev {k}" for k in extra] + [
        f"{s} {metric}" for s in splits] + (
        ["OOD mean"] if splits else []) + ["trainable %", "stored", "train s", "peak MB"]
    rows = []
    for g in groups:
        rows.append([g["method"], g["shots"], g["seeds"], _ms(g["dev"])]
                    + [_ms(g.get("dev_extra", {}).get(k)) for k in extra] + [_ms(g["splits"].get(s)) for s in splits]
                    + ([_ms(g["ood_mean"])] if splits else [])
                    + ["-" if g["trainable_percent"] is None else f"{g['trainable_percent']:.4g}",
                       fmt_bytes(g["bytes_on_disk"]),
                       "-" if g["train_seconds"] is None else _secs(g["train_seconds"]).removesuffix(" s"),
                       "-" if g["peak_memory_mb"] is None else f"{g['peak_memory_mb']:.0f}"])
    return header, rows


def render(rows: list[dict], failures: list[dict], title: str = "lmadapt compare") -> str:
    groups = aggregate(rows)
    tasks = sorted({g["task"] for g in groups})
    models = sorted({str(r.get("model")) for r in rows})
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p>{len(rows)} runs, {len(failures)} failed; model {', '.join(map(html.escape, models))}; "
             f"tasks {', '.join(tasks)}. Mean ± standard deviation over seeds. Raw rows: "
             f'<a href="results.csv">results.csv</a>.</p>']
    for task in tasks:
        gs = [g for g in groups if g["task"] == task]
        parts.append(f'<h2 id="task-{html.escape(task)}">{html.escape(task)}</h2>')
        summary = which_to_use(gs)
        if summary:  # the sentences hold <b> tags and computed text only (method names are escaped below)
            parts.append('<h3>Which to use</h3><ul class="summary">' + "".join(f"<li>{s}</li>" for s in summary)
                         + "</ul>")
        header, trs = task_table(gs)
        parts.append("<h3>Results</h3>" + _table(header, trs, "results"))
        figs = figures(task, gs)
        parts.append('<h3>Figures</h3><div class="figs">' + "".join(
            f'<figure><img alt="{html.escape(t)}" src="data:image/png;base64,{b}"><figcaption>{html.escape(t)}'
            "</figcaption></figure>" for t, b in figs) + "</div>")
    if failures:
        parts.append('<h2 id="failed">Failed cells</h2>' + _table(
            ["run", "error", "traceback"], [[f["run"], f["error"], f.get("traceback", "")] for f in failures], "fail"))
    # Marks how many figures decoded, for a headless-browser check (tests/test_report.py).
    script = ("<script>window.addEventListener('load',()=>{document.body.dataset.figures="
              "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body>{''.join(parts)}{script}</body></html>")


def build_report(root, out=None, title: str | None = None) -> dict:
    """root/results.csv and root/report.html (or into `out`); -> {'rows', 'failures', 'csv', 'html', 'groups'}."""
    from .atomic import write_file
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such folder (give the --out of `lmadapt compare` or a folder of runs)")
    rows, failures = collect(root)
    if not rows and not failures:
        raise ValueError(f"{root}: no result.json under it; run `lmadapt compare --out {root}` (or train) first")
    dest = Path(out) if out else root
    csv_path, html_path = dest / "results.csv", dest / "report.html"
    write_csv(rows, csv_path)
    page = render(rows, failures, title or f"lmadapt compare: {root.name}")
    write_file(html_path, lambda p: Path(p).write_text(page, encoding="utf-8"))
    return {"rows": rows, "failures": failures, "csv": csv_path, "html": html_path, "groups": aggregate(rows)}
