#!/usr/bin/env bash
# Multi-node training of the pLGG bundle under SLURM: one task per node, each running torchrun with
# one process per GPU of its node; torchrun's c10d rendezvous on the first node joins them.
#
#   sbatch scripts/slurm_multinode.sh DATALIST OUTPUT_DIR [extra bundle overrides ...]
#
# Run from the repository root (or set PLGG_ROOT); the Python environment of scripts/setup.sh (or
# the docker image) must be active on every node. Batch size is per process: 2 nodes x 4 GPUs with
# --batch_size 1 give a global batch of 8 (docs/how-to/gpu.md, "Multi-GPU and multi-node training").
#SBATCH --job-name=plgg-mtl
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=plgg-mtl-%j.log
set -euo pipefail

DATALIST=${1:?usage: sbatch scripts/slurm_multinode.sh DATALIST OUTPUT_DIR [overrides ...]}
OUTPUT_DIR=${2:?usage: sbatch scripts/slurm_multinode.sh DATALIST OUTPUT_DIR [overrides ...]}
shift 2
cd "${PLGG_ROOT:-$(pwd)}"

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L | wc -l)}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=$(( ${SLURM_CPUS_PER_TASK:-8} / GPUS_PER_NODE ))

CONFIGS="['bundles/plgg_mtl/configs/train.json','configs/paper.json','bundles/plgg_mtl/configs/multi_gpu_train.json']"
# a killed or pre-empted job resumes from OUTPUT_DIR/models/checkpoint_epoch=N.pt when resubmitted
srun --ntasks-per-node=1 torchrun \
    --nnodes="$SLURM_NNODES" --nproc_per_node="$GPUS_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$HEAD_NODE:29500" --rdzv_id="$SLURM_JOB_ID" \
    -m monai.bundle run training --config_file "$CONFIGS" \
    --datalist "$DATALIST" --output_dir "$OUTPUT_DIR" --batch_size 1 "$@"
