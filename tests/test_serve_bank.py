"""serve.Bank: one base model, every servable method attached at once, and a mixed batch (a
prompt user, a P-tuning user, a prefix user, LoRA, adapter and BitFit users, the bare model) gives
each row what that user's artifact gives alone in a plain `Adapted` (logits atol 1e-4 in float32;
under bf16 autocast 3e-2: bf16 keeps 8 bits of mantissa, and a row's sums run in another order
when it shares a batch). Plus the registry: runtime add/replace/remove, LRU eviction and reload,
1,000 users, refusals that change nothing."""

import pytest
import torch

import lmadapt
from lmadapt.serve import Bank
from conftest import make_model, make_tokenizer

USERS = {  # user -> (method, args)
    "pam": ("prompt", {"k": 3}),
    "tim": ("ptuning", {"k": 2}),
    "pia": ("prefix", {"k": 4}),
    "lou": ("lora", {}),
    "lea": ("lora", {}),
    "ada": ("adapter", {}),
    "bit": ("bitfit", {}),
}
TABLES = ["prompt:k=3", "ptuning:k=2", "prefix:k=4", "lora", "adapter", "bitfit"]
TEXTS = ["the movie was good", "bad plot", "it was a very fun film and the actor was great", "cat",
         "the dog is not on the table", "a", "food price cheap", "near the pub"]
ROWS = ["pam", None, "tim", "pia", "lou", "ada", "bit", "lea"]


def tables():
    from lmadapt.methods import get_method
    from lmadapt.cli.common import parse_method_args
    out = []
    for spec in TABLES:
        name, _, args = spec.partition(":")
        out.append(get_method(name, **parse_method_args(args)))
    return out


