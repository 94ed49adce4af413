//! Compiles the CUDA kernels (kernels/*.cu) with nvcc into PTX (compute_90) and sm_90
//! cubin, embedded in the library through a generated module, and keeps ptxas's
//! resource report (registers, spills) for the tests. nvcc is looked for in $NVCC,
//! $CUDA_HOME/bin, the project's own install (scripts/install-cuda.sh → .cuda/) and
//! PATH. Without it the crate builds CPU-only and says so; with
//! FERROVIT_REQUIRE_KERNELS=1 a missing nvcc or a kernel that fails to compile fails
//! the build.
//!
//! The same sources are also compiled as C++ for the host (with kernels/emu.h, the `cc`
//! crate, g++ -std=c++20), always: the CUDA backend's emulated device runs them in the
//! tests on machines without a GPU (src/backend/cuda/emu.rs).
//!
//! First of all it reads every `extern "C" __global__` kernel's parameters
//! (build/signatures.rs) into `kernels::SIGNATURES`, which each launch is checked
//! against; a kernel it cannot read fails the build.

#[path = "build/signatures.rs"]
mod signatures;

use signatures::{parse_kernels, Kernel};
use std::path::{Path, PathBuf};
use std::process::Command;

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = std::env::var_os("NVCC") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(h) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(h).join("bin/nvcc"));
    }
    candidates.push(root.join(".cuda/nvidia/cu13/bin/nvcc"));
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    candidates.into_iter().find(|p| p.is_file())
}

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    // (not PATH: it changes with every shell or venv, and a missing watched file would
    // rerun this script on every build; scripts/install-cuda.sh touches kernels/)
    for var in ["NVCC", "CUDA_HOME", "FERROVIT_REQUIRE_KERNELS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=kernels");
    let require = std::env::var("FERROVIT_REQUIRE_KERNELS").is_ok_and(|v| v == "1");
    let mut sources: Vec<PathBuf> = std::fs::read_dir(root.join("kernels"))
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "cu"))
                .collect()
        })
        .unwrap_or_default();
    sources.sort();
    let kernels = all_kernels(&sources);
    std::fs::write(
        out.join("kernel_signatures.rs"),
        signatures_module(&kernels),
    )
    .expect("write the kernel signatures");
    compile_emulation(&root, &out, &sources, &kernels);
    let generated = out.join("kernels.rs");
    let Some(nvcc) = find_nvcc(&root) else {
        if require {
            panic!(
                "FERROVIT_REQUIRE_KERNELS=1 but no nvcc was found (NVCC, CUDA_HOME, .cuda/ from \
                 scripts/install-cuda.sh, PATH)"
            );
        }
        println!(
            "cargo:warning=no nvcc found: building CPU-only, without CUDA kernels \
             (run scripts/install-cuda.sh to build them)"
        );
        std::fs::write(
            &generated,
            "/// Whether the CUDA kernels were compiled into this build.\npub const BUILT: bool = false;\n\
             /// (name, PTX, cubin) of each kernel source.\npub const MODULES: &[(&str, &str, &[u8])] = &[];\n\
             /// ptxas's resource report of every kernel.\npub const PTXAS_REPORT: &str = \"\";\n",
        )
        .expect("write the kernels module");
        return;
    };
    let include = nvcc
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("include"))
        .unwrap_or_default();
    let mut modules = String::new();
    let mut report = String::new();
    for src in &sources {
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file names are UTF-8");
        let ptx = out.join(format!("{name}.ptx"));
        let cubin = out.join(format!("{name}.cubin"));
        let run = |args: &[&str], what: &str| -> String {
            let o = Command::new(&nvcc)
                .args(args)
                .arg("-I")
                .arg(&include)
                .arg(src)
                .arg("-o")
                .arg(if what == "ptx" { &ptx } else { &cubin })
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
            let text = String::from_utf8_lossy(&o.stderr).into_owned()
                + &String::from_utf8_lossy(&o.stdout);
            if !o.status.success() {
                panic!("nvcc failed on {} ({what}):\n{text}", src.display());
            }
            text
        };
        run(&["-ptx", "-arch=compute_90", "-O3"], "ptx");
        report += &run(&["-cubin", "-arch=sm_90", "-O3", "-Xptxas", "-v"], "cubin");
        modules += &format!(
            "    ({name:?}, include_str!({:?}), include_bytes!({:?})),\n",
            ptx.display().to_string(),
            cubin.display().to_string()
        );
    }
    std::fs::write(out.join("ptxas-report.txt"), &report).expect("write the ptxas report");
    std::fs::write(
        &generated,
        format!(
            "/// Whether the CUDA kernels were compiled into this build.\npub const BUILT: bool = true;\n\
             /// (name, PTX, cubin) of each kernel source.\npub const MODULES: &[(&str, &str, &[u8])] = &[\n{modules}];\n\
             /// ptxas's resource report of every kernel.\npub const PTXAS_REPORT: &str = {report:?};\n"
        ),
    )
    .expect("write the kernels module");
}

