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
    compile_emulation(&root, &out, &sources);
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

/// The `extern "C" __global__` kernels a source defines.
fn kernel_names(src: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = src;
    while let Some(at) = rest.find("__global__ void ") {
        let before = rest[..at].trim_end();
        rest = &rest[at + "__global__ void ".len()..];
        if before.ends_with("extern \"C\"") {
            let mut after = rest.trim_start();
            if let Some(bounds) = after.strip_prefix("__launch_bounds__") {
                after = bounds.split_once(')').map_or("", |(_, r)| r).trim_start();
            }
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names
}

/// Compiles every kernel source as C++ for the host emulation: one translation unit per
/// source (a wrapper that includes it and lists its kernels with a trampoline that
/// unpacks cuLaunchKernel-style `void**` arguments), plus the Rust table of sources.
fn compile_emulation(root: &Path, out: &Path, sources: &[PathBuf]) {
    let kernels = root.join("kernels");
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .define("FV_EMULATION", None)
        .include(&kernels)
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
        let name = src
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("kernel file names are UTF-8");
        let text = std::fs::read_to_string(src)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
        let entries: String = kernel_names(&text)
            .iter()
            .map(|k| format!("  {{\"{k}\", [](void** p) {{ fv_emu_invoke({k}, p); }}}},\n"))
            .collect();
        let wrapper = out.join(format!("emu_{name}.cpp"));
        std::fs::write(
            &wrapper,
            format!(
                "#include \"{}\"\n#include \"emu_invoke.h\"\n\
                 static const FvEmuEntry entries[] = {{\n{entries}}};\n\
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
    std::fs::write(
        out.join("emu_invoke.h"),
        "#pragma once\n#include <cstddef>\n#include <type_traits>\n#include <utility>\n\
         struct FvEmuEntry { const char* name; void (*call)(void**); };\n\
         template <class... A, std::size_t... I>\n\
         void fv_emu_invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {\n\
         \x20 f(*static_cast<std::remove_cv_t<A>*>(p[I])...);\n}\n\
         template <class... A>\nvoid fv_emu_invoke(void (*f)(A...), void** p) {\n\
         \x20 fv_emu_invoke(f, p, std::index_sequence_for<A...>{});\n}\n",
    )
    .expect("write emu_invoke.h");
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
