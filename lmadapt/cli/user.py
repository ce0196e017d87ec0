"""lmadapt user add|remove|list: the users of a `lmadapt serve --state DIR`, offline."""
from __future__ import annotations


def check_artifact(store, directory) -> dict:
    """What can be checked without loading the model: a complete artifact, a servable method, and
    (once `lmadapt serve` has run on this state) the same base model."""
    from ..adapted import check_base, read_artifact
    from ..serve.tables import HEAD_ONLY, SUPPORTED
    meta, _ = read_artifact(directory)
    if meta["method"] not in SUPPORTED + HEAD_ONLY:
        raise ValueError(f"{directory}: method '{meta['method']}' cannot be served; servable: "
                         f"{', '.join(SUPPORTED + HEAD_ONLY)}")
    base = store.base()
    if base is not None:
        check_base(meta, None, str(directory), have=base)
    return meta


def cmd_user(a) -> int:
    from ..serve.users import UserStore
    store = UserStore(a.state)
    if a.action == "list":
        for n in store.names():
            print(n)
        return 0
    if a.action == "remove":
        if a.name not in store:
            raise ValueError(f"user '{a.name}' does not exist in {a.state}")
        store.remove(a.name)
        print(f"removed user '{a.name}' (a running server forgets it at its next restart, or DELETE /v1/users)")
        return 0
    if not a.artifact:
        raise ValueError("user add needs NAME and ARTIFACT_DIR")
    check_artifact(store, a.artifact)
    try:
        token = store.add(a.name, a.artifact, replace=a.replace)
    except FileExistsError as e:
        raise ValueError(str(e)) from None
    print(f"user '{a.name}': " + (f"token {token}  (shown once; keep it)" if token else "artifact replaced"))
    return 0


def register(sub) -> None:
    sp = sub.add_parser("user", help="add / remove / list the users of a serve --state folder",
                        description="Example: lmadapt user add alice runs/alice-lora/best --state serve-state "
                                    "(prints alice's token once). A running server picks users up at restart; "
                                    "online, use POST /v1/users.")
    sp.add_argument("action", choices=["add", "remove", "list"])
    sp.add_argument("name", nargs="?")
    sp.add_argument("artifact", nargs="?", help="the artifact folder (method.json + adapter.safetensors)")
    sp.add_argument("--state", required=True)
    sp.add_argument("--replace", action="store_true", help="replace an existing user's artifact (keeps its token)")
    sp.set_defaults(func=cmd_user)
