"""Strip outputs, execution counts and run-time metadata from notebooks, in place (like nbstripout).

Usage: python scripts/strip_notebooks.py [--check] NOTEBOOK.ipynb ...
  --check   change nothing; exit 1 and name the notebooks that still hold outputs.

Plain JSON in, nbformat's own layout out (indent 1, sorted keys), so a clean notebook is left
byte-for-byte as it is and the script needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Cell metadata that records a particular execution or view, not content.
CELL_KEYS = ("execution", "collapsed", "scrolled", "ExecuteTime")
# Notebook metadata written by front ends (widget state, Colab's run info).
NB_KEYS = ("widgets", "colab", "accelerator", "toc", "varInspector")


def strip(nb: dict) -> dict:
    """The notebook without outputs, execution counts and run-time metadata (modified in place)."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        meta = cell.get("metadata", {})
        for key in CELL_KEYS:
            meta.pop(key, None)
    for key in NB_KEYS:
        nb.get("metadata", {}).pop(key, None)
    return nb


def dumps(nb: dict) -> str:
    """Serialise the way nbformat writes notebooks."""
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    """Strip each notebook named in argv; with --check only report. Returns the exit code."""
    check = "--check" in argv
    paths = [Path(a) for a in argv if a != "--check"]
    if not paths:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    dirty = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        clean = dumps(strip(json.loads(text)))
        if clean == text:
            continue
        dirty.append(path)
        if not check:
            path.write_text(clean, encoding="utf-8")
            print(f"stripped {path}")
    if check and dirty:
        print("notebooks with outputs (run `make strip`): " + ", ".join(map(str, dirty)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