/// The kernels of every source, sorted by name; the build fails (naming the file and the
/// kernel) on one it cannot read, and on a name defined twice.
fn all_kernels(sources: &[PathBuf]) -> Vec<Kernel> {
    let mut all: Vec<Kernel> = Vec::new();
    for src in sources {
        let text = std::fs::read_to_string(src)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
        let kernels =
            parse_kernels(&text, &stem(src)).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
        all.extend(kernels);
    }
    all.sort_by(|a, b| a.name.cmp(&b.name));
    if let Some(w) = all.windows(2).find(|w| w[0].name == w[1].name) {
        panic!(
            "kernel {} is defined twice (kernels/{}.cu and kernels/{}.cu): launches name \
             kernels, so names must be unique",
            w[0].name, w[0].source, w[1].source
        );
    }
    all
}

fn stem(src: &Path) -> String {
    src.file_stem()
        .and_then(|s| s.to_str())
        .expect("kernel file names are UTF-8")
        .to_string()
}

/// The Rust table of every kernel's parameters (`crate::kernels::SIGNATURES`).
fn signatures_module(kernels: &[Kernel]) -> String {
    let mut out = String::from(
        "/// Every `extern \"C\" __global__` kernel of kernels/*.cu and its parameters, as \
         build.rs read them; sorted by name.\npub const SIGNATURES: &[Signature] = &[\n",
    );
    for k in kernels {
        let params: String = k
            .params
            .iter()
            .map(|p| {
                format!(
                    "        Param {{ name: {:?}, c_type: {:?}, kind: ParamKind::{} }},\n",
                    p.name,
                    p.c_type,
                    p.kind.rust()
                )
            })
            .collect();
        out += &format!(
            "    Signature {{\n        kernel: {:?},\n        source: {:?},\n        params: &[\n{params}        ],\n    }},\n",
            k.name, k.source
        );
    }
    out + "];\n"
}

