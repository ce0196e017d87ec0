"""bench/learned_prompts.py --reuse: rows of an earlier results.json count as finished runs (run
folders are not kept between machines; the committed json is), only when the settings match."""
import argparse
import json

import pytest

from conftest import load_bench


def _bench():
    return load_bench("learned_prompts")


def _row(part, task, variant, seed, acc):
    return {"part": part, "task": task, "variant": variant, "seed": seed, "method": "lora",
            "test_accuracy": acc, "n_test": 300, "dev_few_accuracy": 60.0, "trainable_params": 1,
            "train_seconds": 1.0, "head": "verbalizer"}


TEMPLATE_VARIANTS = ("hand template, hand words", "hand template, searched words",
                     "searched template, searched words", "searched template, hand words")


def _earlier(tmp_path, **args):
    rows = [_row("verbalizers", "sst2", "manual", 0, 70.0), _row("ppt", "sst2", "vocab init", 0, 60.0),
            _row("ppt", "sst2", "PPT init", 0, 65.0)]
    rows += [_row("templates", "sst2", v, 0, 50.0 + i) for i, v in enumerate(TEMPLATE_VARIANTS)]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"args": {"out": "runs/old", "shots": 16, "max_test": 300, "epochs": 10.0} | args,
                                "rows": rows, "summary": []}))
    return path


def _args(tmp_path, reuse, **over):
    base = {"out": str(tmp_path / "new"), "shots": 16, "max_test": 300, "epochs": 10.0, "reuse": reuse,
            "parts": "verbalizers", "seeds": "0", "method": "lora", "k": 20}
    return argparse.Namespace(**(base | over))


def test_reused_rows_stand_for_runs_and_what_only_they_need(tmp_path, monkeypatch):
    mod = _bench()
    b = mod.Bench(_args(tmp_path, [str(_earlier(tmp_path))]))

    def boom(*a, **k):
        raise AssertionError("a reused run was run again")
    monkeypatch.setattr(b, "load", boom)
    monkeypatch.setattr(b, "ppt_dir", boom)                      # no pre-training for reused PPT rows
    import lmadapt.prompting.search as search
    monkeypatch.setattr(search, "run_search", boom)              # no template search for reused rows

    assert b.run("verbalizers", "sst2", "manual", 0, "lora", {})["test_accuracy"] == 70.0
    b.templates("sst2", 0)
    b.ppt("sst2", 0)
    assert [r["test_accuracy"] for r in b.rows] == [70.0, 50.0, 51.0, 52.0, 53.0, 60.0, 65.0]
    assert not b.done("verbalizers", "sst2", ("soft",), 0) and not b.done("verbalizers", "sst2", ("manual",), 1)
    # a row not in the file is run: it reaches the model
    with pytest.raises(AssertionError, match="run again"):
        b.run("verbalizers", "sst2", "soft", 0, "lora", {})


def test_reuse_refuses_other_settings_and_names_the_setting(tmp_path):
    mod = _bench()
    earlier = str(_earlier(tmp_path))
    with pytest.raises(SystemExit, match=r"--max-test 300.*this one 500"):
        mod.Bench(_args(tmp_path, [earlier], max_test=500))
    # where it ran, and which parts / seeds, are not settings of a row
    mod.Bench(_args(tmp_path, [earlier], parts="ppt", seeds="0,1"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"rows": []}')
    with pytest.raises(SystemExit, match="bad.json: not a results.json"):
        mod.Bench(_args(tmp_path, [str(bad)]))


def test_table_rows_are_the_run_folders_then_the_reused_ones(tmp_path):
    """--table runs nothing: its rows are OUT's run folders' and the reused rows they lack (a run
    folder's row wins over a reused row of the same run)."""
    mod = _bench()
    b = mod.Bench(_args(tmp_path, [str(_earlier(tmp_path))]))
    where = tmp_path / "new" / "runs" / "verbalizers" / "sst2" / "manual" / "s0"
    where.mkdir(parents=True)
    (where / "row.json").write_text(json.dumps(_row("verbalizers", "sst2", "manual", 0, 71.0)))
    rows = b.finished()
    assert len(rows) == 7 and rows[0]["test_accuracy"] == 71.0
    assert sorted(mod.key_of(r) for r in rows) == sorted(b.reused)
    s = {(x["part"], x["variant"]): x for x in mod.Bench.summary(argparse.Namespace(rows=rows))}
    assert s["verbalizers", "manual"]["mean"] == 71.0 and s["templates", "hand template, hand words"]["n_seeds"] == 1


def test_a_part_s_own_settings_count_only_when_the_file_has_its_rows(tmp_path):
    """IPT's settings do not shape the verbalizer / template / PPT rows: a file without IPT rows is
    reused whatever --ipt-* says; once it has IPT rows, a differing --ipt-* is refused."""
    mod = _bench()
    earlier = str(_earlier(tmp_path, ipt_train="rte,mnli", ppt_steps=300))
    mod.Bench(_args(tmp_path, [earlier], ipt_train="rte,squad", ppt_steps=300))
    with pytest.raises(SystemExit, match=r"--ppt-steps 300.*this one 1500"):    # the file has PPT rows
        mod.Bench(_args(tmp_path, [earlier], ppt_steps=1500))
    with_ipt = tmp_path / "with_ipt.json"
    data = json.loads((tmp_path / "results.json").read_text())
    data["rows"].append(_row("ipt", "sst2", "ipt d=5", 0, 55.0))
    with_ipt.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match=r"--ipt-train 'rte,mnli'.*this one 'rte,squad'"):
        mod.Bench(_args(tmp_path, [str(with_ipt)], ipt_train="rte,squad", ppt_steps=300))


