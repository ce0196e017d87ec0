"""Every task loads from the real data root (../shared/data, found by the normal mechanism), with
the counts shared/data/README.md states; the carved-out splits are fixed and disjoint."""

import json
from collections import Counter

import pytest

from lmadapt.data import Example, resolve_data_root
from lmadapt.tasks import TASKS, Task, get_task, list_tasks


@pytest.fixture(autouse=True)
def normal_data_root(monkeypatch):
    # Resolve through the fallbacks (../shared/data), not a developer's LMADAPT_DATA.
    monkeypatch.delenv("LMADAPT_DATA", raising=False)


def load(name, split):
    return TASKS[name].load(split)


def label_counts(examples):
    return dict(Counter(e.label for e in examples))


ALL_SPLITS = [(name, split) for name, task in TASKS.items() for split in task.splits]


@pytest.mark.parametrize("name,split", ALL_SPLITS, ids=[f"{n}-{s}" for n, s in ALL_SPLITS])
def test_every_split_loads_well_formed_examples(name, split):
    task = TASKS[name]
    examples = task.load(split)
    assert examples and all(isinstance(e, Example) and e.text for e in examples)
    if task.label_names:
        assert {e.label for e in examples} == set(range(len(task.label_names)))
    elif task.kind == "preference":
        # A reply may be empty (HH: 4 chosen; UltraFeedback: 2 + 2), but never equal to the other.
        assert all(isinstance(e.target, str) and isinstance(e.rejected, str)
                   and e.rejected != e.target for e in examples)
    else:
        assert all(e.target and e.label is None for e in examples)
    if task.kind in ("generation", "instruction"):
        assert all(e.references and e.target == e.references[0] for e in examples)
    assert examples[0].text in task.format(examples[0])


def test_every_dataset_folder_has_a_task():
    expected = {"sst2", "imdb", "rte", "mnli", "snli", "e2e_nlg", "webnlg", "squad", "xsum",
                "scitldr", "hh_rlhf", "ultrafeedback", "alpaca", "gsm8k"} | {
        f"amazon_{d}" for d in ("books", "dvd", "electronics", "kitchen", "airline")} | {
        "webnlg_seen", "webnlg_unseen"}  # eval-only views of webnlg's test split
    assert set(TASKS) == expected


def test_sst2_counts_and_first_dev_row():
    assert label_counts(load("sst2", "train")) == {1: 37569, 0: 29780}
    dev = load("sst2", "dev")
    assert label_counts(dev) == {1: 444, 0: 428}
    # The trailing space before the tab is stripped; label 1 = positive.
    assert (dev[0].text, dev[0].label) == ("it 's a charming and often affecting journey .", 1)
    assert TASKS["sst2"].label_names[dev[0].label] == "positive"
    assert label_counts(load("sst2", "test")) == {0: 917, 1: 904}  # CRLF file


def test_imdb_labels_are_flipped_to_match_sst2():
    dev = load("imdb", "dev")
    assert label_counts(dev) == {0: 500, 1: 500} and len(load("imdb", "test")) == 1000
    praise = [e for e in dev if e.text.startswith("I finally got around to seeing this after "
                                                 "hearing great things about it. It actually "
                                                 "exceeded my expectations.")]
    assert len(praise) == 1 and praise[0].label == 1  # raw label "0" -> 1 = positive
    # Across the split, "excellent" reviews are mostly positive and "waste" ones negative.
    excellent = Counter(e.label for e in dev if "excellent" in e.text.lower())
    waste = Counter(e.label for e in dev if "waste" in e.text.lower())
    assert excellent[1] > 2 * excellent[0] and waste[0] > 2 * waste[1]
    with pytest.raises(ValueError, match="task 'imdb' has no split 'train'; choose one of: "
                                         "dev, test"):
        TASKS["imdb"].load("train")


@pytest.mark.parametrize("domain", ["books", "dvd", "electronics", "kitchen", "airline"])
def test_amazon_domains_balanced(domain):
    assert label_counts(load(f"amazon_{domain}", "train")) == {0: 850, 1: 850}
    assert label_counts(load(f"amazon_{domain}", "dev")) == {0: 150, 1: 150}


