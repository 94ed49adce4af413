//! Every kernel launch is checked against the kernel's signature, as build.rs read it
//! from kernels/*.cu ([`crate::kernels::SIGNATURES`]): cuLaunchKernel and the emulator's
//! trampoline read one argument slot per declared parameter, with that parameter's
//! width, so a missing or mistyped argument would be an out-of-bounds or misread slot.
//! Both [`super::Gpu`] implementations call [`check_args`] before launching.

use super::Arg;
use crate::error::{Error, Result};
use crate::kernels::{self, Param, ParamKind};

/// Ok when `args` has one argument of the right kind per parameter of `kernel`;
/// otherwise an `Error::Device` naming the kernel, the argument's position (from 1),
/// what it expected and what it got.
pub(crate) fn check_args(kernel: &str, args: &[Arg]) -> Result<()> {
    let sig = kernels::signature(kernel)
        .ok_or_else(|| Error::Device(format!("kernel {kernel}: no such kernel in kernels/*.cu")))?;
    let (want, got) = (sig.params.len(), args.len());
    let refuse = |at: usize, what: String| {
        Error::Device(format!("kernel {kernel}: argument {}{what}", at + 1))
    };
    for (at, param) in sig.params.iter().enumerate() {
        let Some(arg) = args.get(at) else {
            return Err(refuse(
                at,
                format!(
                    " {} is missing ({got} given, it takes {want})",
                    named(param)
                ),
            ));
        };
        if arg.kind() != param.kind {
            return Err(refuse(
                at,
                format!(
                    " {} must be {}, got {arg:?}",
                    named(param),
                    kind_name(param.kind)
                ),
            ));
        }
    }
    match args.get(want) {
        Some(extra) => Err(refuse(
            want,
            format!(" ({extra:?}) is beyond its parameters ({got} given, it takes {want})"),
        )),
        None => Ok(()),
    }
}

/// "(`n`: long)".
fn named(p: &Param) -> String {
    format!("(`{}`: {})", p.name, p.c_type)
}

fn kind_name(kind: ParamKind) -> &'static str {
    match kind {
        ParamKind::Ptr => "a pointer (Arg::Ptr)",
        ParamKind::I32 => "a 32-bit int (Arg::I32)",
        ParamKind::U32 => "a 32-bit unsigned (Arg::U32)",
        ParamKind::I64 => "a 64-bit int (Arg::I64)",
        ParamKind::U64 => "a 64-bit unsigned (Arg::U64)",
        ParamKind::F32 => "an f32 (Arg::F32)",
    }
}

#[cfg(test)]
mod tests {
    use super::super::{emu::EmuGpu, Arg, Gpu, Launch};
    use crate::error::Error;
    use crate::kernels::SIGNATURES;

    fn launch(gpu: &EmuGpu, kernel: &'static str, args: &[Arg]) -> crate::Result<()> {
        let l = Launch {
            kernel,
            grid: [1, 1, 1],
            block: [32, 1, 1],
            shared: 0,
        };
        gpu.launch(&l, args)
    }

    /// The refusal's message, which must name the kernel and the argument.
    fn refused(r: crate::Result<()>) -> String {
        match r {
            Err(Error::Device(m)) => m,
            other => panic!("expected a refused launch, got {other:?}"),
        }
    }

    #[test]
    fn launches_matching_their_kernel_run() {
        let gpu = EmuGpu::default();
        let x = gpu.alloc(64).unwrap();
        launch(
            &gpu,
            "fill_f32",
            &[Arg::Ptr(x), Arg::F32(2.0), Arg::I64(16)],
        )
        .unwrap();
        let mut out = [0u8; 64];
        gpu.download(x, &mut out).unwrap();
        assert!(bytemuck::cast_slice::<u8, f32>(&out)
            .iter()
            .all(|&v| v == 2.0));
    }

    #[test]
    fn a_missing_argument_is_refused() {
        let gpu = EmuGpu::default();
        let x = gpu.alloc(64).unwrap();
        let m = refused(launch(&gpu, "fill_f32", &[Arg::Ptr(x), Arg::F32(2.0)]));
        assert_eq!(
            m,
            "kernel fill_f32: argument 3 (`n`: long) is missing (2 given, it takes 3)"
        );
        let m = refused(launch(&gpu, "fill_f32", &[]));
        assert!(
            m.starts_with("kernel fill_f32: argument 1 (`x`: float*) is missing"),
            "{m}"
        );
    }

    #[test]
    fn an_argument_of_the_wrong_kind_is_refused() {
        let gpu = EmuGpu::default();
        let x = gpu.alloc(64).unwrap();
        let m = refused(launch(
            &gpu,
            "fill_f32",
            &[Arg::Ptr(x), Arg::I32(2), Arg::I64(16)],
        ));
        assert_eq!(
            m,
            "kernel fill_f32: argument 2 (`v`: float) must be an f32 (Arg::F32), got I32(2)"
        );
        // Width matters: an i32 where the kernel reads a 64-bit long.
        let m = refused(launch(
            &gpu,
            "fill_f32",
            &[Arg::Ptr(x), Arg::F32(2.0), Arg::I32(16)],
        ));
        assert!(
            m.contains("argument 3 (`n`: long) must be a 64-bit int"),
            "{m}"
        );
        // An address is not a pointer argument unless passed as one.
        let m = refused(launch(
            &gpu,
            "fill_f32",
            &[Arg::U64(x), Arg::F32(2.0), Arg::I64(16)],
        ));
        assert!(
            m.contains("argument 1 (`x`: float*) must be a pointer"),
            "{m}"
        );
    }

    #[test]
    fn extra_arguments_and_unknown_kernels_are_refused() {
        let gpu = EmuGpu::default();
        let x = gpu.alloc(64).unwrap();
        let args = [Arg::Ptr(x), Arg::F32(2.0), Arg::I64(16), Arg::I32(0)];
        let m = refused(launch(&gpu, "fill_f32", &args));
        assert_eq!(
            m,
            "kernel fill_f32: argument 4 (I32(0)) is beyond its parameters (4 given, it takes 3)"
        );
        let m = refused(launch(&gpu, "no_such_kernel", &[]));
        assert!(m.contains("no_such_kernel"), "{m}");
    }

    /// `signature` binary-searches the table: it must be sorted, each name once.
    #[test]
    fn the_signature_table_is_sorted_by_kernel_name() {
        assert!(SIGNATURES.len() > 40);
        assert!(SIGNATURES.windows(2).all(|w| w[0].kernel < w[1].kernel));
        let adam = crate::kernels::signature("adam_multi_f32").unwrap();
        assert_eq!((adam.source, adam.params.len()), ("optim", 11));
    }
}