def test_a_run_of_the_same_configuration_under_another_part_is_not_run_twice(tmp_path, monkeypatch):
    """The templates part's hand template + hand words is the verbalizers part's manual run, and
    IPT's full prompt tuning is PPT's vocab-init run: their rows are copied (marked), not rerun;
    without the twin the run happens."""
    mod = _bench()
    search_args = dict(candidates=3, word_score="likelihood", triggers=0, trigger_iters=1, top=2, lead_tokens=1,
                       beam=1, per_step=1, max_length=64, precision="auto")
    b = mod.Bench(_args(tmp_path, [str(_earlier(tmp_path))], **search_args))
    monkeypatch.setattr(b, "load", lambda: (_ for _ in ()).throw(AssertionError("ran a run that has a twin")))
    r = b.ipt("sst2", 0, {})
    assert r is None and b.rows[-1]["test_accuracy"] == 60.0 and b.rows[-1]["same_run_as"] == "ppt/vocab init"
    assert b.rows[-1]["part"] == "ipt" and b.rows[-1]["variant"] == "prompt tuning (full)"
    assert json.loads((b.where("ipt", "sst2", "prompt tuning (full)", 0) / "row.json").read_text())["test_accuracy"] == 60.0

    import lmadapt.api
    hand_t, hand_w = lmadapt.api._task("rte").pvps[0]
    found = {"words": [{"verbalizer": {"entailment": "yes", "not_entailment": "no"}}],
             "templates": [{"template": "{text} ? [MASK] , {text_pair}"}]}
    import lmadapt.prompting.search as search
    monkeypatch.setattr(search, "run_search", lambda *a, **k: found)
    twin_check = b.load
    monkeypatch.setattr(b, "load", lambda: (None, None))        # the search's model (run_search is faked)
    where = b.where("verbalizers", "rte", "manual", 0)
    where.mkdir(parents=True)
    (where / "row.json").write_text(json.dumps(_row("verbalizers", "rte", "manual", 0, 54.0)))
    calls = []
    original = b.run

    def run(part, task, variant, seed, method, attach_kw, **kw):
        calls.append((variant, kw.get("same_as")))
        if kw.get("same_as"):
            return original(part, task, variant, seed, method, attach_kw, **kw)
    monkeypatch.setattr(b, "run", run)
    b.templates("rte", 0)
    assert dict(calls) == {"hand template, hand words": ("verbalizers", "manual"),
                           "hand template, searched words": None, "searched template, searched words": None,
                           "searched template, hand words": None}
    assert b.rows[-1]["test_accuracy"] == 54.0 and b.rows[-1]["part"] == "templates"
    # no twin: the run reaches the model
    monkeypatch.setattr(b, "load", twin_check)
    with pytest.raises(AssertionError, match="has a twin"):
        original("templates", "rte", "hand template, hand words", 1, "lora", {}, same_as=("verbalizers", "manual"))
