#!/usr/bin/env bash
# Issue #7's GPU checks in one pass on a lent GPU (the H200 of the `device` tool), run from the repository root:
#
#     OUT=benchmarks/<date>_<gpu> BUDGET_S=540 [STAGES="pytest tiny compiled eager cast cast_gelu cast_fresh_kv train"] bash benchmarks/gpu_check.sh
#
# Stages (STAGES picks and orders them); each starts only while enough of BUDGET_S (seconds) is left, and each
# writes its own JSON, so a stage that fails or runs out of time loses nothing of the others:
#   pytest.log            `pytest -m gpu` (tests/test_gpu.py): the CUDA-only paths (GELU epilogue, CUDA graphs
#                         with static K/V, bf16 autocast / cast) against eager float32; needs pytest installed
#   tiny_cuda_fp32.json   the tiny preset on the GPU in float32: every sampling optimisation keeps the codes
#   paper_compiled.json   paper models, bf16 autocast, torch.compile reduce-overhead (CUDA graphs), NHWC +
#                         fused-norm decoder: latency (batch 1) and throughput (batch 16), the floors
#   paper_eager.json      the same models eager, with the ablation (each optimisation off / each decoder option
#                         on) and generator training throughput
#   paper_cast.json       as paper_compiled with the weights (text encoder too) cast to bf16 and the decoder and
#                         text encoder compiled too, plus a profile of one batch-16 call (paper_cast.profile.txt)
#                         and its host synchronisations by source line (host_syncs);
#                         the 2026-11-30 runs predate compile_text, static_text_kv and the sync-free sampling
#                         loops (each JSON's "config" says what ran)
#                         every paper stage also splits the batch-1 call into its phases (latency_phases), so
#                         the latency floor can be read phase by phase
#   paper_cast_gelu.json  paper_cast with gelu_epilogue=true (the MLP's bias + tanh GELU in the fc1 GEMM's
#                         cuBLASLt epilogue): compare with paper_cast.json (paper_eager's ablation has the
#                         eager autocast transformer phase with it on and off, and tiny_cuda_fp32's the codes)
#   paper_cast_fresh_kv.json  paper_cast without static_text_kv (each step's CUDA graph copies the K/V in): the
#                         gain of the static buffers
#   paper_train_compiled.json generator training with the step compiled (train_compile=true, as train.compile=true
#                         trains), bf16 autocast, batch 16 like paper_eager's eager number (its sampling numbers
#                         come from single calls: not for the floors)
set -u
OUT=${OUT:-runs/gpu_check}
BUDGET_S=${BUDGET_S:-540}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
started=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - started))); }

stage() {  # stage NAME MIN_SECONDS MAX_SECONDS ARGS...: run the benchmark if MIN_SECONDS are left
    local name=$1 need=$2 cap=$3
    shift 3
    local rest
    rest=$(left)
    if ((rest < need)); then
        echo "=== $name skipped: ${rest} s left, needs ${need}"
        return
    fi
    ((rest > cap)) && rest=$cap
    echo "=== $name (limit ${rest} s): $*"
    timeout "$rest" python3 scripts/benchmark.py "$@" out="$OUT/$name.json"
    echo "=== $name exit $? after $((SECONDS - started)) s"
}

gpu_tests() {  # pytest -m gpu, if pytest is there and 60 s are left (at most 240)
    local rest
    rest=$(left)
    if ! python3 -c "import pytest" 2>/dev/null; then
        echo "=== pytest skipped: pytest is not installed"
    elif ((rest < 60)); then
        echo "=== pytest skipped: ${rest} s left, needs 60"
    else
        ((rest > 240)) && rest=240
        echo "=== pytest -m gpu (limit ${rest} s)"
        timeout "$rest" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest.log"
        echo "=== pytest exit ${PIPESTATUS[0]} after $((SECONDS - started)) s"
    fi
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda,
torch.cuda.get_device_name())"

CAST="preset=paper precision=cast compile=true compile_mode=reduce-overhead compile_decoder=true compile_text=true
decoder_channels_last=true decoder_fuse_norms=true train=false"
REPEATS="latency_warmup=10 latency_repeats=30 throughput_warmup=5 throughput_repeats=20 phase_repeats=10"
for name in ${STAGES:-pytest tiny compiled eager cast cast_gelu cast_fresh_kv train}; do
    case $name in
    pytest) gpu_tests ;;
    tiny) stage tiny_cuda_fp32 30 120 preset=tiny device=cuda threads=0 ;;
    compiled) stage paper_compiled 120 300 preset=paper compile=true compile_mode=reduce-overhead \
        decoder_channels_last=true decoder_fuse_norms=true train=false $REPEATS ;;
    eager) stage paper_eager 90 240 preset=paper ablate=true ablate_compile=false $REPEATS ;;
    cast) stage paper_cast 120 300 $CAST profile=true $REPEATS ;;
    cast_gelu) stage paper_cast_gelu 120 300 $CAST gelu_epilogue=true $REPEATS ;;
    cast_fresh_kv) stage paper_cast_fresh_kv 120 300 $CAST static_text_kv=false $REPEATS ;;
    train) stage paper_train_compiled 90 240 preset=paper train_compile=true flops=false latency_warmup=0 \
        latency_repeats=1 throughput_warmup=0 throughput_repeats=1 phase_repeats=1 ;;
    *) echo "unknown stage $name (pytest, tiny, compiled, eager, cast, cast_gelu, cast_fresh_kv, train)" ;;
    esac
done
nvidia-smi --query-gpu=clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
echo "=== done after $((SECONDS - started)) s"
