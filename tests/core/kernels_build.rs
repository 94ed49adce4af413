//! The CUDA kernels compile (with the pinned nvcc; CI installs it and sets
//! FERROVIT_REQUIRE_KERNELS=1), every source is embedded as PTX and cubin, and ptxas
//! reports no register spills for any kernel; and build.rs's reader of kernel
//! signatures (which every launch is checked against) reads them all, strictly.

// Only the reader; build.rs uses the rest.
#[allow(dead_code)]
#[path = "../../build/signatures.rs"]
mod signatures;

use ferrovit::kernels::{module, BUILT, MODULES, PTXAS_REPORT, SIGNATURES};
use signatures::parse_kernels;

fn built() -> bool {
    if !BUILT {
        assert!(
            std::env::var("FERROVIT_REQUIRE_KERNELS").map_or(true, |v| v != "1"),
            "FERROVIT_REQUIRE_KERNELS=1 but this build has no CUDA kernels"
        );
        eprintln!("skipped: CPU-only build (no nvcc; scripts/install-cuda.sh installs one)");
    }
    BUILT
}

#[test]
fn every_kernel_source_is_embedded_as_ptx_and_cubin() {
    if !built() {
        return;
    }
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut sources: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "cu").then(|| p.file_stem()?.to_str().map(String::from))?
        })
        .collect();
    sources.sort();
    let embedded: Vec<&str> = MODULES.iter().map(|(n, _, _)| *n).collect();
    assert_eq!(embedded, sources);
    for name in &sources {
        let (ptx, cubin) = module(name).unwrap();
        assert!(ptx.contains(".target sm_90"), "{name}: PTX for compute_90");
        assert!(ptx.contains(".visible .entry"), "{name}: PTX has kernels");
        assert_eq!(&cubin[..4], b"\x7fELF", "{name}: the cubin is an ELF image");
    }
}

#[test]
fn no_kernel_spills_registers() {
    if !built() {
        return;
    }
    let functions = PTXAS_REPORT.matches("Function properties for").count();
    assert!(functions >= MODULES.len(), "{PTXAS_REPORT}");
    for line in PTXAS_REPORT.lines().filter(|l| l.contains("spill")) {
        assert!(
            line.contains("0 bytes spill stores, 0 bytes spill loads"),
            "a kernel spills registers: {line}\n{PTXAS_REPORT}"
        );
    }
}

fn kernel_sources() -> Vec<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut sources: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .map(|p| {
            let stem = p.file_stem().unwrap().to_str().unwrap().to_string();
            (stem, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    sources.sort();
    sources
}

/// The generated table is what the reader reads from kernels/*.cu: every kernel, with
/// every parameter's name and kind.
#[test]
fn the_signature_table_lists_every_kernel_and_parameter() {
    let mut read: Vec<String> = Vec::new();
    for (stem, text) in kernel_sources() {
        for k in parse_kernels(&text, &stem).unwrap() {
            let params: Vec<String> = k
                .params
                .iter()
                .map(|p| format!("{}: {} {}", p.name, p.c_type, p.kind.rust()))
                .collect();
            read.push(format!("{} ({}) {}", k.name, k.source, params.join(", ")));
        }
    }
    read.sort();
    let table: Vec<String> = SIGNATURES
        .iter()
        .map(|s| {
            let params: Vec<String> = s
                .params
                .iter()
                .map(|p| format!("{}: {} {:?}", p.name, p.c_type, p.kind))
                .collect();
            format!("{} ({}) {}", s.kernel, s.source, params.join(", "))
        })
        .collect();
    assert_eq!(read, table);
    assert!(table
        .iter()
        .any(|k| k.starts_with("attention_forward_bf16 (attention) qkv: const fv_bf16* Ptr")));
}

#[test]
fn the_reader_takes_instantiations_launch_bounds_and_skips_comments() {
    let src = r#"
// extern "C" __global__ void commented(int x) {}
/* extern "C" __global__ void also_commented(double x) {} */
template <class T> __device__ void body(T* x, long n) {}
extern "C" __global__ void __launch_bounds__((FV_T) * 2, 1)
k_bf16(const fv_bf16* __restrict__ x, float* const y, unsigned long long key, unsigned t,
       long long n, int d, float s) { body(x, n); }
extern "C" __global__ void none() {}
"#;
    let kernels = parse_kernels(src, "demo").unwrap();
    let names: Vec<&str> = kernels.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["k_bf16", "none"]);
    let params: Vec<(&str, &str, &str)> = kernels[0]
        .params
        .iter()
        .map(|p| (p.name.as_str(), p.c_type.as_str(), p.kind.rust()))
        .collect();
    assert_eq!(
        params,
        [
            ("x", "const fv_bf16*", "Ptr"),
            ("y", "float* const", "Ptr"),
            ("key", "unsigned long long", "U64"),
            ("t", "unsigned", "U32"),
            ("n", "long long", "I64"),
            ("d", "int", "I32"),
            ("s", "float", "F32"),
        ]
    );
    assert!(kernels[1].params.is_empty());
}

/// A kernel the reader cannot read fails the build (so none goes unchecked), with an
/// error naming its line, the kernel and the parameter.
#[test]
fn signatures_the_reader_cannot_read_are_errors() {
    let cases = [
        (
            "extern \"C\" __global__ void k(double x) {}",
            "line 1: kernel k: parameter 1 (`double x`): type `double` cannot be passed",
        ),
        (
            "\nextern \"C\" __global__ void k(int) {}",
            "line 2: kernel k: parameter 1 (`int`): expected a type and a parameter name",
        ),
        (
            "extern \"C\" __global__ void k(float x[4]) {}",
            "line 1: kernel k: parameter 1 (`float x[4]`): unexpected `[`",
        ),
        (
            "extern \"C\" __global__ void k(const Vec<float>& v) {}",
            "kernel k: parameter 1 (`const Vec<float>& v`): unexpected `<`",
        ),
        (
            "extern \"C\" __global__ void k(float* x);",
            "kernel k: expected its body after the parameter list",
        ),
        (
            "template <class T> __global__ void k(T* x) {}",
            "line 1: a `__global__` function that is not `extern \"C\"`",
        ),
        (
            "#define K(n) extern \"C\" __global__ void n(float* x) {}",
            "line 1: `__global__` in a macro",
        ),
        (
            "extern \"C\" __global__ int k(float* x) {}",
            "line 1: expected `void`, `__launch_bounds__(…)` and the kernel's name",
        ),
        (
            "extern \"C\" __global__ void k(float * * x, int y z) {}",
            "kernel k: parameter 2 (`int y z`): type `int y` cannot be passed",
        ),
    ];
    for (src, want) in cases {
        match parse_kernels(src, "demo") {
            Ok(k) => panic!("{src}: read {} kernels, expected an error", k.len()),
            Err(e) => assert!(e.contains(want), "{src}:\n{e}\nwanted: {want}"),
        }
    }
}
