"""``streamfit models``: manage models and their versions in a store.

Every action prints a plain table, or JSON with ``--json``. ``--store`` and
``--json`` go before or after the action. Errors are raised as streamfit
errors, which the ``streamfit`` command prints with exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from modelstore import ONNX, VersionInfo, open_store
from modelstore.errors import ConfigError, InvalidInputError, ModelNotFound

DEFAULT_STORE = "sqlite:///models.db"

ACTIONS = {
    "list": "list models with their latest version and aliases",
    "show": "show one version: metadata, artifact sizes and checksums, metrics, lineage",
    "history": "list every version a model has, with lineage and metrics",
    "create": "create a model (version 0) from a JSON or TOML spec file",
    "promote": "point an alias (production by default) at a version",
    "alias": "point any alias at a version, or remove it",
    "rollback": "publish a new latest version that serves an older version's model",
    "prune": "remove old versions, keeping the last N, version 0 and aliased versions",
    "export": "write a model with all its versions to a tar archive",
    "import": "create a model from an archive written by export",
    "delete": "delete a model with all its versions",
}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    # --store and --json may come before or after the action.
    args.store = args.action_store or args.store or os.environ.get("STREAMFIT_STORE", DEFAULT_STORE)
    args.json = args.json or args.action_json
    with open_store(args.store) as store:
        result = _HANDLERS[args.action](store, args)
    if args.json:
        print(json.dumps(result["json"], indent=2, sort_keys=True))
    elif "table" in result:
        _print_table(*result["table"])
    else:
        print(result["text"])
    return 0


def _parser() -> argparse.ArgumentParser:
    def add_common(parser: argparse.ArgumentParser, prefix: str) -> None:
        parser.add_argument("--store", dest=f"{prefix}store", default=None, metavar="URL",
                            help=f"store URL (default: STREAMFIT_STORE or {DEFAULT_STORE})")
        parser.add_argument("--json", dest=f"{prefix}json", action="store_true",
                            help="print JSON instead of a table")

    parser = argparse.ArgumentParser(prog="streamfit models",
                                     description="Manage models and their versions in a store.")
    add_common(parser, "")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=ACTIONS[name], description=ACTIONS[name])
        add_common(parser, "action_")
        return parser

    action("list")
    show = action("show")
    show.add_argument("model")
    which = show.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, default=None, help="version number (default: the latest)")
    which.add_argument("--alias", default=None, help="show the version this alias points at")
    show.add_argument("--plot", metavar="FILE", default=None,
                      help="also write a PNG of the test-then-train metric and samples learned "
                           "across the model's versions (needs streamfit[plot])")
    action("history").add_argument("model")
    create = action("create")
    create.add_argument("model")
    create.add_argument("--spec", required=True, help="spec file, JSON or TOML (*.toml)")
    promote = action("promote")
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    promote.add_argument("--alias", default="production", help="alias to move (default: production)")
    alias = action("alias")
    alias.add_argument("model")
    alias.add_argument("alias")
    target = alias.add_mutually_exclusive_group(required=True)
    target.add_argument("version", type=int, nargs="?", help="version the alias points at")
    target.add_argument("--remove", action="store_true", help="remove the alias")
    rollback = action("rollback")
    rollback.add_argument("model")
    rollback.add_argument("--to", type=int, default=None, dest="to_version",
                          help="version to serve again (default: the one before the served one)")
    prune = action("prune")
    prune.add_argument("model")
    prune.add_argument("--keep", type=int, required=True, help="number of latest versions to keep (>= 1)")
    export = action("export")
    export.add_argument("model")
    export.add_argument("--out", required=True, help="archive to write (.tar, or .tar.gz to compress)")
    importer = action("import")
    importer.add_argument("archive")
    importer.add_argument("--as", dest="name", default=None, help="model name in this store "
                          "(default: the exported name)")
    delete = action("delete")
    delete.add_argument("model")
    delete.add_argument("--yes", action="store_true", help="confirm: the model cannot be restored "
                        "unless it was exported")
    return parser


def _list(store, args) -> dict:
    rows = []
    for name in store.list_models():
        try:
            head = store.head(name)
        except ModelNotFound:
            continue  # deleted after the listing was read
        info = store.version(name, head.latest)
        rows.append({
            "model": name,
            "latest": head.latest,
            "aliases": _aliases_text(head.aliases),
            "samples_learned": info.samples_learned,
            "metric": _metric_text(info),
            "updated": _iso(head.updated_at),
        })
    return {"json": rows, "table": (rows, ["model", "latest", "aliases", "samples_learned", "metric", "updated"])}


def _show(store, args) -> dict:
    version = args.version
    head = store.head(args.model)
    if args.alias is not None:
        if args.alias not in head.aliases:
            raise InvalidInputError(
                f"model {args.model!r} has no alias {args.alias!r} (it has: "
                f"{_aliases_text(head.aliases) or 'none'})"
            )
        version = head.aliases[args.alias]
    info = store.version(args.model, version)
    meta = info.metadata
    plot = None
    if args.plot:
        from streamfit.plots import plot_model

        plot = plot_model(store, args.model, args.plot)
    if args.json:
        if plot is not None:
            print(f"wrote {plot}", file=sys.stderr)
        return {"json": dict(meta)}
    rows = [
        ("model", args.model),
        ("version", info.version),
        ("aliases", ", ".join(a for a, v in sorted(head.aliases.items()) if v == info.version)),
        ("parent", meta.get("parent")),
        ("lineage", _lineage_text(info)),
        ("publish_id", info.publish_id),
        ("created", _iso(meta.get("created_at"))),
        ("samples_learned", info.samples_learned),
        ("metrics", json.dumps(meta.get("metrics", {}), sort_keys=True)),
        ("offsets", json.dumps(meta.get("offsets", {}), sort_keys=True)),
    ]
    for kind, entry in sorted(meta.get("artifacts", {}).items()):
        rows.append((f"artifact {kind}", _artifact_text(info, entry)))
    if plot is not None:
        rows.append(("plot", str(plot)))
    return {"json": None, "table": ([{"field": f, "value": v} for f, v in rows], ["field", "value"])}


def _history(store, args) -> dict:
    head = store.head(args.model)
    rows = []
    for info in store.versions(args.model):
        onnx = info.metadata.get("artifacts", {}).get(ONNX, {})
        rows.append({
            "version": info.version,
            "parent": info.metadata.get("parent"),
            "created": _iso(info.metadata.get("created_at")),
            "samples_learned": info.samples_learned,
            "metric": _metric_text(info),
            "onnx_bytes": onnx.get("size"),
            "aliases": ", ".join(a for a, v in sorted(head.aliases.items()) if v == info.version),
            "lineage": _lineage_text(info),
        })
    columns = ["version", "parent", "created", "samples_learned", "metric", "onnx_bytes", "aliases", "lineage"]
    return {"json": rows, "table": (rows, columns)}


def _create(store, args) -> dict:
    from trainer.spec import load_spec_file

    spec = load_spec_file(args.spec)
    head = store.create_model(args.model, spec.to_dict())
    return {"json": {"model": args.model, "latest": head.latest},
            "text": f"created model {args.model} (version {head.latest})"}


def _promote(store, args) -> dict:
    return _move_alias(store, args.model, args.alias, args.version)


def _alias(store, args) -> dict:
    return _move_alias(store, args.model, args.alias, None if args.remove else args.version)


def _move_alias(store, model: str, alias: str, version: int | None) -> dict:
    before = store.head(model).aliases.get(alias)
    head = store.set_alias(model, alias, version)
    if version is None:
        text = f"model {model}: removed alias {alias} (it pointed at version {before})"
    else:
        was = "" if before is None else f" (was version {before})"
        text = f"model {model}: alias {alias} -> version {version}{was}"
    return {"json": {"model": model, "alias": alias, "version": version, "previous": before,
                     "aliases": dict(head.aliases)}, "text": text}


def _rollback(store, args) -> dict:
    info = store.rollback(args.model, args.to_version)
    meta = info.metadata
    text = (f"model {args.model}: version {info.version} now serves the model of version "
            f"{info.source_version} (rolled back from version {meta['rolled_back_from']}); the "
            "records that the versions in between learned are not learned again")
    return {"json": {"model": args.model, "version": info.version, "source_version": info.source_version,
                     "rolled_back_from": meta["rolled_back_from"]}, "text": text}


def _prune(store, args) -> dict:
    removed = store.apply_retention(args.model, args.keep)
    remaining = [info.version for info in store.versions(args.model)]
    text = (f"model {args.model}: removed {len(removed)} versions"
            f"{' (' + _ranges(removed) + ')' if removed else ''}; kept {_ranges(remaining)}")
    return {"json": {"model": args.model, "removed": removed, "kept": remaining}, "text": text}


def _export(store, args) -> dict:
    from modelstore.transfer import export_model

    result = export_model(store, args.model, args.out)
    text = (f"exported model {args.model}: versions {_ranges(result.versions)}, "
            f"{result.artifact_bytes} artifact bytes, to {args.out}")
    return {"json": _transfer_json(result, args.out), "text": text}


def _import(store, args) -> dict:
    from modelstore.transfer import import_model

    result = import_model(store, args.archive, args.name)
    text = (f"imported model {result.model}: versions {_ranges(result.versions)}, "
            f"aliases {_aliases_text(result.aliases) or 'none'}, from {args.archive}")
    return {"json": _transfer_json(result, args.archive), "text": text}


def _delete(store, args) -> dict:
    if not args.yes:
        raise InvalidInputError(
            f"deleting model {args.model!r} removes every version for good; add --yes to confirm "
            "(export it first to keep a copy)"
        )
    store.delete_model(args.model)
    return {"json": {"model": args.model, "deleted": True}, "text": f"deleted model {args.model}"}


_HANDLERS = {
    "list": _list, "show": _show, "history": _history, "create": _create, "promote": _promote,
    "alias": _alias, "rollback": _rollback, "prune": _prune, "export": _export, "import": _import,
    "delete": _delete,
}


def _transfer_json(result, path: str) -> dict[str, Any]:
    return {"model": result.model, "versions": result.versions, "aliases": result.aliases,
            "artifact_bytes": result.artifact_bytes, "archive": path}


def _lineage_text(info: VersionInfo) -> str:
    meta = info.metadata
    notes = []
    if "rolled_back_from" in meta:
        notes.append(f"rollback of {meta['rolled_back_from']} to {meta.get('source_version')}")
    if isinstance(meta.get("imported"), dict):
        notes.append("imported")
    return ", ".join(notes)


def _artifact_text(info: VersionInfo, entry: dict[str, Any]) -> str:
    text = f"{entry.get('size')} bytes sha256 {entry.get('sha256')}"
    if entry.get("format") == "json":
        text += " (stored as ONNX JSON + tensor data)"
    chunks = entry.get("chunks") or entry.get("parts", {}).get("onnx_data", {}).get("chunks", [])
    if len(chunks) > 1:
        text += f" in {len(chunks)} chunks"
    if entry.get("publish_id", info.publish_id) != info.publish_id:
        text += f" (bytes of version {info.source_version})"
    return text


def _metric_text(info: VersionInfo) -> str:
    metrics = info.metadata.get("metrics") or {}
    for name in ("accuracy", "mae"):
        value = metrics.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return f"{name} {value:.4f}"
    return ""


def _aliases_text(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias}={version}" for alias, version in sorted(aliases.items()))


def _ranges(numbers: list[int]) -> str:
    """Render [0, 1, 2, 5] as "0-2, 5"."""
    parts: list[str] = []
    for number in sorted(numbers):
        if parts and parts[-1].split("-")[-1] == str(number - 1):
            parts[-1] = f"{parts[-1].split('-')[0]}-{number}"
        else:
            parts.append(str(number))
    return ", ".join(parts) or "none"


def _iso(timestamp: Any) -> str:
    if not timestamp:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(timestamp)))


def _print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
