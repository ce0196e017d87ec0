"""The training loop: determinism, exact resume after the process is killed, and 2 processes
under `accelerate launch` following the 1-process loss trajectory."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import lmadapt
from conftest import TOY_CLS, TOY_GEN, _toy_examples, make_model, make_tokenizer, subprocess_env

BIN = Path(sys.executable).parent



@pytest.fixture(scope="module")
def toy_tsv(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "toy.tsv"
    p.write_text("sentence\tlabel\n" + "".join(f"{e.text}\t{e.label}\n" for e in _toy_examples(64)))
    return p


def _cli(tiny_dir, toy_tsv, out, *extra):
    return [str(BIN / "lmadapt"), "train", "--model", str(tiny_dir), "--train", str(toy_tsv), "--dev", str(toy_tsv),
            "--text-col", "sentence", "--label-col", "label", "--out", str(out), "--no-progress", *extra]


def test_same_seed_same_weights():
    def run():
        tok = make_tokenizer()
        torch.manual_seed(0)
        a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, dropout=0.1)
        init = {n: p.detach().clone() for n, p in a.named_parameters() if p.requires_grad}
        r = lmadapt.train(a, TOY_CLS, max_steps=6, batch_size=8, progress=False)
        assert len(r["history"]) == 6
        return init, {n: p.detach().clone() for n, p in a.named_parameters() if p.requires_grad}
    (init1, w1), (init2, w2) = run(), run()
    assert w1.keys() == w2.keys() == init1.keys()
    for k in w1:
        assert torch.equal(init1[k], init2[k]) and torch.equal(w1[k], w2[k]), k
    # and training did something: every LoRA tensor and the head moved away from its init
    moved = {k for k in w1 if not torch.equal(w1[k], init1[k])}
    assert moved == set(w1), sorted(set(w1) - moved)


def test_loss_decreases_on_generation_task():
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("gpt2", len(tok)), "full", tokenizer=tok)
    r = lmadapt.train(a, TOY_GEN, epochs=6, batch_size=8, lr=3e-3, progress=False, max_new_tokens=6)
    losses = [h["loss"] for h in r["history"]]
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert r["metrics"]["dev"]["bleu"] > 30  # it learned the template


def tiny_llama_counts(V: int) -> tuple[int, int]:
    """(base parameters, LoRA r=4 + head parameters) of conftest's tiny LLaMA, by hand.
    hidden 32, 2 layers, 4 heads of 8, 2 KV heads (k, v: 32 -> 16), FFN 64, tied embeddings.
    Base: embeddings V*32; per layer q 32*32, k 32*16, v 32*16, o 32*32, gate/up 32*64, down 64*32
    and 2 RMSNorms of 32 = 9,280; final norm 32.
    LoRA r=4 on the seven projections, r * (in + out) each: q 4*64, k 4*48, v 4*48, o 4*64,
    gate 4*96, up 4*96, down 4*96 = 2,048 per layer; head 2*32 + 2."""
    base = V * 32 + 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32
    return base, 2 * 2048 + 2 * 32 + 2


def test_result_json_fields(tmp_path):
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, r=4)
    rss_before = psutil.Process().memory_info().rss / 2**20
    t0 = time.perf_counter()
    lmadapt.train(a, TOY_CLS, max_steps=3, batch_size=8, progress=False, out=tmp_path / "run", seed=3)
    wall = time.perf_counter() - t0
    r = json.loads((tmp_path / "run" / "result.json").read_text())
    for key in ("metrics", "trainable_params", "trainable_percent", "bytes_on_disk", "train_seconds",
                "peak_memory_mb", "examples_per_second", "model", "task", "method", "shots", "seed", "versions"):
        assert key in r, key
    assert r["seed"] == 3 and r["method"] == "lora" and r["task"] == "toy"
    assert r["bytes_on_disk"] == sum(f.stat().st_size for f in (tmp_path / "run" / "best").iterdir())
    base, trainable = tiny_llama_counts(len(tok))
    assert (r["trainable_params"], a.num_base()) == (trainable, base)
    assert r["trainable_percent"] == pytest.approx(100 * trainable / (base + trainable))
    assert 0 < r["train_seconds"] < wall
    assert r["examples_per_second"] * r["train_seconds"] == pytest.approx(3 * 8)   # 3 steps of 8
    # CPU: the process's RSS sampled during training, in MiB: at least what it held before
    total = psutil.virtual_memory().total / 2**20
    assert 0.9 * rss_before <= r["peak_memory_mb"] < total
    assert 0 <= r["added_memory_mb"] <= r["peak_memory_mb"]


def test_full_trainable_percent_is_100():
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "full", task=TOY_CLS, tokenizer=tok)
    r = lmadapt.train(a, TOY_CLS, max_steps=1, batch_size=8, progress=False)   # no out: no checkpoints
    base, _ = tiny_llama_counts(len(tok))
    assert r["trainable_params"] == base + 2 * 32 + 2 and r["trainable_percent"] == 100.0
    assert r["train_seconds"] > 0 and r["examples_per_second"] * r["train_seconds"] == pytest.approx(8)


# Runs the CLI and records which optimizer steps the loop ran (the data order of step t is
# _batch_indices(t, ...)): a "resume" that restarts from step 0 gives the same weights, since runs
# are deterministic, but not the same steps.
STEP_SPY = """
import json, sys
import lmadapt.trainer as T
steps, batch_indices = [], T._batch_indices
T._batch_indices = lambda step, *a: steps.append(step) or batch_indices(step, *a)
from lmadapt.cli import main
code = main(sys.argv[2:])
json.dump(steps, open(sys.argv[1], "w"))
sys.exit(code)
"""


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted(tiny_dir, toy_tsv, tmp_path):
    args = ("--method", "lora", "--method-args", "r=4,dropout=0.1", "--max-steps", "120", "--batch-size", "8",
            "--save-every", "4", "--eval-every", "120")
    env = subprocess_env()
    subprocess.run(_cli(tiny_dir, toy_tsv, tmp_path / "ref", *args), check=True, env=env, capture_output=True)

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(tiny_dir, toy_tsv, out, *args), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    state = out / "checkpoint" / "state.json"
    deadline = time.time() + 120
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if state.exists():
            try:
                step = json.loads(state.read_text())["loop"]["step"]
            except (json.JSONDecodeError, KeyError, FileNotFoundError):
                step = 0
            if step >= 20:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "result.json").exists()
    killed_at = json.loads(state.read_text())["loop"]["step"]            # the last checkpoint written
    assert killed_at >= 20 and killed_at % 4 == 0
    spy, steps = tmp_path / "spy.py", tmp_path / "steps.json"
    spy.write_text(STEP_SPY)
    r = subprocess.run([str(BIN / "python"), str(spy), str(steps)] + _cli(tiny_dir, toy_tsv, out, *args, "--resume")[1:],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"at step {killed_at}/120" in r.stdout + r.stderr
    assert json.loads(steps.read_text()) == list(range(killed_at, 120))    # it ran only the steps left
    ref, got = load_file(tmp_path / "ref" / "best" / "adapter.safetensors"), load_file(out / "best" / "adapter.safetensors")
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    h_ref = json.loads((tmp_path / "ref" / "result.json").read_text())["history"]
    h_got = json.loads((out / "result.json").read_text())["history"]
    assert [h["loss"] for h in h_ref] == [h["loss"] for h in h_got]


class Crash(Exception):
    pass


RESUME = dict(max_steps=12, batch_size=8, grad_accum=2, lr=2e-2, eval_every=2, save_every=4, progress=False)


def test_resume_keeps_best_checkpoint_and_grad_accum(tmp_path, monkeypatch):
    """In process: a run that crashes at step 6 (last checkpoint: step 4), resumed on a freshly built
    model, runs steps 4..11 only and ends exactly as the uninterrupted run: losses, lr, dev evals,
    the best step (found BEFORE the crash, and tied after it: a resume that forgot the best would
    take the later one), the restored best weights and the best/ artifact. grad_accum=2, dropout on."""
    import lmadapt.trainer as T
    tok = make_tokenizer()

    def fresh():
        return lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, init_seed=0,
                              dropout=0.1)
    ref_model = fresh()
    ref = lmadapt.train(ref_model, TOY_CLS, out=tmp_path / "ref", **RESUME)
    acc = {e["step"]: e["accuracy"] for e in ref["evals"]}
    assert ref["best_step"] == 4 and acc[6] == acc[4] > max(acc[s] for s in (8, 10, 12)), acc

    steps, batch_indices = [], T._batch_indices

    def spy(step, *a, crash_at=None):
        if step == crash_at:
            raise Crash
        steps.append(step)
        return batch_indices(step, *a)
    monkeypatch.setattr(T, "_batch_indices", lambda step, *a: spy(step, *a, crash_at=6))
    with pytest.raises(Crash):
        lmadapt.train(fresh(), TOY_CLS, out=tmp_path / "run", **RESUME)
    assert steps == list(range(6)) and not (tmp_path / "run" / "result.json").exists()
    assert json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())["loop"]["step"] == 4
    monkeypatch.setattr(T, "_batch_indices", spy)
    with pytest.raises(ValueError, match=r"grad_accum \(2 -> 1\)"):        # the data order would differ
        lmadapt.train(fresh(), TOY_CLS, out=tmp_path / "run", resume=True, **(RESUME | {"grad_accum": 1}))

    steps.clear()
    got_model = fresh()
    got = lmadapt.train(got_model, TOY_CLS, out=tmp_path / "run", resume=True, **RESUME)
    assert steps == list(range(4, 12))
    assert got["history"] == ref["history"] and got["evals"] == ref["evals"]
    assert (got["best_step"], got["best_dev"], got["metrics"]) == (ref["best_step"], ref["best_dev"], ref["metrics"])
    for (n, p), q in zip(got_model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), n                                          # the best step's weights, restored
    a, b = (load_file(tmp_path / r / "best" / "adapter.safetensors") for r in ("ref", "run"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_two_processes_same_trajectory_as_one(tiny_dir, toy_tsv, tmp_path):
    args = ("--method", "lora", "--max-steps", "6", "--batch-size", "8", "--eval-every", "6")
    env = subprocess_env(OMP_NUM_THREADS="1")
    one = subprocess.run(_cli(tiny_dir, toy_tsv, tmp_path / "one", *args), env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    launch = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmadapt"]
    two = subprocess.run(launch + _cli(tiny_dir, toy_tsv, tmp_path / "two", *args)[1:], env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.loads((tmp_path / "one" / "result.json").read_text())
    r2 = json.loads((tmp_path / "two" / "result.json").read_text())
    assert r1["processes"] == 1 and r2["processes"] == 2
    l1, l2 = [h["loss"] for h in r1["history"]], [h["loss"] for h in r2["history"]]
    assert len(l1) == len(l2) == 6
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    # and the same result: final (best) weights and dev metrics
    assert r1["metrics"] == r2["metrics"] and r1["metrics"]["dev"]["n"] == 64
    w1, w2 = (load_file(tmp_path / r / "best" / "adapter.safetensors") for r in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def _gen_params(grad_accum, **kw):
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("gpt2", len(tok)), "lora", tokenizer=tok, init_seed=0)
    exs = TOY_GEN.load("train")[:11]
    r = lmadapt.train(a, TOY_GEN, train_examples=exs, dev_examples=[], max_steps=3, batch_size=4,
                      grad_accum=grad_accum, progress=False, **kw)
    return [p.detach().clone() for p in a.trainable_parameters()], r


def test_grad_accum_equals_one_big_batch():
    """Token-weighted: micro-batches with different numbers of target tokens still add up to the
    gradient of the whole batch (a per-chunk mean weighted by examples would not)."""
    p1, r1 = _gen_params(1)
    p2, r2 = _gen_params(2)
    assert [h["loss"] for h in r1["history"]] == pytest.approx([h["loss"] for h in r2["history"]], rel=1e-5)
    for x, y in zip(p1, p2):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_warmup_then_linear_decay():
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok)
    r = lmadapt.train(a, TOY_CLS, max_steps=10, batch_size=8, lr=1e-2, warmup_ratio=0.2, progress=False)
    # the lr after each step (the next step's): steps 0, 1 warm up at 0.5e-2 and 1e-2 (no wasted
    # zero-lr step), then linear decay over the remaining 8 steps to 0
    lrs = [h["lr"] / 1e-2 for h in r["history"]]
    assert lrs == pytest.approx([1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8, 0.0])


@pytest.mark.parametrize("with_out", [True, False])
def test_finishes_on_the_best_dev_checkpoint(tmp_path, with_out):
    tok = make_tokenizer()
    a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok, init_seed=0)
    r = lmadapt.train(a, TOY_CLS, max_steps=12, batch_size=8, lr=5e-2, eval_every=1, progress=False,
                      out=tmp_path / "run" if with_out else None)
    best = max(r["evals"], key=lambda e: e["accuracy"])
    assert r["best_step"] == min(e["step"] for e in r["evals"] if e["accuracy"] == best["accuracy"])
    again = lmadapt.evaluate(a, TOY_CLS)   # the weights in memory are the best step's, not the last's
    assert again["accuracy"] == best["accuracy"] == r["metrics"]["dev"]["accuracy"]
    if with_out:
        saved = load_file(tmp_path / "run" / "best" / "adapter.safetensors")
        live = dict(a.named_parameters())
        assert all(torch.equal(v, live[k][0] if getattr(live[k], "lmadapt_slotted", False) else live[k])
                   for k, v in saved.items())


def test_resume_refuses_other_settings(tiny_dir, toy_tsv, tmp_path):
    args = ("--method", "lora", "--max-steps", "4", "--batch-size", "8", "--save-every", "2")
    env = subprocess_env()
    subprocess.run(_cli(tiny_dir, toy_tsv, tmp_path / "r", *args), check=True, env=env, capture_output=True)
    r = subprocess.run(_cli(tiny_dir, toy_tsv, tmp_path / "r", "--method", "lora", "--max-steps", "4",
                            "--batch-size", "16", "--resume"), env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "batch_size (8 -> 16)" in r.stderr


LAUNCHED = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import lmadapt
import lmadapt.trainer as T
from conftest import TOY_CLS, TOY_GEN, make_model, make_tokenizer
from lmadapt.api import is_main_process
tok = make_tokenizer()
out = {{}}

def lora(arch, task):
    return lmadapt.attach(make_model(arch, len(tok)), "lora", tokenizer=tok, init_seed=0,
                          **({{"task": task}} if task is TOY_CLS else {{}}))

def weights(a):
    return {{n: p.detach().flatten().tolist() for n, p in a.named_parameters() if p.requires_grad}}

for name, task, n, arch in (("gen", TOY_GEN, 11, "gpt2"), ("cls", TOY_CLS, 9, "llama")):
    a = lora(arch, task)
    r = lmadapt.train(a, task, train_examples=task.load("train")[:n], dev_examples=[], max_steps=5,
                      batch_size=4, progress=False)
    out[name] = {{"loss": [h["loss"] for h in r["history"]], "weights": weights(a)}}

# with a dev set, uninterrupted and crashed at step 5 (last checkpoint: step 4) then resumed
cfg = dict(train_examples=TOY_CLS.load("train")[:20], max_steps=6, batch_size=4, lr=2e-2, eval_every=2,
           save_every=2, progress=False)
a = lora("llama", TOY_CLS)
r = lmadapt.train(a, TOY_CLS, out={work!r} + "/ref", **cfg)
out["dev"] = {{"loss": [h["loss"] for h in r["history"]], "weights": weights(a), "evals": r["evals"],
              "best_step": r["best_step"], "metrics": r["metrics"]}}
steps, batch_indices = [], T._batch_indices

def crash_at_5(step, *args):
    if step == 5:
        raise KeyboardInterrupt
    steps.append(step)
    return batch_indices(step, *args)
T._batch_indices = crash_at_5
try:
    lmadapt.train(lora("llama", TOY_CLS), TOY_CLS, out={work!r} + "/run", **cfg)
    raise SystemExit("the crash did not happen")
except KeyboardInterrupt:
    pass
T._batch_indices = lambda step, *args: steps.append(step) or batch_indices(step, *args)
a = lora("llama", TOY_CLS)
r = lmadapt.train(a, TOY_CLS, out={work!r} + "/run", resume=True, **cfg)
out["resumed"] = {{"loss": [h["loss"] for h in r["history"]], "weights": weights(a), "evals": r["evals"],
                  "best_step": r["best_step"], "metrics": r["metrics"], "steps": steps}}
if is_main_process():
    json.dump(out, open({path!r}, "w"))
"""


