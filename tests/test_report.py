"""lmadapt.report: result.json files -> results.csv + one self-contained report.html, from
fixture runs whose numbers are chosen so the "which to use" summary has a known answer; and the
page rendered by headless Chromium (installed once by the session fixture, skipped where it
cannot be)."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from lmadapt.report import aggregate, build_report, collect, which_to_use

# dev accuracy per (method, shots) for seeds 0, 1, 2; imdb (OOD) = dev + offset; bytes on disk.
DEV = {("full", "full"): (89.0, 90.0, 91.0), ("lora", "full"): (89.0, 89.5, 90.0),
       ("prefix", "full"): (84.0, 85.0, 86.0), ("probe", "full"): (80.0, 80.0, 80.0),
       ("full", 16): (58.0, 60.0, 62.0), ("lora", 16): (70.0, 70.0, 70.0),
       ("prefix", 16): (74.0, 75.0, 76.0), ("probe", 16): (65.0, 65.0, 65.0)}
OOD = {"full": -20.0, "lora": -14.5, "prefix": -3.0, "probe": -2.0}
BYTES = {"full": 538_000_000, "lora": 4_900_000, "prefix": 466_000, "probe": 5_200}
PERCENT = {"full": 100.0, "lora": 0.9, "prefix": 0.086, "probe": 0.001}


def _result(method, shots, seed, dev):
    return {"model": "smollm2-135m", "task": "sst2", "method": method, "method_args": {}, "shots": shots,
            "seed": seed, "n_train": 67349 if shots == "full" else 2 * shots,
            "metrics": {"dev": {"accuracy": dev, "n": 872, "n_available": 872},
                        "imdb": {"accuracy": dev + OOD[method], "n": 500, "n_available": 1000}},
            "trainable_params": 1000, "trainable_percent": PERCENT[method], "bytes_on_disk": BYTES[method],
            "train_seconds": 10.0 * (1 + list(OOD).index(method)), "examples_per_second": 5.0,
            "peak_memory_mb": 1000.0 + 100 * list(OOD).index(method), "added_memory_mb": 50.0,
            "best_dev": dev, "best_step": 3, "steps": 3, "processes": 1, "lr": 1e-3, "device": "cpu",
            "precision": "fp32"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report") / "cmp"
    for (method, shots), devs in DEV.items():
        for seed, dev in enumerate(devs):
            d = root / "sst2" / method / f"shots-{shots}" / f"seed-{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps(_result(method, shots, seed, dev)))
    # A PET cell: its member runs are nested inside it and are not rows of their own.
    pet = root / "sst2" / "pet" / "shots-16" / "seed-0"
    (pet / "pet" / "g0" / "p0").mkdir(parents=True)
    (pet / "pet" / "g0" / "p0" / "result.json").write_text(json.dumps(_result("lora", 16, 0, 10.0)))
    (pet / "result.json").write_text(json.dumps(_result("probe", 16, 0, 66.0) | {"method": "pet"}))
    # A failed cell.
    bad = root / "sst2" / "bitfit" / "shots-16" / "seed-0"
    bad.mkdir(parents=True)
    (bad / "error.json").write_text(json.dumps({"error": "RuntimeError: out of memory", "traceback": "traceback.txt"}))
    (bad / "traceback.txt").write_text("Traceback ...")
    return root


@pytest.fixture(scope="module")
def built(runs):
    return build_report(runs)


def test_csv_rows_and_values(built):
    res = built
    rows = list(csv.DictReader(res["csv"].open()))
    assert len(rows) == 3 * len(DEV) + 1                         # + the PET cell, without its member
    assert not any(r["run"].startswith("sst2/pet/shots-16/seed-0/pet") for r in rows)
    lora = next(r for r in rows if r["run"] == "sst2/lora/shots-full/seed-1")
    assert (lora["method"], lora["shots"], lora["seed"], lora["metric"]) == ("lora", "full", "1", "accuracy")
    assert float(lora["dev"]) == 89.5 and float(lora["imdb.accuracy"]) == 75.0 and float(lora["ood_mean"]) == 75.0
    assert int(lora["bytes_on_disk"]) == 4_900_000
    assert [f["run"] for f in res["failures"]] == ["sst2/bitfit/shots-16/seed-0"]


def test_mean_and_std_over_seeds(runs):
    rows, _ = collect(runs)
    g = {(g["method"], str(g["shots"])): g for g in aggregate(rows)}
    assert g[("full", "16")]["dev"] == pytest.approx((60.0, 2.0))     # sample std of 58, 60, 62
    assert g[("lora", "full")]["dev"] == pytest.approx((89.5, 0.5))
    assert g[("probe", "full")]["dev"] == (80.0, 0.0) and g[("probe", "full")]["seeds"] == 3
    assert g[("prefix", "full")]["splits"]["imdb"] == pytest.approx((82.0, 1.0))


def test_which_to_use_is_computed(runs):
    rows, _ = collect(runs)
    text = " ".join(re.sub("<[^>]+>", "", s) for s in which_to_use(aggregate(rows)))
    assert ("In domain (shots=full): full is best with accuracy 90.0 ± 1.0; "
            "as good (within 1.0 points): lora (89.5)") in text
    assert "Out of domain (mean over imdb): prefix transfers best, accuracy 82.0 ± 1.0" in text
    assert "Fewest examples (shots=16, 32 training examples): prefix" in text
    assert "lora stores a task in the fewest bytes: 4.7 MB (vs 513.1 MB for full)" in text


def test_html_is_self_contained_with_every_section(built):
    page = built["html"].read_text()
    for section in ("Which to use", "Results", "Figures", 'id="failed"', "RuntimeError: out of memory"):
        assert section in page
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,', page)
    assert imgs == ["accuracy vs trainable parameters", "accuracy vs shots", "in domain vs out of domain",
                    "time and peak memory per method", "bytes stored per task"]
    assert not re.search(r'(src|href)="(https?:)?//', page)          # nothing fetched from a network
    assert "89.5 ± 0.5" in page and "<table" in page


def test_report_command(runs, built, capsys):
    from lmadapt.cli import main
    assert main(["report", str(runs), "--title", "SST-2 grid"]) == 0
    out = capsys.readouterr().out
    assert "lora    full   3      89.5 ± 0.5" in out and "which to use (sst2)" in out and "report.html" in out
    assert "<title>SST-2 grid</title>" in (runs / "report.html").read_text()
    assert main(["report", str(runs / "nothing")]) == 2


# --- headless Chromium -----------------------------------------------------------------------------

def _find_chromium():
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="session")
def chromium():
    """Debian's `chromium`, installed with apt-get on the first session that lacks it (a marker
    file in the temp folder keeps later sessions from trying again); skipped if that fails."""
    exe = _find_chromium()
    marker = Path(tempfile.gettempdir()) / "lmadapt-chromium-install-tried"
    if exe is None and not marker.exists():
        marker.write_text("apt-get install -y chromium was tried; delete this file to try again\n")
        import os
        sudo = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
        if sudo is not None and shutil.which("apt-get"):
            env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
            for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
                try:
                    subprocess.run(sudo + cmd, capture_output=True, timeout=900, env=env, check=True)
                except (subprocess.SubprocessError, OSError):
                    break
        exe = _find_chromium()
    if exe is None:
        pytest.skip("headless Chromium is not installed and `apt-get install -y chromium` failed or was tried "
                    f"before ({marker}); install Debian's chromium to run this test")
    return exe


def test_report_renders_in_headless_chromium(built, chromium, tmp_path):
    import numpy as np
    from PIL import Image
    html = built["html"]
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,2400"]
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", html.as_uri()], capture_output=True, timeout=120)
    dom = subprocess.run([chromium, *flags, "--dump-dom", html.as_uri()], capture_output=True, text=True,
                         timeout=120).stdout
    assert dom.count("<table") == 2                                  # results + failed cells
    assert 'data-figures="5"' in dom                                 # every embedded PNG decoded
    px = np.asarray(Image.open(shot).convert("RGB")).astype(int)     # (H, W, 3)
    ink = float((px.min(-1) < 200).mean())
    colour = int((px.max(-1) - px.min(-1) > 80).sum())               # plot colours; text and tables are grey
    assert ink > 0.02, f"the screenshot is (nearly) blank: {ink:.4f} of it is not white"
    assert colour > 5000, f"no plots visible in the screenshot ({colour} coloured pixels)"


def test_generation_runs_show_every_dev_metric(tmp_path):
    # E2E: BLEU decides, ROUGE-L is reported next to it.
    for seed, (bleu, rouge) in enumerate(((60.0, 66.0), (62.0, 68.0))):
        d = tmp_path / "e2e_nlg" / "prefix" / "shots-50" / f"seed-{seed}"
        d.mkdir(parents=True)
        r = _result("prefix", 50, seed, 0.0) | {"task": "e2e_nlg", "metrics": {"dev": {
            "bleu": bleu, "rouge_l": rouge, "n": 200, "n_available": 547}}}
        (d / "result.json").write_text(json.dumps(r))
    rows, _ = collect(tmp_path)
    assert {r["metric"] for r in rows} == {"bleu"} and rows[0]["dev.rouge_l"] == 66.0
    from lmadapt.report import task_table
    header, trs = task_table(aggregate(rows))
    assert header[3:5] == ["dev bleu", "dev rouge_l"] and trs[0][3:5] == ["61.0 ± 1.4", "67.0 ± 1.4"]


def test_one_seed_reads_as_one_seed_not_plus_minus_zero():
    from lmadapt.report import _ms, spread
    assert _ms(spread([71.25])) == "71.2 (1 seed)"
    assert _ms(spread([70.0, 72.0])) == "71.0 ± 1.4"
    assert _ms(spread([None])) == "-"
