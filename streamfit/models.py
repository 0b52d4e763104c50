"""``streamfit models``: list, show and create models in a store."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from modelstore import open_store
from modelstore.errors import ConfigError

DEFAULT_STORE = "sqlite:///models.db"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="streamfit models", description="Inspect and create models.")
    parser.add_argument(
        "--store", default=os.environ.get("STREAMFIT_STORE", DEFAULT_STORE),
        help=f"store URL (default: STREAMFIT_STORE or {DEFAULT_STORE})",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="list models with their latest version")
    show = sub.add_parser("show", help="show one version's metadata (the latest by default)")
    show.add_argument("model")
    show.add_argument("--version", type=int, default=None)
    create = sub.add_parser("create", help="create a model from a JSON spec file")
    create.add_argument("model")
    create.add_argument("--spec", required=True, help="JSON spec file")
    args = parser.parse_args(argv)

    with open_store(args.store) as store:
        if args.action == "list":
            return _list(store, args.json)
        if args.action == "show":
            return _show(store, args.model, args.version, args.json)
        return _create(store, args.model, args.spec, args.json)


def _list(store, as_json: bool) -> int:
    rows = []
    for name in store.list_models():
        head = store.head(name)
        info = store.version(name, head.latest)
        rows.append({
            "model": name,
            "latest": head.latest,
            "samples_learned": info.samples_learned,
            "accuracy": info.metadata.get("metrics", {}).get("accuracy"),
            "updated": _iso(head.updated_at),
        })
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, ["model", "latest", "samples_learned", "accuracy", "updated"])
    return 0


def _show(store, model: str, version: int | None, as_json: bool) -> int:
    info = store.version(model, version)
    if as_json:
        print(json.dumps(dict(info.metadata), indent=2, sort_keys=True))
        return 0
    meta = info.metadata
    rows = [
        {"field": "model", "value": model},
        {"field": "version", "value": info.version},
        {"field": "parent", "value": meta.get("parent")},
        {"field": "publish_id", "value": info.publish_id},
        {"field": "created", "value": _iso(meta.get("created_at"))},
        {"field": "samples_learned", "value": info.samples_learned},
        {"field": "metrics", "value": json.dumps(meta.get("metrics", {}), sort_keys=True)},
        {"field": "offsets", "value": json.dumps(meta.get("offsets", {}), sort_keys=True)},
    ]
    for kind, artifact in sorted(meta.get("artifacts", {}).items()):
        rows.append({"field": f"artifact {kind}",
                     "value": f"{artifact.get('size')} bytes sha256 {artifact.get('sha256')}"})
    _print_table(rows, ["field", "value"])
    return 0


def _create(store, model: str, spec_path: str, as_json: bool) -> int:
    from trainer.spec import ModelSpec

    try:
        raw = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"spec file {spec_path!r} not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"spec file {spec_path!r} is not valid JSON: {exc}") from None
    spec = ModelSpec.from_dict(raw)
    head = store.create_model(model, spec.to_dict())
    if as_json:
        print(json.dumps({"model": model, "latest": head.latest}))
    else:
        print(f"created model {model} (version {head.latest})")
    return 0


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
