"""Alignment on lmadapt's own Adapted models, with any method as the trainable part:

- sft.py     supervised fine-tuning on instruction data (chat template, loss on the response)
- reward.py  a reward model: the scalar `reward` head + Bradley-Terry on preference pairs
- dpo.py     DPO, the reference from the disabled adapter (a frozen copy only for `full`)
- ppo.py     PPO with its own rollout loop (sampled generate, reward at the end, per-token KL,
             value head, GAE, clipped losses, adaptive or fixed KL coefficient)
- common.py  prompt/response formatting, response log-probs, the reference, the runner

SFT, the reward model and DPO run trainer.fit with their own Objective; the losses are pure
functions in lmadapt.objectives. A stage that starts from an earlier one (DPO or PPO from SFT)
merges the earlier delta into the base (`init=`, see docs/alignment.md), so the disabled adapter
is the SFT model.
"""
from .common import ChatFormat, Reference, response_logprobs, token_logprobs  # noqa: F401
from .dpo import DPO, dpo  # noqa: F401
from .ppo import KLController, PPOConfig, compare_to_reference, ppo, reward_model_fn  # noqa: F401
from .reward import RewardObjective, attach_reward_model, score, train_reward  # noqa: F401
from .sft import SFT, sft  # noqa: F401

__all__ = ["ChatFormat", "Reference", "response_logprobs", "token_logprobs", "DPO", "dpo", "KLController",
           "PPOConfig", "compare_to_reference", "ppo", "reward_model_fn", "RewardObjective", "attach_reward_model",
           "score", "train_reward", "SFT", "sft"]
