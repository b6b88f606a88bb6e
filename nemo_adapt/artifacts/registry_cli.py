"""`nemo-adapt registry VERB`: versioned adapters and models, promoted only through gates.

Verbs:

    add PATH [--name NAME] [--eval FILE] [--baseline FILE] [--scenario S]
                                        register a run, adapter, merged or Hugging Face model directory (or the
                                        candidate a strategy study recommends for a scenario)
    list [NAME]                         names, versions, aliases and each version's task metric
    show REF [--json]                   one version's manifest
    diff REF REF                        recipe, dataset, base model, metrics and files that differ
    lineage REF                         parents (base, dataset, init_from, merge parents, study), children, aliases
    verify [REF]                        re-hash every stored file; check manifests and the audit log (exit 1 on damage)
    promote REF --to ALIAS --gates FILE [--force --reason TEXT]
                                        move ALIAS to REF if every gate passes (exit 1 when refused)
    rollback [NAME:]ALIAS [--reason TEXT]
                                        move ALIAS back to where it was before its last move
    log [NAME]                          the audit log
    get REF --out DIR                   write a version's files (a run directory, for a run) to DIR

REF is NAME (the newest version), NAME:ALIAS, NAME:latest or NAME:ID (a unique prefix of the version id).
The registry is --registry, else $NEMO_ADAPT_REGISTRY, else ./registry; an fsspec URL (s3://bucket/prefix) needs
the filesystem's package (s3fs: pip install 'nemo-adapt[s3]'). See docs/registry.md.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import sys
from datetime import datetime
from pathlib import Path

from nemo_adapt.errors import ConfigError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def _when(iso: str | None) -> str:
    if not iso:
        return "?"
    try:
        return datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M UTC")
    except ValueError:
        return iso


def _metric(manifest: dict) -> str:
    ev = manifest.get("evaluation")
    if not ev:
        return "not evaluated"
    name = ev.get("metric") or "exact_match"
    e = (ev.get("metrics") or {}).get(name)
    if e is None:
        return f"{name}: not recorded"
    if "value" not in e:  # per-field: the mean of the fields, as gates read it
        fields = list(e.values())
        e = {k: sum(f.get(k, f["value"]) for f in fields) / len(fields) for k in ("value", "low", "high")}
    ci = f" [{e['low']:.3f}, {e['high']:.3f}]" if "low" in e else ""
    return f"{name} {e['value']:.3f}{ci} n={ev.get('n')}"


def _describe(manifest: dict) -> str:
    art = manifest.get("artifact") or {}
    size = art.get("bytes", 0) / 2**20
    what = f"{art.get('method')} {art.get('kind')}" if art.get("kind") == "adapter" else f"{art.get('method') or 'hf'} model"
    return f"{manifest['kind']}, {what}, {len(manifest['files'])} files, {size:.1f} MiB"


def _short(vid: str | None) -> str:
    return vid[:12] if vid else "(none)"


def _under(path: str | None, root: str) -> bool:
    if not path or "://" in root:
        return False
    try:
        return os.path.commonpath([os.path.abspath(path), os.path.abspath(root)]) == os.path.abspath(root)
    except ValueError:
        return False


def _guarded(func):
    """A verb whose environment fails (a read-only registry, missing S3 credentials, a closed pipe) says so in one
    line (exit 2) instead of a traceback."""

    @functools.wraps(func)
    def run(args) -> int:
        from nemo_adapt.artifacts.registry import ENV, resolve_location

        location = resolve_location(args.registry)
        root = location[len("file://"):] if location.startswith("file://") else location
        try:
            return func(args)
        except BrokenPipeError:  # `registry list | head -1`: the reader has gone; nothing left to say
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())  # the interpreter's final flush must not fail again
            except (OSError, ValueError, AttributeError):
                pass
            return 0
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and (
                    _under(err.filename, root) or _under(getattr(err, "filename2", None), root)):
                raise ConfigError(f"registry {location} is not writable ({err.strerror}: {err.filename}); name a "
                                  f"registry you can write to (--registry or ${ENV}) or ask its owner") from None
            if isinstance(err, NotADirectoryError) and _under(err.filename, root):
                blocker = next((q for q in Path(root).absolute().parents if q.is_file()), None)
                if blocker is not None:
                    raise ConfigError(f"registry {location}: {blocker} is a file, so no registry can live under it; "
                                      f"name a directory (--registry or ${ENV})") from None
                raise ConfigError(f"registry {location}: {err.filename} is not a directory (the registry's layout "
                                  "is damaged, or the location is not a registry)") from None
            if _under(err.filename, root) or _under(getattr(err, "filename2", None), root):
                raise ConfigError(f"registry {location}: {err.strerror or err} ({err.filename}); name a directory "
                                  f"you can create and write (--registry or ${ENV})") from None
            raise
        except Exception as err:
            if any(c.__name__ in ("NoCredentialsError", "PartialCredentialsError") for c in type(err).__mro__):
                raise ConfigError(f"registry {location}: no credentials for the object store ({err}); fsspec's s3fs "
                                  "finds them as boto does: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (with "
                                  "AWS_ENDPOINT_URL for a non-AWS store), AWS_PROFILE, ~/.aws/credentials, or an "
                                  "instance role") from None
            raise

    return run


def _registry(args, read: bool = True):
    """The registry `args` names; for a verb that only reads, one that exists (a typo is not an empty registry)."""
    from nemo_adapt.artifacts.registry import Registry

    reg = Registry(args.registry)
    if read:
        reg.check_exists()
    return reg


def cmd_add(args) -> int:
    if args.name is not None and not args.name.strip():
        raise ConfigError("--name is empty; give a name, or leave --name out for the default")
    reg = _registry(args, read=False)
    reg.check_exists(writing=True)
    res = reg.add(args.path, name=args.name, eval_file=args.eval, baseline_file=args.baseline, scenario=args.scenario)
    v, m = res.version, res.version.manifest
    if res.created:
        print(f"added {v.ref} ({_describe(m)}; {res.new_objects} file(s) stored now) to registry {reg.store.url}")
    else:
        c = m.get("created") or {}
        print(f"{v.ref} is already registered: the same content was added {_when(c.get('at'))} by {c.get('by')} "
              f"from {c.get('from')}; nothing written")
    base = (m.get("base_model") or {}).get("fingerprint")
    data = (m.get("dataset") or {}).get("version")
    print(f"  base model {base or '?'}; dataset {data or '?'}; {_metric(m)}")
    if (m.get("wandb") or {}).get("url"):
        print(f"  W&B artifact {m['wandb'].get('artifact')}: {m['wandb']['url']}")
    if res.created and not m.get("evaluation") and any(x.manifest.get("evaluation") for x in reg.versions(v.name)):
        print(f"  note: {v.name}:latest now names this unevaluated version; promote evaluated ones by id or alias")
    for note in res.notes:
        print(f"note: {note}")
    return 0


def cmd_list(args) -> int:
    reg = _registry(args)
    names = [args.name] if args.name else reg.names()
    if args.name:
        reg.resolve(args.name)  # an unknown name is an error with the closest one
    aliases = reg.aliases()
    rows = []
    for n in names:
        for v in reg.versions(n):
            here = sorted(a for a, i in aliases.get(n, {}).items() if i == v.id)
            rows.append([n, v.short, v.manifest["kind"], _when((v.manifest.get("created") or {}).get("at")),
                         ",".join(here) or "-", _metric(v.manifest)])
    if not rows:
        print(f"registry {reg.store.url} is empty (nemo-adapt registry add RUN_DIR)")
        return 0
    print(_table(rows, ["name", "version", "kind", "added", "aliases", "metric"]))
    return 0


def cmd_show(args) -> int:
    reg = _registry(args)
    v = reg.resolve(args.ref)
    m = v.manifest
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    c = m.get("created") or {}
    here = sorted(a for a, i in reg.aliases().get(v.name, {}).items() if i == v.id)
    print(f"{v.name}:{v.id}")
    print(f"  kind        {_describe(m)}")
    print(f"  added       {_when(c.get('at'))} by {c.get('by')} from {c.get('from')} ({c.get('registered_with')})")
    print(f"  aliases     {', '.join(here) or '-'}")
    b = m.get("base_model") or {}
    print(f"  base model  {b.get('fingerprint') or '?'} ({b.get('checkpoint') or b.get('name') or '?'})")
    d = m.get("dataset") or {}
    splits = ", ".join(f"{k} {str(s)[:12]}" for k, s in (d.get("splits") or {}).items())
    print(f"  dataset     {d.get('fingerprint') or '?'}{f' ({splits})' if splits else ''}")
    if m.get("merge"):
        print(f"  merge       {m['merge'].get('method')}, status {m['merge'].get('status')}")
    ev = m.get("evaluation")
    if ev:
        print(f"  evaluation  {_metric(m)} on {ev.get('test_file')} (sha256 {str(ev.get('test_sha256'))[:12]}), "
              f"code {ev.get('code_version')}")
        for name, e in (ev.get("metrics") or {}).items():
            if "value" in e:
                print(f"              {name} {e['value']:.3f} [{e.get('low', e['value']):.3f}, {e.get('high', e['value']):.3f}]")
        for name, s in (ev.get("suites") or {}).items():
            print(f"              suite {name}: {'pass' if s.get('pass') else 'FAIL'} ({s.get('passed')}/{s.get('checked')}, "
                  f"sha256 {str(s.get('sha256'))[:12]})")
        f = ev.get("forgetting")
        if f:
            print(f"              forgetting {f['value']:+.3f} [{f.get('low', 0):+.3f}, {f.get('high', 0):+.3f}] nats/token")
        if ev.get("inference_cost"):
            print(f"              inference cost measured: {', '.join(ev['inference_cost'])}")
    else:
        print("  evaluation  none recorded")
    if m.get("wandb"):
        w = m["wandb"]
        print(f"  W&B         {w.get('artifact') or '(offline)'} {w.get('url') or ''}".rstrip())
    print("  files")
    for rel, f in sorted(m["files"].items()):
        print(f"    {f['sha256'][:12]}  {f['size']:>12,}  {rel}")
    return 0


def cmd_diff(args) -> int:
    from nemo_adapt.artifacts.registry import diff

    reg = _registry(args)
    a, b = reg.resolve(args.a), reg.resolve(args.b)
    d = diff(a, b)
    print(f"--- {a.ref}\n+++ {b.ref}")
    for section in ("config", "dataset", "base_model", "metrics"):
        if d[section]:
            print(f"{section}:")
            for key, (x, y) in d[section].items():
                print(f"  {key}: {json.dumps(x, default=str)} -> {json.dumps(y, default=str)}")
    files = d["files"]
    for what in ("added", "removed", "changed"):
        for rel in files[what]:
            print(f"file {what}: {rel}")
    if not any(d[s] for s in ("config", "dataset", "base_model", "metrics")) and not any(files.values()):
        print("no differences")
    return 0


def cmd_lineage(args) -> int:
    reg = _registry(args)
    info = reg.lineage(args.ref)
    v, m = info["version"], info["version"].manifest
    print(f"{v.ref}  {_describe(m)}, added {_when((m.get('created') or {}).get('at'))}")
    b = m.get("base_model") or {}
    print(f"  base model    {b.get('fingerprint') or '?'} ({b.get('checkpoint') or b.get('name') or '?'})")
    d = m.get("dataset") or {}
    if d.get("fingerprint") or d.get("test_sha256"):
        splits = ", ".join(f"{k} {str(s)[:12]}" for k, s in (d.get("splits") or {}).items())
        print(f"  dataset       {str(d.get('fingerprint') or '?')[:12]}{f' (fingerprints: {splits})' if splits else ''}"
              f"{'; evaluated on test sha256 ' + str(d.get('test_sha256'))[:12] if d.get('test_sha256') else ''}")
    recipe = m.get("recipe") or {}
    if recipe:
        peft = recipe.get("peft") or {}
        print(f"  recipe        {peft.get('method')} on {(recipe.get('model') or {}).get('name')}, "
              f"{(recipe.get('run') or {}).get('max_steps')} steps, seed {(recipe.get('run') or {}).get('seed')}")
    for kind, code in (m.get("code_version") or {}).items():
        print(f"  code          {kind} with nemo-adapt {code}")
    for p in info["parents"]:
        if p["relation"] == "study":
            print(f"  study         {p.get('study')} scenario {p.get('scenario')}: recommended {p.get('recommendation')} "
                  f"({p.get('why')})")
            continue
        reg_ref = f" = {p['registered']}" if p.get("registered") else " (not registered)"
        print(f"  {p['relation']:<13} {p.get('path')} sha256 {str(p.get('sha256'))[:12]}{reg_ref}")
    for c in info["children"]:
        print(f"  child         {c}")
    print(f"  aliases       {', '.join(info['aliases']) or '-'}")
    for e in info["history"]:
        print(f"  audit #{e['seq']:<5} {_when(e['when'])} {e['who']}: {e['action']} {e['alias']} "
              f"{_short(e.get('from'))} -> {_short(e.get('to'))}{' (forced)' if e.get('forced') else ''}")
    return 0


def cmd_verify(args) -> int:
    reg = _registry(args)
    report = reg.verify(args.ref)
    for p in report.problems:
        print(f"FAIL {p}")
    for n in report.notes:
        print(f"note: {n}")
    verdict = "OK" if not report.problems else f"{len(report.problems)} problem(s)"
    print(f"verified {report.versions} version(s), {report.files} stored file(s) in {reg.store.url}: {verdict}")
    return 0 if not report.problems else 1


def cmd_promote(args) -> int:
    reg = _registry(args)
    res = reg.promote(args.ref, args.to, args.gates, force=args.force, reason=args.reason)
    print(f"promote {res.version.ref} -> {args.to} (gates {args.gates})")
    rows = [[g.gate, g.value, g.threshold, "pass" if g.passed else "FAIL"] for g in res.gates]
    print(_table(rows, ["gate", "value", "threshold", "verdict"]))
    prev = res.previous[:12] if res.previous else "(none)"
    seq = f" (audit #{res.entry['seq']})" if res.entry else ""
    if res.moved and res.entry is None:
        print(f"{res.version.name}:{args.to} already points to {res.version.short}; nothing moved")
        return 0
    if res.moved:
        forced = f", FORCED past {len(res.failed)} failed gate(s): {args.reason}" if res.forced else ""
        print(f"moved {res.version.name}:{args.to}: {prev} -> {res.version.short}{seq}{forced}")
        return 0
    print(f"refused: {len(res.failed)} of {len(res.gates)} gate(s) failed; {res.version.name}:{args.to} stays at "
          f"{prev}{seq}", file=sys.stderr)
    for g in res.failed:
        print(f"  {g.gate}: {g.value}, needs {g.threshold}", file=sys.stderr)
    if args.force:
        print("(--force does not override the merged-model rules — a merged model needs merge status validated and a "
              "regression-suite pass — nor an evaluation that contradicts itself; the forced attempt is logged)",
              file=sys.stderr)
    return 1


def cmd_rollback(args) -> int:
    reg = _registry(args)
    e = reg.rollback(args.alias, reason=args.reason)
    to = e["to"][:12] if e["to"] else "(removed: it had no earlier version)"
    print(f"rolled back {e['name']}:{e['alias']}: {e['from'][:12]} -> {to} (audit #{e['seq']})")
    return 0


def cmd_log(args) -> int:
    reg = _registry(args)
    if args.name:
        reg.resolve(args.name)
    entries = [e for e in reg.audit() if not args.name or e["name"] == args.name]
    for e in entries:
        gates = e.get("gates") or {}
        failed = [g for g in gates.get("results", []) if not g["passed"]]
        judged = f" gates {gates.get('name')} {'passed' if gates.get('passed') else f'{len(failed)} failed'}" if gates else ""
        print(f"#{e['seq']:<5} {_when(e['when'])}  {e['who']}  {e['action']:<8} {e['name']}:{e['alias']} "
              f"{_short(e.get('from'))} -> {_short(e.get('to'))}{judged}{' FORCED' if e.get('forced') else ''}"
              f"{' (forced attempt)' if e.get('force_requested') and not e.get('forced') else ''}"
              f"{' reason: ' + e['reason'] if e.get('reason') else ''}")
    if not entries:
        print("the audit log is empty")
    return 0


def cmd_get(args) -> int:
    reg = _registry(args)
    v, out = reg.get(args.ref, args.out)
    print(f"wrote {v.ref} ({len(v.manifest['files'])} files) to {out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("registry", help="versioned adapters and models: add, list, show, diff, lineage, verify, "
                       "promote through gates, rollback", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verbs = p.add_subparsers(dest="verb", metavar="VERB")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--registry", default=None, metavar="URL",
                        help="registry location: a directory or an fsspec URL such as s3://bucket/prefix "
                             "(default: $NEMO_ADAPT_REGISTRY, else ./registry)")

    def verb(name: str, func, help: str) -> argparse.ArgumentParser:
        v = verbs.add_parser(name, parents=[common], help=help, description=help)
        v.set_defaults(func=_guarded(func))
        return v

    a = verb("add", cmd_add, "register a run, adapter, merged model or Hugging Face model directory")
    a.add_argument("path", help="a run directory, adapter/, merged or exported model directory, or a study's output")
    a.add_argument("--name", help="registry name (default: the run's name, else the directory's)")
    a.add_argument("--eval", help="evaluation to record (a `nemo-adapt eval` JSON; default: a run's eval.json; "
                   "`none`: record none)")
    a.add_argument("--baseline", help="prompt-only baseline to record (eval_baseline.json; default: a run's own; "
                   "`none`: record none)")
    a.add_argument("--scenario", help="for a strategy study's output directory: add the candidate it recommends for "
                   "this scenario (with the study's baseline)")
    ls = verb("list", cmd_list, "names, versions, aliases and each version's task metric")
    ls.add_argument("name", nargs="?", help="only this name")
    s = verb("show", cmd_show, "one version's manifest")
    s.add_argument("ref", help="NAME, NAME:ALIAS, NAME:latest or NAME:ID")
    s.add_argument("--json", action="store_true", help="print the manifest as stored")
    d = verb("diff", cmd_diff, "recipe, dataset, base model, metrics and files that differ between two versions")
    d.add_argument("a")
    d.add_argument("b")
    lin = verb("lineage", cmd_lineage, "a version's parents, children and alias history")
    lin.add_argument("ref")
    ver = verb("verify", cmd_verify, "re-hash stored files; check manifests and the audit log (exit 1 on damage)")
    ver.add_argument("ref", nargs="?", help="only this version (default: everything)")
    pr = verb("promote", cmd_promote, "move an alias to a version if every gate passes (exit 1 when refused)")
    pr.add_argument("ref", help="the version: NAME:ID, or NAME:ALIAS (promote staging to production)")
    pr.add_argument("--to", required=True, metavar="ALIAS", help="the alias to move (production, staging, ...)")
    pr.add_argument("--gates", required=True, metavar="GATES.yaml", help="gates file (see gates/)")
    pr.add_argument("--force", action="store_true", help="move it although gates fail (needs --reason; logged as "
                    "forced; never past the merged-model rules)")
    pr.add_argument("--reason", help="why (required with --force; recorded in the audit log)")
    rb = verb("rollback", cmd_rollback, "move an alias back to where it was before its last move")
    rb.add_argument("alias", help="NAME:ALIAS, or ALIAS when one name has it")
    rb.add_argument("--reason", help="why (recorded in the audit log)")
    lg = verb("log", cmd_log, "the audit log")
    lg.add_argument("name", nargs="?", help="only this name's entries")
    g = verb("get", cmd_get, "write a version's files to a new directory")
    g.add_argument("ref")
    g.add_argument("--out", required=True, help="a new (or empty) directory")

    def no_verb(args) -> int:
        p.print_help()
        return 1

    p.set_defaults(func=no_verb)

