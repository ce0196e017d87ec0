"""Users and their tokens, kept on disk so a restart or a crash loses no user.

    STATE/users.json          {"users": {name: {"token_sha256", "artifact", "created"}}}
    STATE/artifacts/NAME/     the user's artifact (method.json + adapter.safetensors), copied in
    STATE/base.json           the base model's fingerprint, written by `lmadapt serve`, so that
                              `lmadapt user add` (offline) refuses an artifact of another base

Every write is atomic (lmadapt.atomic): the artifact folder first, then users.json; a kill in
between leaves an unreferenced folder, never a user without an artifact. Tokens are random
(32 bytes, urlsafe) and shown once; only their SHA-256 is stored (a slow password hash buys
nothing for random 256-bit secrets), compared in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

from ..atomic import read_json_file, write_dir, write_json

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
TOKEN_PREFIX = "lma-"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise ValueError(f"invalid user name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


class UserStore:
    def __init__(self, state_dir):
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "users.json"
        self.lock = threading.RLock()
        self.users: dict[str, dict] = {}
        if self.path.exists():
            data = read_json_file(self.path, "restore it from a backup or remove it (every user is lost)")
            if not isinstance(data, dict) or not isinstance(data.get("users"), dict):
                raise ValueError(f"{self.path}: expected {{\"users\": {{...}}}}")
            self.users = data["users"]
        self._by_hash = {u["token_sha256"]: n for n, u in self.users.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.users

    def __len__(self) -> int:
        return len(self.users)

    def names(self) -> list[str]:
        return sorted(self.users)

    def artifact(self, name: str) -> Path:
        return self.dir / "artifacts" / name

    def by_token(self, token: str) -> str | None:
        h = hash_token(token)
        name = self._by_hash.get(h)
        # the dict lookup found the candidate; compare_digest keeps the final check constant-time
        if name is not None and hmac.compare_digest(self.users[name]["token_sha256"], h):
            return name
        return None

    def _save(self) -> None:
        write_json(self.path, {"users": self.users})
        self._by_hash = {u["token_sha256"]: n for n, u in self.users.items()}

    def add(self, name: str, artifact_dir, replace: bool = False) -> str | None:
        """Copy the artifact in and record the user; -> the new token (None when replacing: the
        user keeps its token). The caller checks the artifact first (Bank.check)."""
        check_name(name)
        src = Path(artifact_dir)
        with self.lock:
            if name in self.users and not replace:
                raise FileExistsError(f"user '{name}' already exists; replace its artifact (PUT) or remove it first")
            if name not in self.users and replace:
                raise KeyError(f"user '{name}' does not exist")

            def copy(tmp: Path):
                for f in src.iterdir():
                    if f.is_file():
                        shutil.copyfile(f, tmp / f.name)
            write_dir(self.artifact(name), copy)
            token = None
            if not replace:
                token = TOKEN_PREFIX + secrets.token_urlsafe(32)
                self.users[name] = {"token_sha256": hash_token(token), "artifact": f"artifacts/{name}",
                                    "created": int(time.time())}
            self._save()
            return token

    def remove(self, name: str) -> None:
        with self.lock:
            if name not in self.users:
                raise KeyError(f"user '{name}' does not exist")
            del self.users[name]
            self._save()
            shutil.rmtree(self.artifact(name), ignore_errors=True)

    # --- the base model the state belongs to -----------------------------------------------------
    def base(self) -> dict | None:
        p = self.dir / "base.json"
        return read_json_file(p, "remove it; `lmadapt serve` writes it again") if p.exists() else None

    def set_base(self, fp: dict) -> None:
        old = self.base()
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size", "embedding_checksum")
        if old is not None and any(old.get(k) != fp.get(k) for k in keys) and self.users:
            raise ValueError(f"{self.dir} holds users of base model '{old.get('name')}', not '{fp.get('name')}': "
                             "serve that model, or use another --state folder")
        write_json(self.dir / "base.json", fp)
