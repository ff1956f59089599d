#!/usr/bin/env bash
# Creates (or reuses) a Cloud TPU VM, installs gqa-flax on every worker and starts
# `gqa-reproduce --preset paper` on all workers (JAX multi-host: every worker runs the same
# command; jax.distributed picks up the TPU pod's topology).
#
#   scripts/launch_tpu_vm.sh NAME ZONE ACCELERATOR OUT [RUNTIME]
#   e.g. TFDS_DATA_DIR=gs://my-bucket/tfds scripts/launch_tpu_vm.sh gqa-v4 us-central2-b v4-32 \
#          gs://my-bucket/gqa/paper
#
# Needs: gcloud, authenticated, with TPU quota in ZONE. OUT is a gs:// URL (every worker reads
# and writes it directly: Orbax, TensorStore and the stage markers need no mounted bucket and
# no directory renames there). The T5.1.1 checkpoints are read from gs://t5-data; the tasks'
# TFDS data must be prepared beforehand in TFDS_DATA_DIR (passed to every stage).
# Progress: `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=0
# --command "tail -f ~/gqa_reproduce.log"` (worker 0 writes OUT's logs and markers). Rerunning
# this script resumes the run.
set -euo pipefail

if [[ $# -lt 4 ]]; then
  echo "usage: $0 NAME ZONE ACCELERATOR OUT [RUNTIME]" >&2
  exit 2
fi
NAME=$1 ZONE=$2 ACCELERATOR=$3 OUT=$4
RUNTIME=${5:-tpu-ubuntu2204-base}
REPO_URL=${GQA_REPO_URL:-$(git config --get remote.origin.url || true)}
REF=${GQA_REF:-$(git rev-parse HEAD)}
if [[ -z "$REPO_URL" ]]; then
  echo "error: set GQA_REPO_URL to a git URL the TPU VM can clone" >&2
  exit 2
fi

if ! gcloud compute tpus tpu-vm describe "$NAME" --zone "$ZONE" >/dev/null 2>&1; then
  echo "creating TPU VM $NAME ($ACCELERATOR, $RUNTIME) in $ZONE"
  gcloud compute tpus tpu-vm create "$NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
else
  echo "reusing TPU VM $NAME in $ZONE"
fi

run_all() {
  gcloud compute tpus tpu-vm ssh "$NAME" --zone "$ZONE" --worker=all --command "$1"
}

echo "installing gqa-flax ($REF) on every worker"
run_all "set -e
  sudo apt-get -qq update && sudo apt-get -qq install -y python3.11 python3.11-venv git
  [ -d gqa-flax ] || git clone -q '$REPO_URL' gqa-flax
  cd gqa-flax && git fetch -q && git checkout -q '$REF'
  python3.11 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e '.[tpu,plot]'"

echo "starting gqa-reproduce --preset paper --out $OUT on every worker"
run_all "cd gqa-flax && nohup env JAX_PLATFORMS=tpu .venv/bin/gqa-reproduce --preset paper \
  --out '$OUT' ${TFDS_DATA_DIR:+--tfds_data_dir='$TFDS_DATA_DIR'} > ~/gqa_reproduce.log 2>&1 &"
echo "started; follow with: gcloud compute tpus tpu-vm ssh $NAME --zone $ZONE --worker=0 \
--command 'tail -f ~/gqa_reproduce.log'"
