"""`galatea models`: the models `galatea serve` would offer (list, show), or what a running
server has (`--url`: which are loaded, their memory)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from galatea.commands.common import models_args, served_entries
from galatea.errors import GalateaError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("models", help="the models serve offers: list, show (or a running server's, --url)")
    msub = p.add_subparsers(dest="action", required=True)
    c = msub.add_parser("list", help="name, family, size and quantization of each")
    c.add_argument("--url", help="ask a running `galatea serve` (e.g. http://127.0.0.1:5001) instead")
    c = msub.add_parser("show", help="one model described from its metadata (as `galatea inspect`)")
    c.add_argument("name")
    for c in msub.choices.values():
        c.add_argument("--model", action="append", help="a GGUF file or Hugging Face folder (again for more)")
        models_args(c)
        c.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def _from_server(url: str) -> list[dict[str, Any]]:
    import httpx

    try:
        tags = httpx.get(url.rstrip("/") + "/api/tags", timeout=10).json()["models"]
        loaded = {m["model"]: m for m in httpx.get(url.rstrip("/") + "/api/ps", timeout=10).json()["models"]}
    except (httpx.HTTPError, ValueError, KeyError) as e:
        raise GalateaError(f"{url} did not answer as `galatea serve` does ({type(e).__name__}); "
                           "is it running?") from None
    return [{"name": m["model"].removesuffix(":latest"), "family": m["details"]["family"],
             "parameters": m["details"]["parameter_size"], "quantization": m["details"]["quantization_level"],
             "size_gib": round(m["size"] / 2**30, 2),
             "loaded": f"{loaded[m['model']]['size'] / 2**30:.2f} GiB held" if m["model"] in loaded else "no"}
            for m in tags]


def run(args: argparse.Namespace) -> int:
    from galatea.engine.shelf import ModelEntry
    from galatea.model.inspect import describe
    from galatea.server import ollama_models

    if args.action == "list" and args.url:
        rows = _from_server(args.url)
    else:
        entries: list[ModelEntry] = served_entries(args)
        if args.action == "show":
            chosen = next((e for e in entries if e.name.lower() == args.name.lower().removesuffix(":latest")), None)
            if chosen is None:
                raise GalateaError(f"no model {args.name!r} here; `galatea models list` names "
                                   f"{', '.join(e.name for e in entries)}")
            info = {"name": chosen.name, **describe(chosen.path)}
            print(json.dumps(info, indent=2) if args.json else
                  "\n".join(f"{k:<16} {v}" for k, v in info.items()))
            return 0
        rows = []
        for e in entries:
            d = ollama_models.details(e.path, e.config, e.metadata(), e.tensor_types())
            rows.append({"name": e.name, "family": d["family"], "parameters": d["parameter_size"],
                         "quantization": d["quantization_level"], "size_gib": round(e.size / 2**30, 2),
                         "path": str(e.path)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no models", file=sys.stderr)
        return 0
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    print("  ".join(k.upper().ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(str(r[k]).ljust(widths[k]) for k in keys))
    return 0
