#!/usr/bin/env bash
# The CPU demo on the built-in synthetic cohort: set up, generate, train, evaluate.
# Everything lands in work/demo/ (delete it to start over; re-running resumes training).
#   DEMO_CASES=60 DEMO_SPACE=atlas bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
WORK=${DEMO_WORK:-work/demo}
CASES=${DEMO_CASES:-60}
SPACE=${DEMO_SPACE:-atlas}
RUN=$WORK/run
start=$(date +%s)

echo "== 1/3 synthetic cohort: $CASES cases, 2 mm, $SPACE space"
if [ ! -f "$WORK/cohort/datalist.json" ]; then
  python -m pipeline phantom --out "$WORK/cohort" --cases "$CASES" --seed 0 --spacing 2 --space "$SPACE"
else
  echo "   (exists: $WORK/cohort/datalist.json)"
fi
EXTRA=()
[ "$SPACE" = atlas ] && EXTRA=(--already_registered True)

echo "== 2/3 training (MONAI bundle, configs/demo.json)"
python -m monai.bundle run training \
  --config_file "['bundles/plgg_mtl/configs/train.json','configs/demo.json']" \
  --datalist "$WORK/cohort/datalist.json" --output_dir "$RUN" "${EXTRA[@]}"

echo "== 3/3 evaluation of the best checkpoint on the held-out test split"
python -m monai.bundle run \
  --config_file "['bundles/plgg_mtl/configs/train.json','bundles/plgg_mtl/configs/evaluate.json','configs/demo.json']" \
  --datalist "$WORK/cohort/datalist.json" --output_dir "$RUN" "${EXTRA[@]}" 2>&1 | grep -v "^20..-..-.. ..:..:..,... - " || true

python - "$WORK/cohort/datalist.json" "$RUN/metrics.json" <<'PY'
import json, sys
bayes = json.load(open(sys.argv[1])).get("phantom", {}).get("bayes_accuracy")
m = json.load(open(sys.argv[2]))
if bayes is not None and m.get("balanced_accuracy") is not None:
    print(f"classifier balanced accuracy {m['balanced_accuracy']:.3f} vs the generator's Bayes-optimal accuracy {bayes:.3f}")
PY
echo "== done in $(( $(date +%s) - start )) s. Look at the run with:"
echo "   .venv/bin/tensorboard --logdir $RUN/tensorboard"