/// Compiles every kernel source as C++ for the host emulation: one translation unit per
/// source (a wrapper that includes it and lists its kernels with a trampoline that
/// unpacks cuLaunchKernel-style `void**` arguments and a static_assert of its parameter
/// kinds), plus the Rust table of sources.
fn compile_emulation(root: &Path, out: &Path, sources: &[PathBuf], kernels: &[Kernel]) {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .define("FV_EMULATION", None)
        .include(root.join("kernels"))
        .opt_level(2)
        .warnings(false);
    let mut runtime = String::from(
        "#include \"emu.h\"\n\
         thread_local const FvEmuThread* fv_emu_cur = nullptr;\n\
         extern \"C\" void fv_emu_set_current(const FvEmuThread* t) { fv_emu_cur = t; }\n",
    );
    runtime += "#include <cstddef>\n";
    let mut table = String::from("extern \"C\" {\n");
    let mut list = String::new();
    for src in sources {
        let name = stem(src);
        let name = name.as_str();
        let (entries, checks) = emulation_entries(kernels, name);
        let wrapper = out.join(format!("emu_{name}.cpp"));
        std::fs::write(
            &wrapper,
            format!(
                "#include \"{}\"\n#include \"emu_invoke.h\"\n\
                 {checks}static const FvEmuEntry entries[] = {{\n{entries}}};\n\
                 extern \"C\" const FvEmuEntry* fv_emu_entries_{name}(int* count) {{\n\
                 \x20 *count = sizeof(entries) / sizeof(entries[0]);\n  return entries;\n}}\n",
                src.display()
            ),
        )
        .expect("write an emulation wrapper");
        build.file(&wrapper);
        table += &format!(
            "    fn fv_emu_entries_{name}(count: *mut std::ffi::c_int) -> *const EmuEntry;\n"
        );
        list += &format!("    (\"{name}\", fv_emu_entries_{name}),\n");
    }
    std::fs::write(out.join("emu_invoke.h"), EMU_INVOKE_H).expect("write emu_invoke.h");
    let runtime_file = out.join("emu_runtime.cpp");
    std::fs::write(&runtime_file, runtime).expect("write the emulation runtime");
    build.file(&runtime_file).include(out);
    build.compile("ferrovit_kernels_emu");
    table += "}\n";
    std::fs::write(
        out.join("emu_modules.rs"),
        format!(
            "{table}\n/// Each kernel source and its table of emulated entry points.\n\
             pub(crate) static EMU_SOURCES: &[(&str, unsafe extern \"C\" fn(*mut std::ffi::c_int) -> *const EmuEntry)] = &[\n{list}];\n"
        ),
    )
    .expect("write the emulation table");
}

/// The emulation table's entries of source `name`'s kernels (a trampoline each that
/// unpacks cuLaunchKernel-style `void**` arguments), and a static_assert each that the
/// C++ compiler sees the parameter kinds this parser read: the table that launches are
/// checked against is itself checked, in every build.
fn emulation_entries(kernels: &[Kernel], name: &str) -> (String, String) {
    let mut entries = String::new();
    let mut checks = String::new();
    for k in kernels.iter().filter(|k| k.source == name) {
        let kinds: String = k.params.iter().map(|p| p.kind.letter()).collect();
        let k = &k.name;
        entries += &format!("  {{\"{k}\", [](void** p) {{ fv_emu_invoke({k}, p); }}}},\n");
        checks += &format!(
            "static_assert(fv_emu_kinds_are({k}, \"{kinds}\"), \"build.rs misread the \
             parameters of kernel {k} (it read kinds {kinds})\");\n"
        );
    }
    (entries, checks)
}

/// The emulation's launch trampoline, and `fv_emu_kind`: a parameter's kind as the
/// compiler sees it, in the letters of `Kind::letter` ('?' for none of them).
const EMU_INVOKE_H: &str = r#"#pragma once
#include <cstddef>
#include <type_traits>
#include <utility>
struct FvEmuEntry { const char* name; void (*call)(void**); };
template <class... A, std::size_t... I>
void fv_emu_invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<A>*>(p[I])...);
}
template <class... A>
void fv_emu_invoke(void (*f)(A...), void** p) {
  fv_emu_invoke(f, p, std::index_sequence_for<A...>{});
}
template <class T>
constexpr char fv_emu_kind() {
  if constexpr (std::is_pointer_v<T>) return 'p';
  else if constexpr (std::is_same_v<T, float>) return 'f';
  else if constexpr (!std::is_integral_v<T> || std::is_same_v<T, bool>) return '?';
  else if constexpr (sizeof(T) == 4) return std::is_signed_v<T> ? 'i' : 'u';
  else if constexpr (sizeof(T) == 8) return std::is_signed_v<T> ? 'l' : 'U';
  else return '?';
}
template <class... A>
constexpr bool fv_emu_kinds_are(void (*)(A...), const char* want) {
  const char got[] = {fv_emu_kind<std::remove_cv_t<A>>()..., '\0'};
  for (std::size_t i = 0; i <= sizeof...(A); ++i)
    if (got[i] != want[i]) return false;
  return true;
}
"#;
