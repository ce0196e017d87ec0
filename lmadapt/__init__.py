"""lmadapt: one interface to adapt a pretrained language model to a task — probing, full
fine-tuning, delta tuning (prompt, prefix, adapters, LoRA, BitFit, ladder, intrinsic) — on the same
model and data.

    model, tok = lmadapt.load("smollm2-135m")
    adapted = lmadapt.attach(model, "lora", task="sst2", tokenizer=tok, r=8)
    result = lmadapt.train(adapted, "sst2", shots=16, out="runs/sst2-lora")
"""
__version__ = "0.1.0"


class LmadaptWarning(UserWarning):
    """lmadapt's own warnings (the CLI shows these and filters third-party ones)."""


from .models import load  # noqa: E402
from .methods import METHODS, get_method  # noqa: E402
from . import prompting  # noqa: E402,F401  (registers the verbalizer head in heads.HEADS)
from .api import attach, load_adapted, train, evaluate, predict  # noqa: E402
from .peft_io import from_peft, to_peft  # noqa: E402


def __getattr__(name):
    # TASKS lives in tasks.py, which reads no data until a task is loaded.
    if name == "TASKS":
        from .tasks import TASKS
        return TASKS
    raise AttributeError(name)


__all__ = ["load", "attach", "load_adapted", "train", "evaluate", "predict", "METHODS", "TASKS",
           "get_method", "from_peft", "__version__"]
