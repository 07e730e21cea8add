"""`dbre key passwd`: change a repository's passphrase without touching its data (restic's `key passwd`).

The master key stays; only its wrapping in `config` changes (docs/FORMAT.md, *Changing the
passphrase*). Registered on the main app by dbre/cli.py, which holds the shared options and helpers.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from dbre.cli import JsonOpt, KeyFileOpt, RepoOpt, _key, _print_json, _run, app
from dbre.errors import RepositoryError, UsageError
from dbre.secrets import Secret, edge_spaces

key_app = typer.Typer(help="The repository's passphrase: `dbre key passwd --repo R` changes it.", no_args_is_help=True)
app.add_typer(key_app, name="key")

NEW_KEY_ENV = "DBRE_NEW_ENCRYPTION_KEY"


def _new_key(path: Path | None, interactive: bool) -> Secret:
    """The new passphrase: --new-key-file, else DBRE_NEW_ENCRYPTION_KEY, else typed twice on a terminal."""
    if path is not None:
        try:
            raw = path.read_text().strip()  # as --key-file reads it
        except OSError as err:
            raise UsageError(f"new key file {path}: {err.strerror}", "check the --new-key-file path") from None
        except UnicodeDecodeError as err:  # (its message names a byte of the secret and where: not shown)
            raise UsageError(f"new key file {path} is not {err.encoding.upper()} text",
                             "write the passphrase in it as UTF-8 text; nothing was changed") from None
        if not raw:
            raise UsageError(f"new key file {path} is empty", "put the new passphrase in it; nothing was changed")
        return Secret(raw)
    env = os.environ.get(NEW_KEY_ENV)
    if env is not None:
        if not env:
            raise UsageError(f"{NEW_KEY_ENV} is empty", "set it to the new passphrase; nothing was changed")
        return _usable(Secret(env), NEW_KEY_ENV)
    if not interactive:
        raise UsageError("no new passphrase given",
                         f"pass --new-key-file FILE or set {NEW_KEY_ENV}, or run it on a terminal to type it")
    first = typer.prompt("New passphrase", hide_input=True, err=True, default="", show_default=False)
    if not first:
        raise UsageError("the new passphrase is empty", "type a non-empty one; nothing was changed")
    again = typer.prompt("New passphrase again", hide_input=True, err=True, default="", show_default=False)
    if first != again:
        raise UsageError("the two new passphrases typed differ", "run it again; nothing was changed")
    return _usable(Secret(first), "the passphrase typed")


def _usable(secret: Secret, where: str) -> Secret:
    """Refuse a passphrase with spaces at either end: a --key-file is read stripped, so it could not be given there."""
    if edge_spaces(secret):
        raise UsageError(f"{where}: the new passphrase begins or ends with white space",
                         "a --key-file is read without it, so it could not be given that way; nothing was changed")
    raw = secret.reveal()
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    try:
        text.encode()
    except UnicodeEncodeError:  # (bytes that are not UTF-8, from the env: its message would name one)
        raise UsageError(f"{where}: the new passphrase is not UTF-8 text",
                         "give it as UTF-8 text (a --key-file is read so); nothing was changed") from None
    return secret


def _old_key(key_file: Path | None, interactive: bool) -> Secret | None:
    old = _key(key_file)
    if old is None and interactive:
        typed = typer.prompt("Current passphrase", hide_input=True, err=True, default="", show_default=False)
        old = Secret(typed) if typed else None
    return old


@key_app.command("passwd")
def passwd(
    repo: RepoOpt,
    new_key_file: Annotated[Path | None, typer.Option(
        "--new-key-file", help=f"File holding the new passphrase (or set {NEW_KEY_ENV}; on a terminal it is asked "
                               "for twice).")] = None,
    json_out: JsonOpt = False,
    key_file: KeyFileOpt = None,
) -> None:
    """Change the repository's passphrase: the same master key is wrapped under the new one, no data is rewritten.

    The current passphrase comes from DBRE_ENCRYPTION_KEY or --key-file, the new one from --new-key-file or
    DBRE_NEW_ENCRYPTION_KEY (or both are typed on a terminal). Runs already going keep working; offsite copies
    keep their own passphrase."""

    def go() -> None:
        from dbre.repository.immutable import LOCK_KEY
        from dbre.repository.repo import Repository
        from dbre.storage import open_store

        interactive = sys.stdin.isatty() and not json_out
        store = open_store(repo)
        config = Repository.read_config(store)
        if config is None:
            raise RepositoryError(f"no repository at {store.url}", "check --repo")  # (exit 1, as every command)
        if not config.get("encryption"):
            raise UsageError(f"repository {store.url} is not encrypted: it has no passphrase to change",
                             "nothing was changed")
        if int(config["version"]) < 2:
            raise UsageError(f"repository {store.url} uses format {config['version']}, which is read only",
                             f"convert it with `dbre migrate --repo {store.url} --to NEW`, then change its passphrase")
        given = new_key_file is not None or NEW_KEY_ENV in os.environ
        new = _new_key(new_key_file, False) if given or not interactive else None  # checked before any work
        old = _old_key(key_file, interactive)
        began = time.monotonic()
        repository = Repository.open(store, old)  # a wrong old passphrase stops here, before the new is typed
        if old is None:  # (open refused already: an encrypted repository needs a key)
            raise UsageError(f"repository {store.url} is encrypted", "set DBRE_ENCRYPTION_KEY or pass --key-file")
        if new is None:
            new = _new_key(None, True)
            began = time.monotonic()
        # asked before the change: a failed request after it must not look like a failed change
        locked = repository.object_lock is not None or store.exists(LOCK_KEY)
        repository.change_passphrase(old, new)
        seconds = time.monotonic() - began
        versions = 0 if locked else _config_versions(store)
        notes = [
            "commands already running keep working (they hold the master key); every new run needs the new "
            "passphrase, and so does each later task of a Prefect flow run already going (each task opens the "
            "repository again): pause the deployments that use it, change it, update their key, resume",
            "offsite copies (`dbre copy` targets) keep their own config and the OLD passphrase (`dbre copy` into "
            "them goes on): `dbre status` reports them unreadable and a restore from one needs the old passphrase "
            "until you run `dbre key passwd --repo COPY` with the same new passphrase",
        ]
        if locked:
            notes.append("Object Lock: the old version of `config` stays in the bucket, locked, and keeps opening "
                         "with the OLD passphrase for whoever can read versions, until its retention ends "
                         "(and after, until deleted); `verify --immutable` opens the newest locked version the new "
                         "passphrase opens")
        if versions > 1:
            notes.append(f"the bucket keeps versions: the old `config` stays as a noncurrent version ({versions} "
                         "versions now) and opens with the OLD passphrase for whoever can read versions, until a "
                         "lifecycle rule or you delete it")
        if json_out:
            _print_json({"repository": repository.url, "changed": True, "seconds": round(seconds, 2),
                         "object_lock": locked, "notes": notes})
            return
        print(f"passphrase changed for {repository.url} in {seconds:.1f} s: the master key and the data are unchanged")
        for note in notes:
            print(f"- {note}")

    _run(go)


def _config_versions(store: object) -> int:
    """How many versions of `config` the bucket holds (0 when not on S3 or when listing versions is denied)."""
    from dbre.repository.immutable import locking_store
    from dbre.storage.base import StorageError

    locker = locking_store(store)  # type: ignore[arg-type]
    if locker is None:
        return 0
    try:
        return sum(1 for v in locker.versions("config") if v.key == "config" and not v.delete_marker)
    except StorageError:
        return 0
