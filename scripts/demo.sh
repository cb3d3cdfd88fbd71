#!/usr/bin/env bash
# Demo: install cytosyn into .venv and run the pipeline on the shared real slides
# (or on a generated slide when ../shared is absent). Outputs land in demo_out/.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e ".[test]"
rm -rf demo_out && mkdir -p demo_out
python scripts/make_demo_slides.py demo_out/slides.csv
cytosyn-data tile --slides demo_out/slides.csv --out demo_out/tiles --tiles 120 --shard-size 50 \
  --config pipelines/tile.yaml || echo "(some slides failed: see demo_out/tiles/report.md)"
cat demo_out/tiles/report.md