@pytest.mark.slow
def test_two_processes_uneven_and_generation_and_resume(tmp_path):
    """Last batch not divisible, variable target lengths: 2 processes follow 1 process (losses,
    final weights, dev evaluations); and under 2 processes a crashed run resumed from its
    checkpoint runs only the steps left and ends as the uninterrupted one."""
    tests = str(Path(__file__).parent)
    env = subprocess_env(OMP_NUM_THREADS="1")
    for procs in (1, 2):
        script = tmp_path / f"run{procs}.py"
        script.write_text(LAUNCHED.format(tests=tests, path=str(tmp_path / f"out{procs}.json"),
                                          work=str(tmp_path / f"w{procs}")))
        launch = [str(BIN / "accelerate"), "launch", "--num_processes", str(procs), "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"] + (["--multi_gpu"] if procs > 1 else ["--cpu"])
        r = subprocess.run(launch + [str(script)], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / f"out{p}.json").read_text()) for p in (1, 2))
    for name in ("gen", "cls", "dev", "resumed"):
        assert len(one[name]["loss"]) == (5 if name in ("gen", "cls") else 6)
        assert one[name]["loss"] == pytest.approx(two[name]["loss"], rel=1e-5, abs=1e-6), name
        assert one[name]["weights"].keys() == two[name]["weights"].keys()
        for k, w in one[name]["weights"].items():
            torch.testing.assert_close(torch.tensor(two[name]["weights"][k]), torch.tensor(w), atol=1e-5, rtol=1e-4,
                                       msg=lambda m: f"{name} {k}: {m}")
    for name in ("dev", "resumed"):
        assert one[name]["evals"] == two[name]["evals"] and one[name]["metrics"] == two[name]["metrics"], name
        assert one[name]["best_step"] == two[name]["best_step"]
    for run in (one, two):
        assert run["resumed"]["steps"] == [0, 1, 2, 3, 4, 4, 5]        # crashed at 5, resumed at 4
        for key in ("loss", "weights", "evals", "best_step", "metrics"):
            assert run["resumed"][key] == run["dev"][key], key


