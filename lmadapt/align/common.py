"""What SFT, the reward model, DPO and PPO share: how a prompt and a response become token ids
(the model's chat template when it has one), response log-probs, the reference policy, and the
runner that trains through trainer.fit and writes result.json.

Layout of one sequence: prompt ids + response ids, labels -100 on the prompt (as
batching.Encoder.generation), so a batch pads left like every causal batch in lmadapt.
"""
from __future__ import annotations

import contextlib
import copy
import json
import re
from pathlib import Path

import torch

from ..adapted import Adapted
from ..batching import Encoder
from ..methods import get_method
from ..objectives import linear_token_logprobs

_TURN = re.compile(r"\n*(Human|Assistant):[ \t]?")


def messages_of(task, example) -> list[dict]:
    """The conversation before the response as chat messages. A "Human: ... Assistant:" dialogue
    (hh_rlhf) becomes its turns; otherwise the user says the instruction (and its input)."""
    text = example.text
    if text.lstrip().startswith("Human:"):
        parts = _TURN.split(text.strip())[1:]            # [role, content, role, content, ...]
        turns = [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
                 for r, c in zip(parts[::2], parts[1::2])]
        if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns.pop()                                  # the open "Assistant:" the response fills
        return turns
    user = text if example.text_pair is None else f"{text}\n\n{example.text_pair}"
    return [{"role": "user", "content": user}]


class ChatFormat:
    """Prompt and response ids for a task's examples. `chat=None`: the model's chat template when
    its tokenizer has one (SmolLM2-Instruct does), else the task's own prompt and " response<eos>"
    (the convention of lmadapt.tasks)."""

    def __init__(self, tokenizer, task, chat: bool | None = None, max_length: int = 256,
                 max_response_length: int = 128):
        if tokenizer is None:
            raise ValueError("alignment needs the model's tokenizer: attach with tokenizer=...")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat and not has_template:
            raise ValueError("chat=True but the tokenizer has no chat template; use chat=False (the task's prompt)")
        self.tok, self.task = tokenizer, task
        self.chat = has_template if chat is None else chat
        self.max_length, self.max_response_length = max_length, max_response_length
        if max_response_length >= max_length:
            raise ValueError(f"max_response_length ({max_response_length}) must be below max_length ({max_length}): "
                             "raise --max-length or lower --max-response-length / --max-new-tokens")

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def prompt_text(self, example) -> str:
        if not self.chat:
            return self.task.format(example)
        return self.tok.apply_chat_template(messages_of(self.task, example), add_generation_prompt=True,
                                            tokenize=False)

    def prompt_ids(self, example) -> list[int]:
        """The prompt's last max_length - max_response_length tokens (the end is what the
        response continues)."""
        return self._ids(self.prompt_text(example))[-(self.max_length - self.max_response_length):]

    def response_text(self, example, response: str) -> str:
        """The response as the model sees it after the prompt: the chat template's closing of an
        assistant turn included (its end-of-turn token), or " response" (the eos id follows)."""
        if not self.chat:
            return " " + response.strip()
        prompt = self.prompt_text(example)
        full = self.tok.apply_chat_template(messages_of(self.task, example) + [
            {"role": "assistant", "content": response.strip()}], tokenize=False)
        return full[len(prompt):] if full.startswith(prompt) else response.strip()

    def response_ids(self, example, response: str) -> list[int]:
        ids = self._ids(self.response_text(example, response))
        if self.chat:
            return ids[: self.max_response_length]
        eos = self.tok.eos_token_id
        return ids[: self.max_response_length - 1] + ([eos] if eos is not None else [])

    def sequence(self, example, response: str) -> dict:
        """{'input_ids': prompt + response, 'labels': -100 on the prompt, the response ids after}."""
        p, r = self.prompt_ids(example), self.response_ids(example, response)
        return {"input_ids": p + r, "labels": [-100] * len(p) + r}

    def collate(self, feats: list[dict], device=None) -> dict[str, torch.Tensor]:
        return Encoder(self.tok, True).collate(feats, device)


