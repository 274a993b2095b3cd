#!/usr/bin/env bash
# The GPU figures, for a lent CUDA machine whose image has PyTorch but not MONAI & co (see the
# developers' guide). Prepare here, once:
#   bash scripts/gpu_figures.sh --fetch-wheels      # downloads py3.12 manylinux wheels into .whl/
# then run there (the device tool, carrying .whl), in two commands that each fit its 10-minute limit:
#   bash scripts/gpu_figures.sh single               # one-process figures into ${OUT:-work/gpu_figures}
#   bash scripts/gpu_figures.sh ddp                  # the torchrun figures (same OUT)
# (no argument runs both). Only small text files go to OUT; the cohort, checkpoints and caches
# stay under work/.
# It installs the wheels into .whl/site, builds a 40-case 1 mm atlas-space phantom cohort, and runs
# benchmarks/train_step.py --precision (fp32 / fp16 / bf16 / compiled bf16 on the paper network),
# benchmarks/data_feed.py (patches/s and headroom with the machine's workers), benchmarks/startup.py
# (command -> first iteration, cold and warm), benchmarks/train_loop.py (engine overhead, compiled)
# and benchmarks/inference.py ('single'); then the one-GPU check of multi_gpu_train.json (torchrun,
# nccl) and benchmarks/ddp_overhead.py ('ddp'). About 11 minutes in all on an H100-class machine
# (an estimate: never yet run on one).
set -euo pipefail
cd "$(dirname "$0")/.."
# what the device image lacks (developers' guide); the cohort is written on the atlas grid, so no deepbet
WHEELS="monai==1.6.1 nibabel SimpleITK pytorch-ignite fire termcolor nilearn"

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    mkdir -p .whl
    .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl $WHEELS
    # SimpleITK's wheel alone is 52 MB: unpack it and recompress (xz) so the carried folder stays < 64 MiB
    rm -f .whl/sitk.tar.xz
    for w in .whl/[Ss]imple[Ii][Tt][Kk]-*.whl; do
        [[ -e "$w" ]] || continue
        mkdir -p .whl/sitk && (cd .whl/sitk && python3 -m zipfile -e "../$(basename "$w")" .)
        tar -C .whl/sitk -cJf .whl/sitk.tar.xz . && rm -rf .whl/sitk "$w"
    done
    du -sh .whl
    exit 0
fi

PART="${1:-all}"
case "$PART" in single|ddp|all) ;; *) echo "gpu_figures.sh: unknown part '$PART' (single, ddp or nothing for both)" >&2; exit 2;; esac
PY="${PYTHON:-python3}"
OUT="${OUT:-work/gpu_figures}"
mkdir -p "$OUT" .whl/site work
export PYTHONPATH="$PWD/.whl/site:$PWD" PYTHONUNBUFFERED=1
[[ -e .whl/sitk.tar.xz ]] && tar -C .whl/site -xJf .whl/sitk.tar.xz
"$PY" -m pip install -q --no-deps --target .whl/site .whl/*.whl
"$PY" -c "import torch, monai; print(torch.__version__, monai.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
COHORT=work/gpu_cohort
[[ -e $COHORT/datalist.json ]] || "$PY" -m pipeline phantom --out $COHORT --cases 40 --seed 21 --spacing 1 --space atlas
WORKERS=$(( $(nproc) - 2 ))
single() {
    "$PY" benchmarks/train_step.py --precision --overlay paper.json --device cuda --iters 20
    "$PY" benchmarks/data_feed.py --datalist $COHORT/datalist.json --workers $WORKERS --epochs 3 --consume 38
    "$PY" benchmarks/startup.py --datalist $COHORT/datalist.json --device cuda --workers $WORKERS
    "$PY" benchmarks/train_loop.py --datalist $COHORT/datalist.json --overlays configs/paper.json --device cuda \
        --batches 10 --epochs 3
    "$PY" benchmarks/inference.py --device cuda
}
ddp() {
    # the multi-GPU overlay under torchrun with one process (nccl): trains and validates; the
    # wrapper's overhead per step against the bare network
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 benchmarks/ddp_overhead.py --overlay paper.json \
        --device cuda --iters 20
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m monai.bundle run training --config_file \
        "['bundles/plgg_mtl/configs/train.json','configs/paper.json','bundles/plgg_mtl/configs/multi_gpu_train.json']" \
        --datalist $COHORT/datalist.json --output_dir work/gpu_ddp1 --already_registered True --epochs 2 \
        --val_interval 1 --num_workers $WORKERS | grep -E "distributed|Epoch\[|Metrics|start-up|Saved|decide"
}
{
    [[ "$PART" == ddp ]] || single
    [[ "$PART" == single ]] || ddp
} 2>&1 | grep -v "Warning\|warnings.warn" | tee -a "$OUT/figures_$PART.txt"