def test_min_steps_stretches_a_few_shot_run_and_keeps_its_evaluations():
    """32 examples at batch 8 are 4 steps an epoch: min_steps makes the run that long, with as many
    dev evaluations as its epochs (spread over it, the last at the end); max_steps still wins,
    and a run already longer than min_steps is left as it is."""
    tok = make_tokenizer()
    few = TOY_CLS.load("train")[:32]

    def run(**kw):
        a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=TOY_CLS, tokenizer=tok)
        return lmadapt.train(a, TOY_CLS, train_examples=few, batch_size=8, lr=1e-2, progress=False, **kw)
    r = run(epochs=1, min_steps=20)
    assert r["steps"] == len(r["history"]) == 20
    assert [e["step"] for e in r["evals"]] == [20]
    r = run(epochs=2, min_steps=20)
    assert r["steps"] == 20 and [e["step"] for e in r["evals"]] == [10, 20]
    r = run(epochs=8, min_steps=20)  # 32 steps by epochs: not stretched, one evaluation per epoch
    assert r["steps"] == 32 and [e["step"] for e in r["evals"]] == [4 * k for k in range(1, 9)]
    r = run(max_steps=6, min_steps=20)
    assert r["steps"] == 6
    with pytest.raises(ValueError, match="min_steps must be >= 1"):
        run(min_steps=0)


def test_default_lr_follows_the_task_kind():
    """No --lr: a generation task trains at the method's generation_lr, classification at default_lr."""
    from lmadapt.methods import METHODS
    lora = METHODS["lora"]
    assert lora.generation_lr is not None and lora.generation_lr != lora.default_lr
    tok = make_tokenizer()
    runs = {}
    for task in (TOY_GEN, TOY_CLS):
        a = lmadapt.attach(make_model("llama", len(tok)), "lora", task=task, tokenizer=tok)
        r = lmadapt.train(a, task, max_steps=2, batch_size=8, warmup_ratio=0.0, progress=False,
                          max_new_tokens=2)
        runs[task.kind] = r["lr"]
    assert runs == {"generation": lora.generation_lr, "classification": lora.default_lr}
    assert METHODS["full"].lr_for(TOY_GEN) == METHODS["full"].default_lr  # none set: default_lr everywhere
