#!/usr/bin/env bash
# Issue 12's GPU subset, as run on a lent machine (one NVIDIA H100 80GB HBM3, 16 Intel Xeon cores) on
# 2026-11-27: profile, simulate, run three times (the noise floor: real run 2 against real run 1) and
# compare, for one GPU process (world 1, nccl) and a 2-thread CPU process beside the GPU (gloo); then
# async and semi-sync with the server rank on the CPU and the worker on the GPU, and the backend checks
# of studies/device_check.py. Needs hetsim installed with a CUDA torch and Fashion-MNIST at its
# default path (that run used the first 20,000 training images: the device machine cannot download).
#   bash studies/validation/gpu/run.sh [RESULTS_DIR]       (~5 minutes)
set -u
R=${1:-runs/gpu-validation}; mkdir -p "$R"
H="python3 -m hetsim.cli"
for c in gpu1 cpu_gpu; do
  cfg=examples/validate_$c.toml; p=examples/profiles/h100-${c//_/-}
  $H profile --config $cfg --exchange --max-seconds 15 --out $p
  $H simulate $cfg --out $R/$c-sim --quiet
  for i in 1 2 3; do $H run $cfg --out $R/$c-real$i; done
  $H compare $R/$c-sim $R/$c-real1 --out $R/$c-cmp
  $H compare $R/$c-real2 $R/$c-real1 --out $R/$c-noise
done
for proto in "{name='async', params={alpha=0.6, staleness='polynomial', a=0.5}}" \
             "{name='semi_sync', params={k=1, late='keep'}}"; do
  n=$(echo "$proto" | cut -d"'" -f2)
  $H run examples/validate_cpu_gpu.toml --set "protocol=$proto" \
    --set "scheduler={name='fixed', params={per_kind={cpu=2, gpu=16}}}" --set "sampler={name='uniform'}" \
    --set "aggregator={name='mean'}" --out $R/$n-real
done
python3 studies/device_check.py $R/device_check
