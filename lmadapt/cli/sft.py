"""lmadapt sft: supervised fine-tuning on instruction data (chat template, loss on the response)."""
from __future__ import annotations

from pathlib import Path

from .common import align_args, align_start, chat_flag, fit_options, summary_table


def cmd_sft(a) -> int:
    from ..align import sft
    task, adapted = align_start(a)
    result = sft(adapted, task, chat=chat_flag(a), max_response_length=a.max_response_length, out=a.out,
                 resume=a.resume, seed=a.seed, data_root=a.data_root, max_train=a.max_train, **fit_options(a))
    print(summary_table([result]))
    print(f"wrote {Path(a.out) / 'result.json'} and the artifact {Path(a.out) / 'best'}")
    return 0


def register(sub) -> None:
    sp = sub.add_parser("sft", help="supervised fine-tuning on instruction data; writes OUT/result.json and OUT/best/",
                        description="Fine-tune on an instruction task (default alpaca), the prompt in the model's chat "
                                    "template, the loss on the response tokens. Example: lmadapt sft --task alpaca "
                                    "--method lora --max-steps 200 --out runs/sft")
    align_args(sp, "alpaca")
    sp.add_argument("--max-response-length", type=int, default=128, help="response tokens kept (128)")
    sp.set_defaults(func=cmd_sft)
