#!/usr/bin/env bash
# Run a dit_jax job on every host of a Cloud TPU VM slice (v3/v4/v5e/v5p/v6e pods).
#
#   launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=y ...]
#   launch/tpu_vm.sh dit-v3-256 europe-west4-a configs/xl2.py gs://BUCKET/xl2 \
#       --config.data.dir=gs://BUCKET/imagenet256_latents
#
# The same command runs on all hosts; jax.distributed.initialize() finds the slice by itself
# (dit_jax/runtime.py). Checkpoints go to WORKDIR (use gs:// so any host can resume), and a
# preempted slice resumes where it stopped when this script is run again.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
TPU=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4; shift 4
REPO=${DIT_JAX_REPO:-$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || echo "")}
BRANCH=${DIT_JAX_BRANCH:-main}
if [ -z "$REPO" ]; then echo "set DIT_JAX_REPO to the git URL of dit_jax" >&2; exit 2; fi
SETUP="set -e; if [ ! -d ~/dit_jax ]; then git clone -b $BRANCH $REPO ~/dit_jax; fi; cd ~/dit_jax; \
git fetch -q origin $BRANCH && git checkout -q origin/$BRANCH; \
pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
# XLA's options that overlap the data-parallel collectives with compute travel with the train
# step, not the environment: step.build passes them as compile options on TPUs when
# --config.mesh.overlap_collectives=True (dit_jax.sharding.TPU_OVERLAP_OPTIONS; off by default),
# exactly as `python -m dit_jax.aot` compiles the step it plans.
# jax.distributed starts by itself: JAX's cluster detection finds the TPU VM pod through its
# metadata server (dit_jax/runtime.py); with it comes the preemption notice service that makes
# every host save and exit at the same step.
RUN="cd ~/dit_jax && python -m dit_jax.main $(printf '%q ' "--config=$CONFIG" "--workdir=$WORKDIR" "$@")"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "$SETUP"
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all \
  --command "nohup bash -c $(printf '%q' "$RUN") > ~/dit_jax_run.log 2>&1 &"
echo "started on all workers of $TPU; logs: ~/dit_jax_run.log on each host, TensorBoard: $WORKDIR"