def _artifact(arch, tok, method, args, path, seed, **kw):
    a = lmadapt.attach(make_model(arch, len(tok)), method, tokenizer=tok, **args, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    a.save(path)
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def world(request, tmp_path_factory):
    arch = request.param
    tok = make_tokenizer()
    d = tmp_path_factory.mktemp(f"bank-{arch}")
    arts = {u: _artifact(arch, tok, m, a, d / u, seed=i) for i, (u, (m, a)) in enumerate(USERS.items())}
    arts["cls_lora"] = _artifact(arch, tok, "lora", {}, d / "cls_lora", 10, num_labels=3, label_names=["x", "y", "z"])
    arts["cls_pre"] = _artifact(arch, tok, "prefix", {"k": 4}, d / "cls_pre", 11, num_labels=2)
    arts["cls_verb"] = _artifact(arch, tok, "prompt", {"k": 3}, d / "cls_verb", 12, num_labels=2, label_names=["neg", "pos"],
                                 head="verbalizer", template="{text} it was {mask}",
                                 verbalizer="neg=bad|not good,pos=very good")
    arts["cls_none"] = _artifact(arch, tok, "none", {}, d / "cls_none", 13, num_labels=2)
    bank = Bank(make_model(arch, len(tok)), tok, tables(), capacity=4)
    for u, p in arts.items():
        bank.register(u, p)
    return arch, tok, bank, arts


def _alone(world, user):
    arch, tok, _, arts = world
    if user is None:
        return lmadapt.attach(make_model(arch, len(tok)), "none", tokenizer=tok)
    return lmadapt.load_adapted(arts[user], model=make_model(arch, len(tok)), tokenizer=tok)


def test_mixed_batch_logits_equal_each_row_alone(world):
    arch, tok, bank, _ = world
    got = bank.logits(ROWS, TEXTS)
    for user, text, g in zip(ROWS, TEXTS, got):
        x = tok([text], return_tensors="pt")
        with torch.no_grad():
            ref = _alone(world, user)(**x).logits[0]
        torch.testing.assert_close(g, ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{arch} user {user}: {m}")
    # the users really differ from the bare model (a test where every artifact were the identity
    # would pass trivially)
    bare = bank.logits([None] * len(ROWS), TEXTS)
    for user, g, b in zip(ROWS, got, bare):
        if user is not None:
            assert not torch.allclose(g, b, atol=1e-3), user


def test_mixed_batch_greedy_decode_equals_each_row_alone(world):
    _, tok, bank, _ = world
    new, scores = bank.generate(ROWS, TEXTS, max_new_tokens=5, stop_ids=[], output_scores=True)
    for user, text, n, s in zip(ROWS, TEXTS, new, scores):
        x = tok([text], return_tensors="pt")
        ref, ref_scores = _alone(world, user).generate(x["input_ids"], max_new_tokens=5, eos_token_id=[],
                                                       output_scores=True)
        assert n == ref[0].tolist(), user
        torch.testing.assert_close(s, ref_scores[0], atol=1e-4, rtol=1e-4)


def test_bf16_autocast_mixed_batch_close_to_rows_alone(world):
    arch, tok, bank, _ = world
    got = bank.logits(ROWS, TEXTS, precision="bf16")
    for user, text, g in zip(ROWS, TEXTS, got):
        x = tok([text], return_tensors="pt")
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref = _alone(world, user)(**x).logits[0].float()
        torch.testing.assert_close(g, ref, atol=3e-2, rtol=3e-2)


def test_sampled_rows_keep_their_route_and_seed(world):
    """Sampling: each row draws from its own generator, so a row sampled in a mixed batch gets the
    tokens it gets alone with the same seed; and different seeds really sample differently."""
    _, _, bank, _ = world
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, stop_ids=[])
    mixed = bank.generate(ROWS, TEXTS, seeds=list(range(len(ROWS))), **kw)
    for i, (user, text) in enumerate(zip(ROWS, TEXTS)):
        assert bank.generate([user], [text], seeds=[i], **kw)[0] == mixed[i], user
    other = bank.generate(ROWS, TEXTS, seeds=[s + 100 for s in range(len(ROWS))], **kw)
    assert other != mixed


def test_batched_classification_each_users_head(world):
    arch, tok, bank, arts = world
    from lmadapt.data import Example
    users = ["cls_lora", "cls_pre", "cls_verb", "cls_none", "cls_lora"]
    texts = ["good film", "the plot was bad", "a fun movie", "boring", "it is not great"]
    got = bank.classify(users, texts)
    for u, t, g in zip(users, texts, got):
        a = _alone(world, u)
        enc = a.input_encoder()
        batch = enc.collate([enc.classification(Example(text=t))])
        with torch.no_grad():
            ref = a(**batch).logits[0].float()
        torch.testing.assert_close(torch.tensor(g["scores"]), ref, atol=1e-4, rtol=1e-4)
        assert g["label"] == a.label_names[int(ref.argmax())]
        assert abs(sum(g["probs"].values()) - 1) < 1e-5
    with pytest.raises(ValueError, match="no classification head"):
        bank.classify(["lou"], ["x"])


def test_decode_batch_rows_join_and_leave(world):
    """Continuous batching's runner: rows added mid-decode and rows leaving early get the tokens
    they get alone (left-padded cache merge and column trimming are exact)."""
    from lmadapt.serve.runner import DecodeBatch, Sequence
    _, tok, bank, _ = world
    ids = lambda t: tok(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    alone = {u: bank.generate([u], [t], max_new_tokens=n, stop_ids=[], output_scores=True)
             for u, t, n in [("pia", TEXTS[2], 6), ("lou", TEXTS[1], 2), ("pam", TEXTS[0], 4), (None, TEXTS[3], 3)]}
    rows = bank.routes(["pia", "lou", "pam", None])
    seqs = [Sequence(ids(t), r, n, record_scores=True)
            for t, r, n in zip([TEXTS[2], TEXTS[1], TEXTS[0], TEXTS[3]], rows, [6, 2, 4, 3])]
    batch = DecodeBatch(bank)
    with torch.no_grad():
        batch.add(seqs[:2])
        batch.step()
        batch.add(seqs[2:3])        # joins a running batch after one step
        batch.step()                # lou (2 tokens) leaves here
        batch.add(seqs[3:])
        while len(batch):
            batch.step()
    for r in rows:
        bank.release(r)
    for s, u in zip(seqs, ["pia", "lou", "pam", None]):
        tokens, scores = alone[u]
        assert s.tokens == tokens[0], u
        torch.testing.assert_close(torch.stack(s.scores), scores[0], atol=1e-4, rtol=1e-4)


def test_registry_lru_replace_remove_and_1000_users(world, tmp_path):
    arch, tok, bank, arts = world
    from lmadapt.methods import get_method
    fresh = Bank(make_model(arch, len(tok)), tok, ["lora", get_method("prefix", k=4)], capacity=2)
    for i in range(1000):  # registering is cheap: artifacts load on first use
        fresh.register(f"u{i}", arts["lou"] if i % 2 else arts["pia"])
    assert len(fresh.registry) == 1000
    text = "the movie was good"
    want = {"lou": bank.logits(["lou"], [text])[0], "pia": bank.logits(["pia"], [text])[0]}
    for i in [1, 3, 5, 0, 2, 4, 1]:  # three LoRA users through two slots: evictions and reloads
        got = fresh.logits([f"u{i}"], [text])[0]
        torch.testing.assert_close(got, want["lou" if i % 2 else "pia"], atol=1e-5, rtol=1e-5)
    assert sum(1 for r in fresh.resident.values() if r.table == fresh.by_name["lora"]) == 2
    # replace: same name, another artifact, without a restart
    fresh.register("u1", arts["lea"], replace=True)
    torch.testing.assert_close(fresh.logits(["u1"], [text])[0], bank.logits(["lea"], [text])[0], atol=1e-5, rtol=1e-5)
    fresh.remove("u1")
    with pytest.raises(ValueError, match="unknown user 'u1'"):
        fresh.logits(["u1"], [text])
    # a pinned artifact is not evicted: with both LoRA slots pinned a third LoRA user must wait
    held = fresh.routes(["u3", "u5"])
    from lmadapt.serve import BankBusy
    with pytest.raises(BankBusy):
        fresh.acquire("u7")
    for r in held:
        fresh.release(r)
    fresh.acquire("u7")


def test_refusals_change_nothing(world, tmp_path):
    arch, tok, bank, arts = world
    before = (dict(bank.registry), list(bank.resident))
    other = "gpt2" if arch == "llama" else "llama"
    foreign = _artifact(other, tok, "lora", {}, tmp_path / "foreign", 0)
    with pytest.raises(ValueError, match="was trained on base model .* does not fit"):
        bank.register("zed", foreign)
    same_shape_other_weights = tmp_path / "other_weights"
    a = lmadapt.attach(make_model(arch, len(tok), seed=1), "lora", tokenizer=tok)
    a.save(same_shape_other_weights)
    with pytest.raises(ValueError, match="embedding_checksum"):
        bank.register("zed", same_shape_other_weights)
    ladder = _artifact(arch, tok, "ladder", {}, tmp_path / "ladder", 0)
    with pytest.raises(ValueError, match="method 'ladder' is not in this bank"):
        bank.register("zed", ladder)
    r8 = _artifact(arch, tok, "lora", {"r": 8}, tmp_path / "r8", 0)
    with pytest.raises(ValueError, match="r=8 .bank: 4."):
        bank.register("zed", r8)
    with pytest.raises(ValueError, match="already registered"):
        bank.register("lou", arts["lea"])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "method.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        bank.register("zed", broken)
    assert (dict(bank.registry), list(bank.resident)) == before
    # the bank still answers as before
    test_mixed_batch_logits_equal_each_row_alone(world)
