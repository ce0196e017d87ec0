"""Alignment on tiny random models: the disabled-adapter reference is the base model, DPO raises
the chosen-vs-rejected margin, the reward model learns a preference and reloads, PPO raises a toy
reward with the KL penalty holding the policy near the reference, PPO resumes exactly, the
chat-template formatting, and the four commands end to end (with --init and --resume)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_model, make_tokenizer

import lmadapt
from lmadapt import align
from lmadapt.align.common import ChatFormat, Reference, messages_of, token_logprobs
from lmadapt.align.ppo import KLController, response_mask
from lmadapt.cli import main
from lmadapt.data import Example
from lmadapt.heads import HEADS, RewardHead
from lmadapt.tasks import Task, get_task

FILLER = "the a movie film was is it this".split()


def _prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [" ".join(FILLER[int(i)] for i in torch.randint(len(FILLER), (3,), generator=g)) for _ in range(n)]


def _pairs(n, seed):
    return [Example(text=p + " :", target="good great fun", rejected="bad awful boring") for p in _prompts(n, seed)]


PREF = Task(name="toypref", kind="preference", metric="preference_accuracy", prompt="{text}",
            splits={"train": lambda r: _pairs(32, 0), "dev": lambda r: _pairs(8, 1)}, uses_data_root=False)
PROMPTS = Task(name="toyprompts", kind="instruction", metric="rouge_l", prompt="{text}",
               splits={"train": lambda r: [Example(text=p, target="x") for p in _prompts(32, 0)],
                       "dev": lambda r: [Example(text=p, target="x") for p in _prompts(16, 1)]}, uses_data_root=False)
SHORT = dict(max_length=32, max_response_length=8, progress=False)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def _batch(tok, fmt, examples):
    return fmt.collate([fmt.sequence(ex, ex.target) for ex in examples])


def test_disabled_reference_equals_the_base_models_logprobs(tok):
    base = make_model("llama", len(tok))
    plain = make_model("llama", len(tok))                          # the same weights, nothing injected
    adapted = lmadapt.attach(base, "lora", tokenizer=tok, init_seed=0)
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)                                   # a trained-looking delta
    fmt = ChatFormat(tok, PREF, max_length=32, max_response_length=8)
    batch = _batch(tok, fmt, _pairs(4, 3))
    with torch.no_grad():
        with Reference(adapted).model() as ref:
            got = token_logprobs(ref, batch["input_ids"], batch["attention_mask"], batch["labels"])
        on = token_logprobs(adapted, batch["input_ids"], batch["attention_mask"], batch["labels"])
        none = lmadapt.attach(plain, "none", tokenizer=tok)
        want = token_logprobs(none, batch["input_ids"], batch["attention_mask"], batch["labels"])
        # and against the plain HF model's own logits (positions from each row's first real token)
        pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=pos).logits
    assert torch.equal(got, want)                                    # exactly: no second copy, no drift
    assert not torch.allclose(on, want, atol=1e-3)                   # the delta is on outside disabled()
    lab = batch["labels"][:, 1:]
    hf = F.log_softmax(logits[:, :-1].float(), -1).gather(2, lab.clamp(min=0)[..., None]).squeeze(-1) * (lab != -100)
    assert torch.allclose(got[:, 1:], hf, atol=1e-5)


DELTA_METHODS = ("adapter", "bitfit", "intrinsic", "ladder", "lora", "prefix", "prompt", "ptuning", "ptuning2")


@pytest.mark.parametrize("method", DELTA_METHODS)
def test_every_delta_methods_reference_is_the_base_and_a_dpo_step_trains_it(tok, method):
    """Every delta method: disabled() gives the base model's log-probs exactly, and one DPO step
    changes the method's tensors only (the base stays frozen)."""
    adapted = lmadapt.attach(make_model("llama", len(tok)), method, tokenizer=tok, init_seed=0)
    plain = lmadapt.attach(make_model("llama", len(tok)), "none", tokenizer=tok)
    fmt = ChatFormat(tok, PREF, max_length=32, max_response_length=8)
    batch = _batch(tok, fmt, _pairs(2, 3))
    with torch.no_grad(), Reference(adapted).model() as ref:
        got = token_logprobs(ref, batch["input_ids"], batch["attention_mask"], batch["labels"])
        want = token_logprobs(plain, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.equal(got, want)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    align.dpo(adapted, PREF, train_examples=_pairs(4, 0), dev_examples=[], max_steps=1, batch_size=2, lr=1e-2,
              warmup_ratio=0.0, **SHORT)
    changed = {n for n, p in adapted.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable, (changed - trainable)


def test_full_reference_is_a_frozen_copy(tok):
    adapted = lmadapt.attach(make_model("llama", len(tok)), "full", tokenizer=tok)
    ref = Reference(adapted)
    assert ref.copy is not None and not any(p.requires_grad for p in ref.copy.parameters())
    fmt = ChatFormat(tok, PREF, max_length=32, max_response_length=8)
    batch = _batch(tok, fmt, _pairs(2, 3))
    with torch.no_grad():
        before = token_logprobs(adapted, batch["input_ids"], batch["attention_mask"], batch["labels"])
        adapted.model.get_input_embeddings().weight.add_(0.1)      # the policy trains...
        with ref.model() as r:                                      # ...the reference stays where it started
            assert torch.equal(token_logprobs(r, batch["input_ids"], batch["attention_mask"], batch["labels"]), before)


def test_dpo_30_steps_raise_the_margin(tok):
    policy = lmadapt.attach(make_model("llama", len(tok)), "lora", tokenizer=tok, init_seed=0)
    res = align.dpo(policy, PREF, beta=0.5, max_steps=30, batch_size=4, lr=5e-3, eval_every=30, **SHORT)
    h = res["history"]
    assert h[0]["margin"] == 0 and abs(h[0]["loss"] - 0.693147) < 1e-5   # LoRA starts as the reference
    assert sum(r["margin"] for r in h[-5:]) / 5 > 1.0
    assert h[-1]["loss"] < 0.4 and res["metrics"]["dev"]["preference_accuracy"] == 1.0
    assert res["metrics"]["dev"]["margin"] > 0.5 and res["align"]["reference"] == "disabled adapter"
    # precomputed reference log-probs: the same trajectory (the second epoch reads the cache)
    short = dict(beta=0.5, max_steps=10, batch_size=4, lr=5e-3, eval_every=10, **SHORT)
    two = [align.dpo(lmadapt.attach(make_model("llama", len(tok)), "lora", tokenizer=tok, init_seed=0),
                     PREF, precompute_ref=pre, **short)["history"] for pre in (False, True)]
    assert [r["loss"] for r in two[1]] == pytest.approx([r["loss"] for r in two[0]], abs=1e-5)


def test_reward_model_learns_pairs_and_reloads(tok, tmp_path):
    assert HEADS["reward"] is not None
    rm = align.attach_reward_model(make_model("llama", len(tok)), "lora", tok)
    assert isinstance(rm.head, RewardHead)
    res = align.train_reward(rm, PREF, max_steps=20, batch_size=4, lr=1e-2, out=tmp_path / "rm", **SHORT)
    dev = res["metrics"]["dev"]
    assert dev["preference_accuracy"] == 1.0 and dev["margin"] > 1.0 and res["history"][0]["margin"] == 0
    again = lmadapt.load_adapted(tmp_path / "rm" / "best", model=make_model("llama", len(tok)), tokenizer=tok)
    fmt = ChatFormat(tok, PREF, max_length=32, max_response_length=8)
    ex = _pairs(2, 5)
    batch = fmt.collate([fmt.sequence(e, e.target) for e in ex] + [fmt.sequence(e, e.rejected) for e in ex])
    s1 = align.score(rm.eval(), batch["input_ids"], batch["attention_mask"])
    s2 = align.score(again, batch["input_ids"], batch["attention_mask"])
    assert torch.allclose(s1, s2) and (s1[:2] > s1[2:]).all()
    with pytest.raises(ValueError, match="as many chosen"):
        rm.head.loss(torch.zeros(3, 1), torch.tensor([1, 1, 0]))


def _count_good(tok):
    good = tok.convert_tokens_to_ids("good")
    return lambda p, pm, r, rm: ((r == good) & rm.bool()).sum(1).float()


PPO_CFG = dict(max_steps=12, batch_size=16, max_new_tokens=8, lr=1e-2, max_length=32, max_eval=8, progress=False)


def test_ppo_raises_a_toy_reward_with_the_kl_bounded(tok):
    """Reward = how often the token 'good' is in the response. `full`, because a tiny random
    model's logits are too small for LoRA to move them (its tied embeddings stay frozen)."""
    runs = {}
    for kl_coef in (0.3, 0.0):
        policy = lmadapt.attach(make_model("llama", len(tok)), "full", tokenizer=tok, init_seed=0)
        runs[kl_coef] = align.ppo(policy, PROMPTS, _count_good(tok), align.PPOConfig(kl_coef=kl_coef, **PPO_CFG))
    h = runs[0.3]["history"]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(h[-3:], "reward") > 2 * mean(h[:3], "reward")
    assert h[0]["kl"] == 0 and h[0]["clip_fraction"] > 0                 # rollout 1: policy == reference
    assert set(h[0]) >= {"reward", "kl", "entropy", "clip_fraction", "value_loss", "policy_loss", "kl_coef"}
    assert h[-1]["entropy"] < h[0]["entropy"]
    free = runs[0.0]["history"]
    assert mean(h[-3:], "kl") < 5 and mean(h[-3:], "kl") < mean(free[-3:], "kl") / 3   # the penalty holds it
    dev = runs[0.3]["metrics"]["dev"]
    assert dev["reward"] > dev["reward_reference"] and dev["win_rate"] > 0.5
    assert runs[0.3]["align"]["reference"] == "copy"


def test_ppo_resumes_exactly(tok, tmp_path, monkeypatch):
    import lmadapt.trainer as T
    # adaptive KL with a short horizon: the coefficient moves every step, so it must be restored
    cfg = dict(PPO_CFG, max_steps=4, batch_size=4, save_every=2, max_eval=2, adaptive_kl=True, kl_target=0.01,
               kl_horizon=8)
    fresh = lambda: lmadapt.attach(make_model("llama", len(tok)), "lora", tokenizer=tok, init_seed=0)  # noqa: E731
    ref = align.ppo(fresh(), PROMPTS, _count_good(tok), align.PPOConfig(**cfg), out=tmp_path / "ref")
    real = T._batch_indices

    class Crash(Exception):
        pass

    def crash_at_3(step, *a):
        if step == 3:
            raise Crash
        return real(step, *a)
    monkeypatch.setattr(T, "_batch_indices", crash_at_3)
    with pytest.raises(Crash):
        align.ppo(fresh(), PROMPTS, _count_good(tok), align.PPOConfig(**cfg), out=tmp_path / "run")
    monkeypatch.setattr(T, "_batch_indices", real)
    with pytest.raises(ValueError, match="kl_coef"):
        align.ppo(fresh(), PROMPTS, _count_good(tok), align.PPOConfig(**(cfg | {"kl_coef": 0.5})),
                  out=tmp_path / "run", resume=True)
    got = align.ppo(fresh(), PROMPTS, _count_good(tok), align.PPOConfig(**cfg), out=tmp_path / "run", resume=True)
    assert got["history"] == ref["history"] and got["evals"] == ref["evals"]
    assert ref["history"][-1]["kl_coef"] != ref["history"][0]["kl_coef"]
    from safetensors.torch import load_file
    for name in ("best/adapter.safetensors", "value_head.safetensors"):
        a, b = load_file(tmp_path / "ref" / name), load_file(tmp_path / "run" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_kl_controller_and_response_mask():
    ctl = KLController(0.1, True, target=6.0, horizon=80)
    ctl.update(12.0, 8)
    assert abs(ctl.coef - 0.102) < 1e-12
    fixed = KLController(0.1, False, 6.0, 80)
    fixed.update(12.0, 8)
    assert fixed.coef == 0.1
    r = torch.tensor([[5, 4, 4, 4], [5, 6, 7, 8], [4, 4, 4, 4]])
    assert response_mask(r, [4]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_chat_format_uses_the_template_and_splits_hh_dialogues(tok):
    hh = Example(text="\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant:", target="fine")
    assert messages_of(None, hh) == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                                     {"role": "user", "content": "how are you?"}]
    alpaca = Example(text="Add the numbers.", text_pair="2 and 3", target="5")
    assert messages_of(None, alpaca) == [{"role": "user", "content": "Add the numbers.\n\n2 and 3"}]
    plain = ChatFormat(tok, PREF, max_length=32, max_response_length=8)
    assert not plain.chat and plain.response_ids(_pairs(1, 0)[0], "good")[-1] == tok.eos_token_id
    chat_tok = make_tokenizer()
    chat_tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} |{% endfor %}"
                              "{% if add_generation_prompt %}<assistant> {% endif %}")
    fmt = ChatFormat(chat_tok, get_task("alpaca"), max_length=64, max_response_length=8)
    assert fmt.chat and fmt.prompt_text(alpaca) == "<user> Add the numbers.\n\n2 and 3 |<assistant> "
    seq = fmt.sequence(alpaca, "5")
    assert chat_tok.decode([t for t in seq["labels"] if t != -100]) == "5 |"   # the template's own closing
    with pytest.raises(ValueError, match="no chat template"):
        ChatFormat(tok, PREF, chat=True)


def test_merged_model_is_the_reference_of_the_next_stage(tok, tmp_path):
    """SFT (LoRA) -> its delta merged into the base -> a fresh LoRA: disabled() is the SFT model."""
    sft = lmadapt.attach(make_model("llama", len(tok)), "lora", tokenizer=tok, init_seed=0)
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    fmt = ChatFormat(tok, PREF, max_length=32, max_response_length=8)
    batch = _batch(tok, fmt, _pairs(3, 2))
    with torch.no_grad():
        want = token_logprobs(sft, batch["input_ids"], batch["attention_mask"], batch["labels"])
    sft.save(tmp_path / "sft")
    model, tok2, init = align.common.start_from(tmp_path / "sft", model=make_model("llama", len(tok)), tokenizer=tok)
    nxt = lmadapt.attach(model, "lora", tokenizer=tok2)
    nxt.init = init
    with torch.no_grad(), Reference(nxt).model() as ref:
        got = token_logprobs(ref, batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert torch.allclose(got, want, atol=1e-5)
    assert not any("lora" in n for n, _ in model.named_modules() if n.endswith(".base"))
    nxt.save(tmp_path / "next")
    assert json.loads((tmp_path / "next" / "method.json").read_text())["init"] == init


def test_cli_commands_end_to_end_and_resume(tiny_dir, tmp_path, capsys):
    common = ["--model", str(tiny_dir), "--max-train", "16", "--max-steps", "2", "--batch-size", "4",
              "--max-eval", "4", "--max-length", "64", "--no-progress"]
    runs = {k: tmp_path / k for k in ("sft", "rm", "dpo", "ppo")}
    assert main(["sft", *common, "--max-response-length", "16", "--out", str(runs["sft"])]) == 0
    assert main(["reward", *common, "--max-response-length", "16", "--task", "ultrafeedback",
                 "--out", str(runs["rm"])]) == 0
    assert main(["dpo", *common, "--max-response-length", "16", "--init", str(runs["sft"]), "--beta", "0.2",
                 "--out", str(runs["dpo"])]) == 0
    assert main(["ppo", *common, "--max-new-tokens", "8", "--init", str(runs["sft"]), "--reward-model",
                 str(runs["rm"]), "--ppo-epochs", "2", "--adaptive-kl", "--out", str(runs["ppo"])]) == 0
    results = {k: json.loads((v / "result.json").read_text()) for k, v in runs.items()}
    assert all(len(r["history"]) == 2 for r in results.values())
    assert "rouge_l" in results["sft"]["metrics"]["dev"] and "nll" in results["sft"]["metrics"]["dev"]
    assert "preference_accuracy" in results["rm"]["metrics"]["dev"]
    assert results["dpo"]["align"]["beta"] == 0.2 and "margin" in results["dpo"]["history"][0]
    assert {"reward", "kl", "entropy", "clip_fraction", "value_loss"} <= set(results["ppo"]["history"][0])
    assert results["ppo"]["train_config"]["adaptive_kl"] is True
    # the DPO artifact records the SFT run it started from, and loads on its own
    dpo = lmadapt.load_adapted(runs["dpo"] / "best")
    assert dpo.init and dpo.init.endswith("best") and dpo.method.name == "lora"
    # --resume: a finished run continues to a larger budget from its last checkpoint
    capsys.readouterr()
    assert main(["dpo", *[c if c != "2" else "3" for c in common], "--max-response-length", "16", "--init",
                 str(runs["sft"]), "--beta", "0.2", "--out", str(runs["dpo"]), "--resume"]) == 2
    assert "max_steps (2 -> 3)" in capsys.readouterr().err
    assert main(["dpo", *common, "--max-response-length", "16", "--init", str(runs["sft"]), "--beta", "0.3",
                 "--out", str(runs["dpo"]), "--resume"]) == 2
    assert "beta (0.2 -> 0.3)" in capsys.readouterr().err
    assert main(["ppo", *common, "--out", str(runs["ppo"]), "--reward-model", str(runs["rm"]),
                 "--init", str(runs["sft"]), "--max-new-tokens", "8", "--ppo-epochs", "2", "--adaptive-kl",
                 "--resume"]) == 0
    assert json.loads((runs["ppo"] / "result.json").read_text())["history"] == results["ppo"]["history"]
    capsys.readouterr()
    assert main(["ppo", *common, "--out", str(tmp_path / "x")]) == 2
    assert "--reward-model" in capsys.readouterr().err


@pytest.mark.integration
def test_smollm2_chat_format_and_disabled_reference():
    """SmolLM2-Instruct: an HH dialogue in its chat template, the response closed by the template's
    <|im_end|> (the tokenizer's EOS), and the disabled adapter's log-probs untouched by a delta."""
    model, tok = lmadapt.load("smollm2-135m")
    task = get_task("hh_rlhf")
    ex = task.load("dev")[0]
    fmt = ChatFormat(tok, task, max_length=256, max_response_length=64)
    assert fmt.chat and fmt.prompt_text(ex).endswith("<|im_start|>assistant\n")
    assert fmt.prompt_text(ex).count("<|im_start|>user") == ex.text.count("Human:")
    short = Example(text=ex.text, target="Sure.", rejected="No.")
    seq = fmt.sequence(short, short.target)
    response = [t for t in seq["labels"] if t != -100]
    assert tok.decode(response) == "Sure.<|im_end|>\n" and tok.eos_token_id in response
    adapted = lmadapt.attach(model, "lora", tokenizer=tok, init_seed=0)
    batch = fmt.collate([fmt.sequence(short, short.target), fmt.sequence(short, short.rejected)])
    args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
    with torch.no_grad():
        base = token_logprobs(adapted, *args)                        # LoRA's B = 0: the base model
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
        with Reference(adapted).model() as ref:
            assert torch.equal(token_logprobs(ref, *args), base)
        assert not torch.allclose(token_logprobs(adapted, *args), base, atol=1e-3)