def test_amazon_multiline_review_parsed_as_one_field():
    hits = [e for e in load("amazon_kitchen", "dev")
            if e.text.startswith("Don't use with batteries!\n\tThe design for using the DC")]
    assert len(hits) == 1 and hits[0].label == 0


def test_nli_counts_and_pairs():
    rte = TASKS["rte"]
    assert rte.label_names == ("entailment", "not_entailment")
    assert len(load("rte", "train")) == 2490
    dev = load("rte", "dev")
    assert label_counts(dev) == {0: 146, 1: 131}
    assert dev[0].text_pair == "Christopher Reeve had an accident."
    assert rte.label_names[dev[0].label] == "not_entailment"
    mnli = load("mnli", "train")
    assert label_counts(mnli) == {0: 3061, 1: 2980, 2: 2958}
    assert mnli[0].text_pair == "We are especially sad this year because we lost a lot of people."
    assert label_counts(load("mnli", "dev")) == {0: 347, 1: 333, 2: 320}
    assert label_counts(load("snli", "train")) == {2: 3024, 1: 2994, 0: 2981}
    assert label_counts(load("snli", "dev")) == {0: 346, 1: 328, 2: 326}
    assert "held-out" in TASKS["mnli"].description and "TRAIN" in TASKS["mnli"].description


def test_e2e_train_per_reference_eval_per_mr():
    train = load("e2e_nlg", "train")
    assert len(train) == 42061 and len({e.text for e in train}) == 4862
    for split, mrs, refs in (("dev", 547, 4672), ("test", 630, 4693)):
        examples = load("e2e_nlg", split)
        assert len(examples) == mrs and sum(len(e.references) for e in examples) == refs
    dev = load("e2e_nlg", "dev")
    assert dev[0].text == "name[Alimentum], area[city centre], familyFriendly[no]"
    assert TASKS["e2e_nlg"].format(dev[0]) == f"Table: {dev[0].text}\nText:"


def test_webnlg_splits_and_unseen_categories():
    assert len(load("webnlg", "dev")) == 872
    test = load("webnlg", "test")
    seen = Counter(e.meta["category_seen_in_train"] for e in test)
    assert len(test) == 1862 and seen == {True: 971, False: 891}
    assert {e.meta["category"] for e in test if not e.meta["category_seen_in_train"]} == {
        "Artist", "Athlete", "CelestialBody", "MeanOfTransportation", "Politician"}
    train = load("webnlg", "train")
    assert all(len(e.references) == 1 for e in train) and len(train) > 6940
    assert "_" not in test[0].text and " | " in test[0].text
    # The extrapolation setting: webnlg's out-of-domain sets are test's seen / unseen categories.
    assert TASKS["webnlg"].ood == ("webnlg_seen", "webnlg_unseen")
    seen_set, unseen_set = load("webnlg_seen", "test"), load("webnlg_unseen", "test")
    assert (len(seen_set), len(unseen_set)) == (971, 891)
    assert all(e.meta["category_seen_in_train"] for e in seen_set)
    assert not any(e.meta["category_seen_in_train"] for e in unseen_set)
    assert TASKS["e2e_nlg"].extra_metrics == ("rouge_l",) == TASKS["webnlg"].extra_metrics


def test_squad_split_by_article():
    train, dev = load("squad", "train"), load("squad", "dev")
    assert len(train) + len(dev) == 10570
    train_titles, dev_titles = {e.meta["title"] for e in train}, {e.meta["title"] for e in dev}
    assert len(train_titles) == 40 and len(dev_titles) == 8 and not train_titles & dev_titles
    assert not {e.meta["id"] for e in train} & {e.meta["id"] for e in dev}
    ex = train[0]
    assert ex.target == ex.references[0] and ex.target in ex.text_pair  # extractive answers
    assert TASKS["squad"].format(ex) == f"Context: {ex.text_pair}\nQuestion: {ex.text}\nAnswer:"


