#!/usr/bin/env bash
# Demo: install cytosyn into .venv and run the pipeline end to end on the shared real slides
# (or on a generated slide when ../shared is absent). Outputs land in demo_out/.
# The model part uses random tiny networks (no pretrained weights can be downloaded here): it shows
# the mechanics, not image quality.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e . -c constraints.txt   # the runtime only; the tests add .[test]
rm -rf demo_out && mkdir -p demo_out
python scripts/make_demo_slides.py demo_out/slides.csv
cytosyn-data tile --slides demo_out/slides.csv --out demo_out/tiles --tiles 120 --shard-size 50 \
  --config tile || echo "(some slides failed: see demo_out/tiles/report.md)"
cat demo_out/tiles/report.md
cytosyn-data split --run demo_out/tiles --val-out-fraction 0.5 --guidance-tiles 8 --shard-size 50
cytosyn-data features --shards demo_out/tiles/splits/train --h0-mini-weights random:small --batch-size 16   # random small H0-mini
cytosyn-train --shards demo_out/tiles/splits/train --config tiny --out demo_out/train --max-steps 10
cytosyn-sample --checkpoint demo_out/train/checkpoints/step_0000010 --out demo_out/samples --mode cond \
  --ref-shards demo_out/tiles/splits/train -n 4 --steps 20 --sampler heun
echo "demo outputs: demo_out/tiles (shards, qc/, report.md, report/index.html), demo_out/tiles/splits, demo_out/train, demo_out/samples/grid.png"
