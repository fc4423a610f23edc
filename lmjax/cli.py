"""Command-line flag errors as one readable line, shared by every `--config=...` entry point.

ml_collections' config_flags reports an unknown override by its last name only ("'nope'") with a
traceback; `parse_flags`, given to `absl.app.run(..., flags_parser=...)`, names the whole key and
the keys that do exist there, then exits with code 2.
"""

from __future__ import annotations

import runpy
import sys

from absl import flags


def unknown_key_message(argv: list[str]) -> str | None:
    """Which `--config.a.b=...` override names no key, and the keys that exist at that level.

    config_flags reports only the last name ("'nope'"), so the preset is loaded again to find it.
    """
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None:
        return None
    file, _, arg = path.partition(":")
    get_config = runpy.run_path(file)["get_config"]
    config = get_config(arg) if arg else get_config()
    for flag in argv:
        if not flag.startswith("--config."):
            continue
        node, seen = config, []
        for part in flag[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                where = "config" + "".join(f".{s}" for s in seen)
                valid = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "(not a section)"
                return f"unknown config key {where}.{part} in {flag!r}; the keys of {where} are: {valid}"
            node, seen = node[part], seen + [part]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config override errors turned into one readable line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        message = unknown_key_message(argv) or f"bad config override: {e}"
    except flags.Error as e:
        message = str(e)
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
