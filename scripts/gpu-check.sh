#!/usr/bin/env bash
# The GPU check, in two halves (the GPU machine has no Rust toolchain and no network):
#
#   bash scripts/gpu-check.sh prepare   # here: build the test and bench binaries (kernels
#                                       # embedded) into gpu-bundle/, debug info stripped
#   bash scripts/gpu-check.sh run       # on the GPU machine, from the repository root,
#                                       # with gpu-bundle/ carried over: ~4 minutes
#
# `run` checks every CUDA kernel against the CPU backend (tests/core/conformance.rs; on a
# failure it runs them again under compute-sanitizer), trains the digits on the GPU and
# on the CPU, in f32 and in bf16 mixed precision, and compares them (tests/core/cuda_train.rs),
# runs the kernel bandwidth benches (benches/cuda_kernels.rs), then times a full training
# step of both presets at batch 512 — ferrovit f32 and bf16 vs PyTorch f32, bf16 autocast
# eager and torch.compile (scripts/bench_torch.py) — prints one table, and where a bf16
# vit_lite step spends its device time (FERROVIT_PROFILE=1). Logs land in $OUT (the device
# tool's) or /tmp/gpu-check. FERROVIT_REQUIRE_GPU=1 makes a missing GPU a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bundle=gpu-bundle

prepare() {
    set -e
    export FERROVIT_REQUIRE_KERNELS=1
    rm -rf "$bundle" && mkdir -p "$bundle"
    local list
    list=$( (cargo test --release --no-run --message-format=json --test core --test cli;
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
    export FERROVIT_BIN=$PWD/$bundle/ferrovit
    local t0=$SECONDS status=0 log=${OUT:-/tmp/gpu-check}
    mkdir -p "$log"
    # cuBLAS and NCCL are loaded by name (libcublas.so.13, libnccl.so): add the folders
    # of NVIDIA's pip wheels (PyTorch's) and of a CUDA image; the NCCL wheel has only
    # libnccl.so.2, so link it under the name cudarc looks for.
    local libs links=/tmp/ferrovit-libs
    libs=$(python3 -c 'import nvidia, glob, os
print(":".join(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))))' 2>/dev/null || true)
    mkdir -p "$links"
    local dir
    for dir in ${libs//:/ } /usr/lib/x86_64-linux-gnu; do
        if [ -e "$dir/libnccl.so.2" ]; then ln -sf "$dir/libnccl.so.2" "$links/libnccl.so"; break; fi
    done
    export PATH="$PATH:/usr/local/cuda/bin"
    export LD_LIBRARY_PATH="$links:${libs:+$libs:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || true
    step() { echo; echo "== $1 ($((SECONDS - t0)) s)"; shift; "$@" || { echo "FAILED: $*"; status=1; return 1; }; }
    step "conformance: every kernel vs the CPU backend" \
        timeout 120 "$bundle/core" conformance::cuda_kernels_match_the_cpu_backend --exact --nocapture ||
        step "conformance again, under compute-sanitizer memcheck" \
            timeout 120 compute-sanitizer --print-limit 20 "$bundle/core" \
            conformance::cuda_kernels_match_the_cpu_backend --exact --nocapture
    step "training on the GPU matches the CPU" \
        timeout 180 "$bundle/core" cuda_train::cuda_training_matches_the_cpu_on_a_gpu --exact --nocapture
    step "NCCL on the GPU: collectives and device tensors reduced in place (world 1)" \
        timeout 60 "$bundle/cli" dist_tcp::nccl_group_of_one_or_a_clear_error_without_a_gpu --exact --nocapture
    step "kernel bandwidth (criterion)" \
        bash -c "timeout 150 $bundle/cuda_kernels --bench --noplot --warm-up-time 1 2>&1 | tee $log/kernels.txt"
    step "the attention kernels again, SIMT instead of tensor cores" \
        bash -c "FERROVIT_ATTENTION=simt timeout 60 $bundle/cuda_kernels --bench --noplot --warm-up-time 1 attention 2>&1 |
            tee $log/kernels-simt.txt"
    local rows=()
    torch_ips() { timeout "$1" python3 scripts/bench_torch.py --device cuda "${@:2}" --batch 512 --steps 20 |
        tee -a "$log/torch.txt" | tail -1 |
        python3 -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_s_median"], 1))'; }
    ours_ips() { timeout 60 "$bundle/ferrovit" bench --device cuda --batch-size 512 --steps 20 --warmup 3 "$@" 2>&1 |
        tee -a "$log/ferrovit.txt" | grep -o '[0-9.]* images/s' | cut -d' ' -f1; }
    for preset in vit_lite_depth7_patch4_32 vit_tiny_patch4_32; do
        local f32 bf16 tf32 teager tcompiled
        f32=$(ours_ips --preset "$preset" --precision f32)
        bf16=$(ours_ips --preset "$preset" --precision bf16)
        tf32=$(torch_ips 60 --preset "$preset" --warmup 3)
        teager=$(torch_ips 60 --autocast bf16 --preset "$preset" --warmup 3)
        tcompiled=$(torch_ips 150 --autocast bf16 --compile --preset "$preset" --warmup 5)
        rows+=("$preset ${f32:-?} ${bf16:-?} ${tf32:-?} ${teager:-?} ${tcompiled:-?}")
    done
    echo
    echo "== vit_lite bf16 with the SIMT attention kernels instead of the tensor-core ones"
    FERROVIT_ATTENTION=simt ours_ips --preset vit_lite_depth7_patch4_32 --precision bf16 | sed 's/$/ images\/s/'
    echo
    echo "== where a vit_lite bf16 step spends device time (CUDA events around every launch)"
    FERROVIT_PROFILE=1 timeout 60 "$bundle/ferrovit" bench --device cuda --batch-size 512 --steps 5 \
        --warmup 1 --precision bf16 2>&1 | tee "$log/profile.txt"
    cat "$log/ferrovit.txt"
    echo
    echo "== train step, batch 512, images/s (ferrovit f32 / bf16 mixed precision; PyTorch f32 / bf16 autocast eager / compiled)"
    printf '%-28s %9s %9s %10s %10s %13s %10s\n' preset ours-f32 ours-bf16 torch-f32 torch-bf16 torch-compile vs-compile
    for r in "${rows[@]}"; do
        set -- $r
        printf '%-28s %9s %9s %10s %10s %13s %10s\n' "$1" "$2" "$3" "$4" "$5" "$6" \
            "$(python3 -c "import sys; a, c = sys.argv[1:]; print(f'{float(a)/float(c):.2f}x')" "$3" "$6" 2>/dev/null || echo ?)"
    done | tee "$log/table.txt"
    echo "(done in $((SECONDS - t0)) s)"
    return $status
}

case "${1:-}" in
    prepare) prepare ;;
    run) run ;;
    *) echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
