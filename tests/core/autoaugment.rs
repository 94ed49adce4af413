//! AutoAugment against torchvision: every operation at the CIFAR-10 policy's
//! magnitudes (both signs), on two digits images and a colourful one, from
//! tests/fixtures/autoaugment.safetensors (written by scripts/make_autoaugment_fixture.py).

use ferrovit::data::autoaugment::{auto_augment, Op, BINS, CIFAR10_POLICY};
use ferrovit::rng::Rng;
use safetensors::SafeTensors;

const FIXTURE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/autoaugment.safetensors"
));

fn fixture() -> SafeTensors<'static> {
    SafeTensors::deserialize(FIXTURE).expect("valid safetensors")
}

fn bytes(st: &SafeTensors, name: &str) -> Vec<u8> {
    st.tensor(name)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .data()
        .to_vec()
}

#[test]
fn magnitudes_match_torchvision() {
    let st = fixture();
    for op in Op::ALL {
        let Ok(t) = st.tensor(&format!("magnitudes.{}", op.name())) else {
            assert_eq!(op.magnitude(3), 0.0, "{op:?} has no magnitude");
            continue;
        };
        let want: Vec<f32> = t
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(want.len(), BINS);
        for (bin, w) in want.iter().enumerate() {
            assert_eq!(op.magnitude(bin), *w, "{op:?} bin {bin}");
        }
    }
}

#[test]
fn every_op_matches_torchvision() {
    let st = fixture();
    let mut checked = 0;
    for op in Op::ALL {
        for bin in [0, 2, 5, 9] {
            for sign in ["pos", "neg"] {
                for k in 0..3 {
                    let name = format!("{}.{bin}.{sign}.{k}", op.name());
                    let Ok(want) = st.tensor(&name) else { continue };
                    let m = op.magnitude(bin) * if sign == "neg" { -1.0 } else { 1.0 };
                    let got = op.apply(&bytes(&st, &format!("input.{k}")), m);
                    let want = want.data();
                    assert_eq!(got.len(), want.len());
                    // Same op order and f32 arithmetic as torch; a rounding tie may
                    // still fall the other way on a rare pixel, never by more than 1.
                    let off: Vec<(usize, u8, u8)> = (0..got.len())
                        .filter(|&i| got[i] != want[i])
                        .map(|i| (i, got[i], want[i]))
                        .collect();
                    assert!(
                        off.len() <= 2 && off.iter().all(|(_, g, w)| g.abs_diff(*w) <= 1),
                        "{name}: {} pixels differ, first {:?}",
                        off.len(),
                        &off[..off.len().min(5)]
                    );
                    checked += 1;
                }
            }
        }
    }
    // 9 signed ops × 3 bins × 2 signs + 2 unsigned × 3 bins + 3 without magnitude, × 3 images
    assert_eq!(checked, (9 * 3 * 2 + 2 * 3 + 3) * 3);
}

#[test]
fn ops_on_known_images() {
    // a dark-to-bright ramp in every channel
    let ramp: Vec<u8> = (0..3 * 1024).map(|i| ((i % 1024) / 8) as u8 + 10).collect();
    assert_eq!(Op::Invert.apply(&ramp, 0.0)[0], 245);
    assert_eq!(
        Op::Posterize.apply(&[0b1011_0111; 3072], 4.0)[5],
        0b1011_0000
    );
    let sol = Op::Solarize.apply(&ramp, 100.0);
    assert_eq!((sol[0], sol[1023]), (10, 255 - 137));
    let ac = Op::AutoContrast.apply(&ramp, 0.0);
    assert_eq!((ac[0], ac[1023]), (0, 255));
    assert_eq!(Op::Brightness.apply(&ramp, -1.0), vec![0; 3072]);
    // translation by +5 pixels moves content right and fills zeros on the left
    let t = Op::TranslateX.apply(&ramp, 5.0);
    assert_eq!(&t[..5], &[0; 5]);
    assert_eq!(t[64 + 10], ramp[64 + 5]);
    // identity magnitudes leave the image unchanged
    for op in [
        Op::ShearX,
        Op::ShearY,
        Op::Rotate,
        Op::TranslateY,
        Op::Sharpness,
        Op::Color,
    ] {
        assert_eq!(op.apply(&ramp, 0.0), ramp, "{op:?}");
    }
}

#[test]
fn policy_is_seeded_and_exercises_every_sub_policy() {
    let img = bytes(&fixture(), "input.2");
    for op in Op::ALL {
        let m = op.magnitude(5).max(f32::MIN_POSITIVE);
        assert_ne!(op.apply(&img, m), img, "{op:?} is not the identity here");
    }
    assert_eq!(
        auto_augment(&img, &mut Rng::new(3)),
        auto_augment(&img, &mut Rng::new(3))
    );
    let mut rng = Rng::new(1);
    let n = 4000;
    let outs: Vec<Vec<u8>> = (0..n).map(|_| auto_augment(&img, &mut rng)).collect();
    let distinct: std::collections::HashSet<&Vec<u8>> = outs.iter().collect();
    assert!(
        distinct.len() > 50,
        "only {} distinct outputs",
        distinct.len()
    );
    // the chance that neither step of the drawn sub-policy fires
    let expected = CIFAR10_POLICY
        .iter()
        .map(|[(_, p1, _), (_, p2, _)]| (1.0 - p1) * (1.0 - p2))
        .sum::<f32>()
        / 25.0;
    let unchanged = outs.iter().filter(|o| **o == img).count() as f32 / n as f32;
    assert!(
        (unchanged - expected).abs() < 0.03,
        "unchanged {unchanged} vs expected {expected}"
    );
}
