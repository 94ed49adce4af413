#!/usr/bin/env bash
# The GPU check, in two halves (the GPU machine has no Rust toolchain and no network):
#
#   bash scripts/gpu-check.sh prepare   # here: build the test and bench binaries (kernels
#                                       # embedded) into gpu-bundle/, debug info stripped
#   bash scripts/gpu-check.sh run       # on the GPU machine, from the repository root,
#                                       # with gpu-bundle/ carried over: < 8 minutes
#
# `run` checks every CUDA kernel against the CPU backend (tests/conformance.rs), trains
# the digits on the GPU and on the CPU and compares accuracy (tests/cuda_train.rs), runs
# the kernel bandwidth benches (benches/cuda_kernels.rs), then times a full training step
# of both presets at batch 512: ferrovit --device cuda vs PyTorch eager bf16 autocast
# and torch.compile (scripts/bench_torch.py), and prints one table. FERROVIT_REQUIRE_GPU=1
# makes a missing GPU a failure instead of a skip.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle

prepare() {
    set -e
    export FERROVIT_REQUIRE_KERNELS=1
    rm -rf "$bundle" && mkdir -p "$bundle"
    local list
    list=$( (cargo test --release --no-run --message-format=json --test conformance --test cuda_train;
             cargo bench --no-run --message-format=json --bench cuda_kernels) |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["target"]["name"], m["executable"])')
    cargo build --release --bin ferrovit
    list+=$'\n'"ferrovit target/release/ferrovit"
    while read -r name exe; do
        objcopy --strip-debug "$exe" "$bundle/$name"
    done <<< "$list"
    du -sh "$bundle"/*
}

run() {
    export FERROVIT_REQUIRE_GPU=1
    local t0=$SECONDS status=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    step() { echo; echo "== $1"; shift; "$@" || { echo "FAILED: $*"; status=1; }; }
    step "conformance: every kernel vs the CPU backend" \
        timeout 120 "$bundle/conformance" cuda_kernels_match_the_cpu_backend --nocapture
    step "training on the GPU matches the CPU" \
        timeout 180 "$bundle/cuda_train" cuda_training_matches_the_cpu_on_a_gpu --nocapture
    step "kernel bandwidth (criterion)" \
        timeout 150 "$bundle/cuda_kernels" --bench --noplot
    local rows=()
    for preset in vit_lite_depth7_patch4_32 vit_tiny_patch4_32; do
        local ours eager compiled
        ours=$(timeout 60 "$bundle/ferrovit" bench --device cuda --preset "$preset" \
            --batch-size 512 --steps 20 --warmup 3 | tee /dev/stderr | grep -o '[0-9.]* images/s' | cut -d' ' -f1)
        eager=$(timeout 60 python3 scripts/bench_torch.py --device cuda --autocast bf16 \
            --preset "$preset" --batch 512 --steps 20 --warmup 3 | tail -1 |
            python3 -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_s_median"], 1))')
        compiled=$(timeout 150 python3 scripts/bench_torch.py --device cuda --autocast bf16 --compile \
            --preset "$preset" --batch 512 --steps 20 --warmup 5 | tail -1 |
            python3 -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_s_median"], 1))')
        rows+=("$preset ${ours:-?} ${eager:-?} ${compiled:-?}")
    done
    echo
    echo "== train step, batch 512, images/s (ferrovit: f32 kernels + cuBLAS; PyTorch: bf16 autocast)"
    printf '%-28s %12s %14s %14s %10s\n' preset ferrovit torch-eager torch-compile vs-compile
    for r in "${rows[@]}"; do
        set -- $r
        printf '%-28s %12s %14s %14s %10s\n' "$1" "$2" "$3" "$4" \
            "$(python3 -c "import sys; a, c = sys.argv[1:]; print(f'{float(a)/float(c):.2f}x')" "$2" "$4" 2>/dev/null || echo ?)"
    done
    echo "(done in $((SECONDS - t0)) s)"
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
