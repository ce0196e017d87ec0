"""lmadapt serve: many users' artifacts over one base model, OpenAI-compatible HTTP (serve/)."""
from __future__ import annotations

import os

from .common import common_args, parse_method_args


def methods_from_args(a) -> list:
    """--methods a,b,c plus --method-args NAME:k=v,... (repeatable) -> Method objects."""
    from ..methods import get_method
    from ..serve.tables import HEAD_ONLY, SUPPORTED
    names = [m for m in (a.methods or ",".join(SUPPORTED)).split(",") if m]
    args: dict[str, dict] = {}
    for spec in a.method_args or []:
        name, sep, rest = spec.partition(":")
        if not sep:
            raise ValueError(f"--method-args '{spec}' is not NAME:key=value,... (example: lora:r=8,alpha=16)")
        args[name] = parse_method_args(rest)
    unknown = sorted(set(args) - set(names))
    if unknown:
        raise ValueError(f"--method-args names {', '.join(unknown)}, which --methods does not include")
    return [get_method(n, **args.get(n, {})) for n in names if n not in HEAD_ONLY]


def cmd_serve(a) -> int:
    import uvicorn

    from ..serve.server import ServerConfig, build
    admin = os.environ.get("LMADAPT_ADMIN_TOKEN")
    config = ServerConfig(admin_token=admin, max_prompt_tokens=a.max_prompt_tokens, max_tokens=a.max_tokens,
                          max_upload_bytes=a.max_upload_mb << 20)
    app, bank, sched = build(a.model, a.state, methods=methods_from_args(a), capacity=a.capacity,
                             max_batch=a.max_batch, max_wait=a.max_wait_ms / 1000, precision=a.precision,
                             config=config)
    print(f"lmadapt serve: {bank.base_name} with tables {', '.join(bank.methods())}; "
          f"{len(bank.registry)} users; precision {sched.precision}; http://{a.host}:{a.port}/v1"
          + ("" if admin else " (admin endpoints off: set LMADAPT_ADMIN_TOKEN)"), flush=True)
    uvicorn.run(app, host=a.host, port=a.port, log_level="warning")
    return 0


def register(sub) -> None:
    sp = sub.add_parser("serve", help="serve users' artifacts over HTTP (OpenAI-compatible)",
                        description="Example: LMADAPT_ADMIN_TOKEN=secret lmadapt serve --model smollm2-135m "
                                    "--state serve-state. Users: `lmadapt user add NAME ARTIFACT --state DIR` "
                                    "or POST /v1/users. See docs/serving.md.")
    sp.add_argument("--model", default="smollm2-135m", help="base model (a packaged name or a local HF folder)")
    sp.add_argument("--state", required=True, help="folder holding users, hashed tokens and artifacts")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--methods", help="tables to build, comma-separated (default: every servable method: "
                                      "adapter,lora,bitfit,prompt,ptuning,prefix,ptuning2; none/probe need none)")
    sp.add_argument("--method-args", action="append", metavar="NAME:K=V,...",
                    help="a table's arguments, e.g. lora:r=8,alpha=16 or prefix:k=20 (repeat per method)")
    sp.add_argument("--capacity", type=int, default=16, help="resident artifacts per method (LRU beyond)")
    sp.add_argument("--max-batch", type=int, default=32, help="rows in the running decode batch at most")
    sp.add_argument("--max-wait-ms", type=float, default=10.0, help="how long an idle batch waits for more requests")
    sp.add_argument("--max-prompt-tokens", type=int, default=1024)
    sp.add_argument("--max-tokens", type=int, default=512, help="max_tokens a request may ask for")
    sp.add_argument("--max-upload-mb", type=int, default=256)
    common_args(sp)
    sp.set_defaults(func=cmd_serve)
