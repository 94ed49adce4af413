//! Tensor basics: shapes, dtypes (bf16/f16 storage), byte round trips, errors.

use crate::common;
use ferrovit::tensor::{convert, pool_bytes, trim_pool};
use ferrovit::{DType, Device, Tensor};

#[test]
fn shape_and_reshape() {
    let t = Tensor::from_vec((0..24).map(|i| i as f32).collect(), [2, 3, 4]).unwrap();
    assert_eq!(
        (t.dims(), t.numel(), t.shape().rows(), t.shape().last()),
        (&[2, 3, 4][..], 24, 6, 4)
    );
    let r = t.clone().reshape([6, 4]).unwrap();
    assert_eq!(r.f32s().unwrap(), t.f32s().unwrap());
    let e = t.reshape([5, 5]).unwrap_err().to_string();
    assert!(e.contains("24") && e.contains("[5, 5]"), "{e}");
    assert!(Tensor::from_vec(vec![1.0; 5], [2, 3]).is_err());
}

#[test]
fn half_precision_storage_round_trips() {
    let vals = vec![1.0f32, -2.5, 0.1, 65504.0, 3.140625, -0.0];
    let t = Tensor::from_vec(vals.clone(), [6]).unwrap();
    for dt in [DType::BF16, DType::F16] {
        let h = t.to_dtype(dt);
        assert_eq!(h.dtype(), dt);
        assert!(h.f32s().is_err(), "compute on {dt} must be refused");
        let back = h.to_dtype(DType::F32).to_vec_f32();
        for (a, b) in back.iter().zip(&vals) {
            let tol = if dt == DType::BF16 { 4e-3 } else { 1e-3 };
            assert!((a - b).abs() <= tol * b.abs().max(1e-3), "{dt}: {a} vs {b}");
        }
        let bytes = h.to_le_bytes();
        assert_eq!(bytes.len(), 12);
        let again = Tensor::from_le_bytes(&bytes, dt, [6]).unwrap();
        assert_eq!(again.to_vec_f32(), h.to_vec_f32());
    }
    // exact values survive exactly; 1/3 is rounded to nearest even in bf16
    assert_eq!(
        Tensor::from_vec(vec![3.140625], [1])
            .unwrap()
            .to_dtype(DType::BF16)
            .to_vec_f32(),
        [3.140625]
    );
    assert_eq!(
        Tensor::from_vec(vec![1.0 / 3.0], [1])
            .unwrap()
            .to_dtype(DType::BF16)
            .to_vec_f32(),
        [0.333_984_38]
    );
}

/// bf16 held widened in f32 (how the CPU holds mixed precision's activations) holds
/// exactly what bf16 storage holds, through every conversion.
#[test]
fn bf16_held_widened_holds_what_bf16_storage_holds() {
    // a value that rounds up, ties both ways, a NaN, an infinity, a denormal
    let tie_down = f32::from_bits(0x3f80_8000); // halfway: rounds to the even 1.0
    let tie_up = f32::from_bits(0x3f81_8000); // halfway: rounds up, to even
    let vals = vec![
        1.0 / 3.0,
        tie_down,
        tie_up,
        -7.77,
        f32::NAN,
        f32::INFINITY,
        1e-40,
    ];
    let f = Tensor::from_vec(vals.clone(), [7]).unwrap();
    let narrow = f.to_dtype(DType::BF16);
    let check = |wide: &Tensor| {
        assert_eq!(wide.dtype(), DType::BF16);
        let held = wide.bf16_wide().expect("held widened");
        let want = narrow.to_vec_f32();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(held), bits(&want));
        assert_eq!(bits(&wide.to_vec_f32()), bits(&want));
        assert_eq!(wide.to_le_bytes(), narrow.to_le_bytes());
        let back = wide.to_dtype(DType::F32);
        assert_eq!(bits(back.f32s().unwrap()), bits(&want));
        // asking for bf16 elements says how they are held
        let e = wide.bf16s().unwrap_err().to_string();
        assert!(e.contains("widened"), "{e}");
    };
    check(&f.to_bf16_wide().unwrap());
    check(&narrow.to_bf16_wide().unwrap());
    // written through f32 by a writer that rounds, as the CPU backend's ops do
    let mut t = Tensor::try_uninit_as([7], DType::BF16, Device::Cpu).unwrap();
    assert!(
        t.bf16_wide().is_some(),
        "CPU bf16 buffers start held widened"
    );
    let x = t.bf16_wide_mut(false).unwrap();
    x.copy_from_slice(&vals);
    convert::round_in_place(x);
    check(&t);
    // read for writing, bf16 storage is widened with its values
    let mut n = narrow.clone();
    assert_eq!(n.bf16_wide_mut(true).unwrap()[0], 0.333_984_38);
    check(&n);
    let e = f.clone().bf16_wide_mut(false).unwrap_err();
    assert!(e.to_string().contains("F32"), "{e}");
}

#[test]
fn byte_length_mismatch_is_an_error() {
    let e = Tensor::from_le_bytes(&[0u8; 10], DType::F32, [3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("12 bytes") && e.contains("10 bytes"), "{e}");
}

#[test]
fn large_buffers_are_reused_through_the_pool() {
    // the pool is the process's: the other tests of this binary take from it and give
    // back to it while they run
    if !common::alone_in_a_process("tensor::large_buffers_are_reused_through_the_pool") {
        return;
    }
    trim_pool();
    let n = 1 << 16;
    let mut t = Tensor::uninit([n], Device::Cpu);
    t.fill(3.0).unwrap();
    drop(t);
    assert!(pool_bytes() >= n * 4);
    let z = Tensor::zeros([n], Device::Cpu);
    assert!(
        z.f32s().unwrap().iter().all(|&v| v == 0.0),
        "pooled buffers are zeroed for zeros()"
    );
    trim_pool();
    assert_eq!(pool_bytes(), 0);
}
