"""Digests of the data a demo run wrote (shards, parquet tables, features, samples, checkpoints).

A refactor that claims no behaviour change runs the demo before and after and compares:

    bash scripts/demo.sh && python scripts/demo_digest.py > before.txt
    (change the code)
    bash scripts/demo.sh && python scripts/demo_digest.py > after.txt && diff before.txt after.txt

Reports, logs and run.json (timestamps, code version) are left out: they describe a run, they are
not its data.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

DATA = (".tar", ".parquet", ".png", ".npy", ".safetensors", ".h5", ".geojson")


def main(root: str = "demo_out") -> int:
    files = sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix in DATA and "report" not in p.parts)
    if not files:
        print(f"{root}: no demo outputs (run scripts/demo.sh first)", file=sys.stderr)
        return 1
    for p in files:
        print(hashlib.sha256(p.read_bytes()).hexdigest(), p.relative_to(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
