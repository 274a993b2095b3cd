#!/usr/bin/env bash
# The CPU demo on the built-in synthetic cohort: set up, generate native-space scans, train
# through atlas registration, evaluate on held-out cases, infer back in native space, score.
# Everything lands in work/demo/ (delete it to start over; re-running resumes / skips done work).
#   DEMO_CASES=60 DEMO_SPACE=native|atlas bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export PYTHONUNBUFFERED=1
WORK=${DEMO_WORK:-work/demo}
CASES=${DEMO_CASES:-60}
SPACE=${DEMO_SPACE:-native}
RUN=$WORK/run
COHORT=$WORK/cohort
TRAIN="['bundles/plgg_mtl/configs/train.json','configs/demo.json']"
EVAL="['bundles/plgg_mtl/configs/train.json','bundles/plgg_mtl/configs/evaluate.json','configs/demo.json']"
INFER="['bundles/plgg_mtl/configs/inference.json','configs/demo.json']"
COMMON=(--datalist "$COHORT/datalist.json" --output_dir "$RUN" --registration_cache "$WORK/registration")
[ "$SPACE" = atlas ] && COMMON+=(--already_registered True)
quiet() { grep -v -E "^20..-..-.. ..:..:..,... - |UserWarning|warnings.warn|^ *$|workflow = create_workflow" || true; }
start=$(date +%s)

echo "== 1/4 synthetic cohort: $CASES cases, 2 mm, $SPACE space"
if [ ! -f "$COHORT/datalist.json" ]; then
  python -m pipeline phantom --out "$COHORT" --cases "$CASES" --seed 0 --spacing 2 --space "$SPACE"
else
  echo "   (exists: $COHORT/datalist.json)"
fi

echo "== 2/4 training (MONAI bundle + configs/demo.json; each scan is registered to the 2 mm MNI152 atlas once, cached)"
python -m monai.bundle run training --config_file "$TRAIN" "${COMMON[@]}"

echo "== 3/4 evaluation of the best checkpoint on the held-out test split (atlas space)"
python -m monai.bundle run --config_file "$EVAL" "${COMMON[@]}" 2>&1 | quiet

if [ -f bundles/plgg_mtl/configs/inference.json ]; then
  echo "== 4/4 inference on the held-out test scans, masks written back in each scan's native space"
  python - "$COHORT/datalist.json" "$RUN/split.json" "$WORK/test_datalist.json" <<'PY'
import json, sys
dl, split, out = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), sys.argv[3]
test = set(split["splits"][0]["test"])
cases = [dict(e, image=f"cohort/{e['image']}", **({"label": f"cohort/{e['label']}"} if "label" in e else {}))
         for e in dl["training"] if e["id"] in test]
json.dump({"classes": dl["classes"], "training": cases}, open(out, "w"), indent=1)
PY
  python -m monai.bundle run --config_file "$INFER" --datalist "$WORK/test_datalist.json" \
    --output_dir "$WORK/inference" --ckpt "$RUN/models/model.pt" \
    --registration_cache "$WORK/registration" 2>&1 | quiet
  python -m pipeline score --predictions "$WORK/inference" --datalist "$WORK/test_datalist.json"
fi

python - "$COHORT/datalist.json" "$RUN/metrics.json" <<'PY'
import json, sys
bayes = json.load(open(sys.argv[1])).get("phantom", {}).get("bayes_accuracy")
m = json.load(open(sys.argv[2]))
if bayes is not None and m.get("balanced_accuracy") is not None:
    print(f"classifier balanced accuracy {m['balanced_accuracy']:.3f} vs the generator's Bayes-optimal accuracy {bayes:.3f}")
PY
echo "== done in $(( $(date +%s) - start )) s. Look at the run with:"
echo "   .venv/bin/tensorboard --logdir $RUN/tensorboard"
