"""`dbre restore --provider sqld|turso` and the restore flow's provider source: the options checked (one
message each) and planned (`prepare_provider_restore`, which prints nothing: the flow shares it), then
shown (--dry-run) or carried out and printed (`run_provider_restore`, the CLI's). The CLI reads its
secrets from the environment here, at the edge (`ProviderSecrets.from_env`); the flow resolves references."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from dbre.errors import UsageError
from dbre.provider.plan import PROVIDERS, ProviderRestore, ProviderResult, check_at
from dbre.secrets import Secret
from dbre.units import human_bytes


@dataclass
class ProviderOptions:
    """The `dbre restore` options a provider restore reads (None: not given)."""

    provider: str
    at: str | None
    to: Path | None
    force: bool
    dry_run: bool
    json_out: bool
    admin_url: str | None = None
    namespace: str | None = None
    into_namespace: str | None = None
    url: str | None = None
    org: str | None = None
    database: str | None = None
    into: str | None = None


_SQLD_ONLY = ("--admin-url", "--namespace", "--into-namespace", "--url")
_TURSO_ONLY = ("--org", "--database", "--into")


def _given(o: ProviderOptions) -> dict[str, object]:
    return {"--admin-url": o.admin_url, "--namespace": o.namespace, "--into-namespace": o.into_namespace,
            "--url": o.url, "--org": o.org, "--database": o.database, "--into": o.into}


def provider_options_given(o: ProviderOptions) -> list[str]:
    """The provider-only options given (for the error when --provider is not)."""
    return [k for k, v in _given(o).items() if v is not None]


def _env_secret(name: str) -> Secret | None:
    value = os.environ.get(name, "").strip()
    return Secret(value) if value else None


@dataclass
class ProviderSecrets:
    """What a provider restore authenticates with, resolved by the caller: the CLI from the environment,
    the restore flow from references (None: not set)."""

    admin_key: Secret | None = None  # sqld's --admin-auth-key
    read_token: Secret | None = None  # sqld's HTTP API, to read a fork to a file
    api_token: Secret | None = None  # Turso's Platform API
    api_url: str | None = None  # Turso's Platform API base URL (None: the public one)

    @classmethod
    def from_env(cls) -> ProviderSecrets:
        from dbre.provider.sqld import ADMIN_KEY_ENV
        from dbre.provider.turso import API_TOKEN_ENV, API_URL_ENV
        from dbre.sources.remote import token_from_env

        return cls(_env_secret(ADMIN_KEY_ENV), token_from_env(), _env_secret(API_TOKEN_ENV),
                   os.environ.get(API_URL_ENV, "").strip() or None)


@dataclass
class PreparedRestore:
    """A checked provider restore: its plan (to show), and the client that carries it out (``run``)."""

    plan: ProviderRestore
    secrets: ProviderSecrets
    url: str | None = None
    plan_window: bool = False  # turso: look up the organization's plan and check the time against its window

    def run(self) -> ProviderResult:
        """Carry out the plan: a fork or a seeded create, then (to a file) the read and the delete."""
        s = self.secrets
        if self.plan.provider == "sqld":
            from dbre.provider.sqld import SqldAdmin, restore_sqld

            return restore_sqld(self.plan, SqldAdmin(self.plan.endpoint, s.admin_key), self.url, s.read_token)
        from dbre.provider.turso import API_TOKEN_ENV, TursoPlatform, restore_turso

        if s.api_token is None:
            raise UsageError(f"--provider turso needs a Platform API token in {API_TOKEN_ENV}",
                             "create one with `turso auth api-tokens mint dbre`")
        org = self.plan.source.split("/", 1)[0]
        return restore_turso(self.plan, TursoPlatform(org, s.api_token, base_url=s.api_url),
                             plan_window=self.plan_window)


def prepare_provider_restore(o: ProviderOptions, secrets: ProviderSecrets) -> PreparedRestore:
    """Check the options (one UsageError each, in the CLI's option names) and plan; asks the provider nothing."""
    from dbre.repository.manifest import parse_time

    if o.provider not in PROVIDERS:
        raise UsageError(f"unknown --provider {o.provider!r}", "use sqld or turso")
    given = _given(o)
    foreign = [k for k in (_TURSO_ONLY if o.provider == "sqld" else _SQLD_ONLY) if given[k] is not None]
    if foreign:
        raise UsageError(f"{', '.join(foreign)} cannot be used with --provider {o.provider}",
                         "see 'dbre restore --help' (provider history options)")
    needed = ("--admin-url", "--namespace") if o.provider == "sqld" else ("--org", "--database")
    missing = [k for k in needed if given[k] is None] + (["--at"] if o.at is None else [])
    if missing:
        raise UsageError(f"--provider {o.provider} needs {', '.join(missing)}", "see 'dbre restore --help'")
    into_opt = "--into-namespace" if o.provider == "sqld" else "--into"
    into = o.into_namespace if o.provider == "sqld" else o.into
    if (o.to is None) == (into is None):
        raise UsageError(f"--provider {o.provider} restores either to a file (--to) or into a new "
                         f"{'namespace' if o.provider == 'sqld' else 'database'} ({into_opt})", "pass one of them")
    if o.force and o.to is None:
        raise UsageError(f"--force with {into_opt}: a provider never restores over an existing one",
                         "drop --force")
    if o.provider == "sqld" and o.to is not None and o.url is None:
        raise UsageError("--to with --provider sqld needs --url (sqld's HTTP address) to read the fork",
                         "e.g. --url http://127.0.0.1:8080")
    assert o.at is not None
    at = check_at(parse_time(o.at), o.provider)

    if o.provider == "sqld":
        from dbre.provider.sqld import SqldAdmin, plan_sqld

        assert o.admin_url is not None and o.namespace is not None
        admin = SqldAdmin(o.admin_url, secrets.admin_key)
        return PreparedRestore(plan_sqld(admin.url, o.namespace, at, to=o.to, into=into, force=o.force), secrets,
                               o.url)
    from dbre.provider.turso import TursoPlatform, plan_turso

    assert o.org is not None and o.database is not None
    api = TursoPlatform(o.org, secrets.api_token or Secret(""), base_url=secrets.api_url)
    return PreparedRestore(plan_turso(api.base_url, o.org, o.database, at, to=o.to, into=into, force=o.force),
                           secrets)


def run_provider_restore(o: ProviderOptions) -> None:
    """Check the options, plan, then show the plan (--dry-run) or restore and print the result."""
    prepared = prepare_provider_restore(o, ProviderSecrets.from_env())
    prepared.plan_window = True  # turso: the organization's plan looked up, a time outside its window refused
    if o.dry_run:
        return _show_plan(prepared.plan.describe(), prepared.plan.text(), o.json_out)
    _show_result(prepared.run(), o.json_out)


def _show_plan(describe: dict[str, object], text: str, json_out: bool) -> None:
    if json_out:
        from dbre.cli import _print_json  # (the CLI's one JSON interface: schema, vocabulary)

        _print_json(describe)
    else:
        print(text)


def _show_result(result: ProviderResult, json_out: bool) -> None:
    s = result.summary()
    if json_out:
        from dbre.cli import _print_json

        _print_json(s)
    else:
        p = result.plan
        kind = "namespace" if p.provider == "sqld" else "database"
        objects = f"{s['tables']} schema object{'' if s['tables'] == 1 else 's'}"
        where = (f"to {p.to}: {objects}, {human_bytes(s['size'] or 0)}" if p.to is not None
                 else f"into the new {kind} {p.into}" + (f" ({s['url']})" if s["url"] else "")
                 + (f": {objects}" if s["tables"] is not None else ""))
        how = "fork" if p.provider == "sqld" else "create"
        timing = f"{how} {s['create_seconds']:.2f} s" + (
            f", read {s['read_seconds']:.2f} s" if s["read_seconds"] is not None else "")
        print(f"restored {kind} {p.source} as it was at {s['at']} from {p.provider}'s history {where} "
              f"({timing}, {s['seconds']:.2f} s in all)")
        if p.to is not None and s["replaces_existing"]:
            print("the file it replaced is gone (no repository: no safety snapshot was taken)")
    import sys

    if result.plan.provider == "sqld":
        from dbre.provider.sqld import FORK_WARNING

        print("dbre: warning: " + FORK_WARNING.format(ns=result.plan.source), file=sys.stderr)
    if result.cleanup_error:

        print(f"dbre: warning: the temporary {result.plan.scratch} was not deleted: {result.cleanup_error} "
              f"(delete it by hand)", file=sys.stderr)