def test_xsum_800_200_disjoint():
    train, dev = load("xsum", "train"), load("xsum", "dev")
    assert (len(train), len(dev)) == (800, 200)
    assert len({e.meta["id"] for e in train} | {e.meta["id"] for e in dev}) == 1000


def test_scitldr_multi_reference_eval():
    assert [len(load("scitldr", s)) for s in ("train", "dev", "test")] == [1992, 619, 618]
    dev = load("scitldr", "dev")
    assert sum(len(e.references) for e in dev) / len(dev) == pytest.approx(2.35, abs=0.01)


def test_hh_prompt_is_the_shared_prefix():
    train, dev = load("hh_rlhf", "train"), load("hh_rlhf", "dev")
    assert (len(train), len(dev)) == (2081, 231)
    raw = [json.loads(line) for line in
           (resolve_data_root() / "hh_rlhf" / "harmless_base_test.jsonl").open(encoding="utf-8")]
    for e, r in zip(train + dev, raw):
        assert e.text.endswith("\n\nAssistant:")
        assert r["chosen"].strip().startswith(e.text) and r["rejected"].strip().startswith(e.text)
        assert r["chosen"].strip().endswith(e.target) and r["rejected"].strip().endswith(e.rejected)
    # 5 replies contain "\n\nAssistant:" themselves; cutting at the last one in the chosen text
    # alone would have moved them into the prompt.
    assert sum("\n\nAssistant:" in e.target + e.rejected for e in train + dev) == 5
    assert sum(e.target == "" for e in train + dev) == 4  # the preferred reply was silence


def test_ultrafeedback_drops_identical_pairs():
    # 500 + 500 in the files; 1 and 11 pairs have identical chosen and rejected responses.
    assert (len(load("ultrafeedback", "train")), len(load("ultrafeedback", "dev"))) == (499, 489)


def test_alpaca_split_and_prompts():
    train, dev = load("alpaca", "train"), load("alpaca", "dev")
    assert (len(train), len(dev)) == (4496, 500)  # 4 empty outputs dropped, all in train
    assert train[0].text == "Give three tips for staying healthy." and train[0].text_pair is None
    task = TASKS["alpaca"]
    assert "### Input:" not in task.format(train[0])
    with_input = next(e for e in dev if e.text_pair)
    assert f"### Input:\n{with_input.text_pair}\n\n### Response:" in task.format(with_input)


def test_load_returns_copies():
    first = load("rte", "dev")
    first[0].label, first[0].meta["x"] = 99, 1
    again = load("rte", "dev")
    assert again[0].label != 99 and "x" not in again[0].meta


def test_ood_tasks_share_labels():
    assert set(TASKS["sst2"].ood) == {"imdb", "amazon_books", "amazon_dvd", "amazon_electronics",
                                      "amazon_kitchen", "amazon_airline"}
    for task in TASKS.values():
        for other in task.ood:
            assert TASKS[other].label_names == task.label_names
            assert TASKS[other].metric == task.metric


def test_get_task_and_list_tasks():
    assert get_task("sst2") is TASKS["sst2"]
    with pytest.raises(ValueError, match=r"unknown task 'sst3'; choose one of: sst2, imdb, "):
        get_task("sst3")
    rows = list_tasks()
    assert [r["name"] for r in rows] == list(TASKS)
    sst2 = rows[0]
    assert sst2 == {"name": "sst2", "kind": "classification", "labels": "negative, positive",
                    "metric": "accuracy", "splits": "train, dev, test",
                    "description": TASKS["sst2"].description}


def test_task_validation_lists_choices():
    splits = {"train": lambda root: []}
    with pytest.raises(ValueError, match="unknown kind 'regression'; choose one of: "
                                         "classification, pair_classification, generation"):
        Task(name="t", kind="regression", metric="accuracy", splits=splits)
    with pytest.raises(ValueError, match="unknown metric 'bleurt'; choose one of: accuracy, "):
        Task(name="t", kind="generation", metric="bleurt", splits=splits)
    with pytest.raises(ValueError, match="needs at least 2 label_names"):
        Task(name="t", kind="classification", metric="accuracy", splits=splits)