def token_logprobs(adapted, input_ids, attention_mask, labels) -> torch.Tensor:
    """log p(labels[t] | tokens < t) at every labelled position, (B, T) with 0 elsewhere (the
    first position never has a label: nothing predicts it). Fused and chunked over the
    vocabulary (objectives.linear_token_logprobs): the (B, T, V) logits are never held."""
    hidden, _ = adapted.encode(input_ids, attention_mask)                 # (B, T, H)
    target = labels[:, 1:]
    keep = target != -100
    lp = linear_token_logprobs(adapted.model.get_output_embeddings(), hidden[:, :-1][keep], target[keep])
    out = hidden.new_zeros(labels.shape, dtype=torch.float32)
    out[:, 1:][keep] = lp
    return out


def response_logprobs(adapted, batch: dict) -> torch.Tensor:
    """Sum of the response tokens' log-probs per row: (B,)."""
    return token_logprobs(adapted, batch["input_ids"], batch["attention_mask"], batch["labels"]).sum(1)


class Reference:
    """The reference policy of DPO and PPO: the policy with its delta turned off
    (`Adapted.disabled()`, no second copy of the model), or, for `full` (every weight trains, so
    there is nothing to turn off), a frozen copy of the model taken when this is built."""

    def __init__(self, adapted: Adapted):
        self.adapted = adapted
        self.copy = None
        if adapted.method.name == "full":
            self.copy = Adapted(copy.deepcopy(adapted.model), get_method("none"), tokenizer=adapted.tokenizer).eval()

    @contextlib.contextmanager
    def model(self):
        """The reference as an Adapted model, in eval mode (no dropout), for a no-grad pass."""
        if self.copy is not None:
            if self.copy.device != self.adapted.device:  # the trainer moved the policy (to CUDA)
                self.copy.to(self.adapted.device)
            yield self.copy
            return
        was = self.adapted.training
        self.adapted.eval()
        try:
            with self.adapted.disabled():
                yield self.adapted
        finally:
            self.adapted.train(was)


def run(adapted, task, objective, *, out=None, resume=False, seed=0, data_root=None, max_train=None,
        train_examples=None, dev_examples=None, extra: dict | None = None, **config) -> dict:
    """Train `adapted` with `objective` through trainer.fit (lmadapt.api.train: best dev
    checkpoint, checkpoints, resume) and write out/result.json with `extra` (the objective's
    settings) under "align". -> the result dict."""
    from accelerate import PartialState

    from ..api import is_main_process, train
    from ..atomic import write_json
    if PartialState().num_processes > 1:  # the log-prob passes bypass DDP's forward (Adapted.encode)
        raise ValueError("alignment (sft, reward, dpo, ppo) runs in one process; launch it without accelerate")
    extra = extra or {}
    if out:  # the stage's own settings (beta, ...): a --resume must keep them too
        settings = Path(out) / "align.json"
        if resume and settings.exists():
            saved = json.loads(settings.read_text())
            diff = [f"{k} ({saved.get(k)} -> {extra.get(k)})" for k in sorted(set(saved) | set(extra))
                    if saved.get(k) != extra.get(k)]
            if diff:
                raise ValueError(f"{out}: --resume with other settings than the interrupted run: {', '.join(diff)}; "
                                 "resume with the same settings, or train into a new --out")
        if is_main_process():
            write_json(settings, extra)
    result = train(adapted, task, train_examples=train_examples, dev_examples=dev_examples, seed=seed,
                   data_root=data_root, out=out, resume=resume, max_train=max_train, ood=[],
                   objective=objective, **config)
    result["align"] = extra
    if out and is_main_process():
        write_json(Path(out) / "result.json", result)
    return result


def in_batches(items: list, batch_size: int, fn, desc: str = "", progress: bool = False) -> list:
    """fn(list of items) -> one result per item, over consecutive batches; results in order."""
    from ..evaluation import progress_bar
    out = []
    with progress_bar(len(items), desc, progress) as bar:
        for i in range(0, len(items), batch_size):
            out.extend(fn(items[i:i + batch_size]))
            bar.update(len(items[i:i + batch_size]))
    return out


def start_from(init, model=None, tokenizer=None):
    """An earlier stage's artifact (e.g. an SFT run or its best/ folder) merged into its base:
    -> (model, tokenizer, artifact path) to attach the next stage's method to. Set the new
    Adapted's `init` to the path, so its artifact records it and load_adapted rebuilds this."""
    from ..api import load_adapted
    path = Path(init)
    if (path / "best" / "method.json").exists():
        path = path / "best"
    earlier = load_adapted(path, model=model, tokenizer=tokenizer)
    return earlier.merged_model(), earlier.tokenizer, str(path.resolve())
