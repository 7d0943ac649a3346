#!/usr/bin/env bash
# Run a dit_jax job on several TPU slices joined over the data-centre network (Multislice).
#
#   launch/multislice.sh QR_NAME ZONE ACCELERATOR NUM_SLICES RUNTIME CONFIG WORKDIR [--config.x=y ...]
#   launch/multislice.sh dit-xl2 us-east5-a v5p-256 2 v2-alpha-tpuv5 configs/xl2.py gs://BUCKET/xl2 \
#       --config.data.dir=gs://BUCKET/imagenet256_latents
#
# 1. Requests NUM_SLICES slices of ACCELERATOR as one queued resource (skipped if QR_NAME exists)
#    and waits until it is ACTIVE.
# 2. Installs dit_jax on every host of every slice and starts the same command everywhere.
# The TPU runtime tells each host its slice (MEGASCALE_* variables); jax.distributed starts by
# itself and dit_jax builds a hybrid mesh: config.mesh.data x config.mesh.fsdp within a slice
# (ICI), data parallelism across slices (DCN), so only gradient reductions cross the DCN.
# Run the script again after a preemption: the job resumes from the last checkpoint in WORKDIR
# (use gs://). Delete the slices with: gcloud compute tpus queued-resources delete QR_NAME --zone ZONE --force
set -euo pipefail
if [ $# -lt 7 ]; then
  sed -n '2,17p' "$0"; exit 2
fi
QR=$1 ZONE=$2 ACCELERATOR=$3 SLICES=$4 RUNTIME=$5 CONFIG=$6 WORKDIR=$7; shift 7
REPO=${DIT_JAX_REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")}
BRANCH=${DIT_JAX_BRANCH:-main}
if [ -z "$REPO" ]; then echo "set DIT_JAX_REPO to the git URL of dit_jax" >&2; exit 2; fi
if ! gcloud compute tpus queued-resources describe "$QR" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus queued-resources create "$QR" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --runtime-version "$RUNTIME" \
    --node-count "$SLICES" --node-prefix "$QR" ${DIT_JAX_QR_FLAGS:-}
fi
until [ "$(gcloud compute tpus queued-resources describe "$QR" --zone "$ZONE" \
            --format='value(state.state)')" = "ACTIVE" ]; do
  echo "waiting for $QR to become ACTIVE..."; sleep 60
done
SETUP="set -e; if [ ! -d ~/dit_jax ]; then git clone -b $BRANCH $REPO ~/dit_jax; fi; cd ~/dit_jax; \
git fetch -q origin $BRANCH && git checkout -q origin/$BRANCH; \
pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
RUN="cd ~/dit_jax && python -m dit_jax.main $(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" "$@")"
gcloud alpha compute tpus queued-resources ssh "$QR" --zone "$ZONE" --node=all --worker=all \
  --command "$SETUP"
gcloud alpha compute tpus queued-resources ssh "$QR" --zone "$ZONE" --node=all --worker=all \
  --command "nohup bash -c $(printf '%q' "$RUN") > ~/dit_jax_run.log 2>&1 &"
echo "started on all hosts of the $SLICES slices of $QR; logs: ~/dit_jax_run.log, TensorBoard: $WORKDIR"
