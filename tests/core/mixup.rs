//! Mixup/CutMix against timm (tests/fixtures/mixup_timm.json, written by
//! scripts/make_mixup_fixture.py): timm's draws replayed through `MixDraws` give the
//! same lambda, box, mixed images and soft targets; the soft-target loss equals
//! PyTorch's `F.cross_entropy(logits, targets)` with its gradient; the loader mixes a
//! global batch alike under any data-parallel split.

use ferrovit::autograd::{Graph, ParamStore};
use ferrovit::data::mixup::{soft_targets, Mix, MixBox, MixDraws, Mixup};
use ferrovit::data::{default_data_dir, Dataset, Loader, RawImages, RawMix, Sampler};
use ferrovit::rng::Rng;
use ferrovit::{DType, Device, Tensor};
use serde_json::Value;
use std::sync::Arc;

fn fixture() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mixup_timm.json"
    ))
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

/// timm's recorded draws, handed out in order; each request must be the one timm made.
struct Replay<'a> {
    draws: &'a [Value],
    next: usize,
}

impl Replay<'_> {
    fn take(&mut self, kind: &str) -> &Value {
        let d = self
            .draws
            .get(self.next)
            .unwrap_or_else(|| panic!("asked for a {kind} after timm's last draw"));
        assert_eq!(d["kind"], kind, "draw {} differs from timm's", self.next);
        self.next += 1;
        d
    }
}

impl MixDraws for Replay<'_> {
    fn rand(&mut self) -> f64 {
        self.take("rand")["value"].as_f64().unwrap()
    }

    fn beta(&mut self, alpha: f64) -> f64 {
        let d = self.take("beta");
        assert!((d["alpha"].as_f64().unwrap() - alpha).abs() < 1e-12);
        d["value"].as_f64().unwrap()
    }

    fn randint(&mut self, lo: i64, hi: i64) -> i64 {
        let d = self.take("randint");
        assert_eq!((d["lo"].as_i64(), d["hi"].as_i64()), (Some(lo), Some(hi)));
        d["value"].as_i64().unwrap()
    }
}

fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: got {g}, timm {w}");
    }
}

#[test]
fn mixing_matches_timm_for_the_same_draws() {
    let doc = fixture();
    let cases = doc["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 6);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let num = |k: &str| case[k].as_f64().unwrap();
        let mixup = Mixup {
            mixup_alpha: num("mixup_alpha"),
            cutmix_alpha: num("cutmix_alpha"),
            prob: num("prob"),
            switch_prob: num("switch_prob"),
        };
        let (b, side, classes) = (num("batch") as usize, num("side") as usize, num("classes"));
        let draws = case["draws"].as_array().unwrap();
        let mut replay = Replay { draws, next: 0 };
        let mix = mixup.draw(side, &mut replay);
        assert_eq!(replay.next, draws.len(), "{name}: every timm draw used");
        let mut images = f32s(&case["x"]);
        let row = images.len() / b;
        let partners: Vec<f32> = images.chunks(row).rev().flatten().copied().collect();
        let labels = usizes(&case["labels"]);
        let flipped: Vec<usize> = labels.iter().rev().copied().collect();
        let lam = match &mix {
            Some(m) => {
                m.apply(&mut images, &partners, side);
                m.lam
            }
            None => 1.0,
        };
        assert!((lam - num("lam")).abs() < 1e-12, "{name}: lambda {lam}");
        close(name, &images, &f32s(&case["mixed"]), 1e-6);
        let t = soft_targets(&labels, &flipped, lam, classes as usize, num("smoothing"));
        close(name, &t, &f32s(&case["targets"]), 1e-6);
        if name == "not applied" {
            assert!(mix.is_none());
        }
    }
}

/// Each loss case of the fixture: (name, logits, targets, torch's loss, torch's grad).
fn loss_cases() -> Vec<(String, Tensor, Tensor, f32, Vec<f32>)> {
    let doc = fixture();
    let cases = doc["losses"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    cases
        .iter()
        .map(|case| {
            let dims = [
                case["rows"].as_u64().unwrap() as usize,
                case["classes"].as_u64().unwrap() as usize,
            ];
            (
                case["name"].as_str().unwrap().to_string(),
                Tensor::from_vec(f32s(&case["logits"]), dims).unwrap(),
                Tensor::from_vec(f32s(&case["targets"]), dims).unwrap(),
                case["loss"].as_f64().unwrap() as f32,
                f32s(&case["grad"]),
            )
        })
        .collect()
}

fn loss_close(name: &str, got: f32, want: f32) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{name}: loss {got}, torch {want}"
    );
}

/// The graph's soft-target cross-entropy, forward and backward, against PyTorch's.
#[test]
fn soft_target_loss_matches_torch() {
    for (name, logits, targets, want, want_grad) in loss_cases() {
        let mut store = ParamStore::new();
        let mut g = Graph::new(&mut store);
        let z = g.input_with_grad(logits);
        let loss = g.cross_entropy_soft(z, &targets).unwrap();
        loss_close(&name, g.value(loss).f32s().unwrap()[0], want);
        g.backward(loss).unwrap();
        close(&name, g.grad(z).unwrap().f32s().unwrap(), &want_grad, 1e-6);
    }
}

/// The emulated CUDA kernel's loss and gradient against PyTorch's.
#[test]
fn soft_target_loss_matches_torch_on_emulated_cuda() {
    let device = Device::cuda_emulated();
    let be = ferrovit::backend::for_device(device);
    for (name, logits, targets, want, want_grad) in loss_cases() {
        let z = logits.to_device(device).unwrap();
        let t = targets.to_device(device).unwrap();
        let mut dz = Tensor::zeros(logits.dims(), device);
        let got = be.cross_entropy_soft(&z, &t, &mut dz).unwrap();
        loss_close(&name, got, want);
        let dz = dz.to_device(Device::Cpu).unwrap();
        close(&name, dz.f32s().unwrap(), &want_grad, 1e-6);
    }
}

#[test]
fn beta_draws_have_the_beta_distributions_moments() {
    for alpha in [0.2, 0.8, 1.0, 3.0] {
        let mut rng = Rng::new(5);
        let n = 40_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.beta(alpha)).collect();
        assert!(xs.iter().all(|x| (0.0..=1.0).contains(x)));
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        let want_var = 1.0 / (4.0 * (2.0 * alpha + 1.0));
        assert!((mean - 0.5).abs() < 0.01, "Beta({alpha}) mean {mean}");
        assert!(
            (var / want_var - 1.0).abs() < 0.05,
            "Beta({alpha}) var {var} vs {want_var}"
        );
    }
}

fn digits_loader(mixup: Option<Mixup>) -> Loader {
    let (train, _) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let n = train.len();
    let mut l = Loader::new(Arc::new(train), Sampler::new(n, true, 3), 10).unwrap();
    l.mixup = mixup;
    l.augment = "crop,flip".parse().unwrap();
    l
}

/// Under data parallelism each replica mixes its share with the reversed GLOBAL batch
/// (partners from other replicas' shares): the shares put together are the whole
/// batch as one loader mixes it, for Mixup and CutMix; and mixing changes the images.
#[test]
fn replicas_shares_mix_as_the_whole_batch() {
    let mixup = Mixup {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
    };
    let whole: Vec<_> = digits_loader(Some(mixup))
        .epoch(1)
        .take(6)
        .map(Result::unwrap)
        .collect();
    let plain: Vec<_> = digits_loader(None)
        .epoch(1)
        .take(6)
        .map(Result::unwrap)
        .collect();
    let (mut cutmix, mut blend) = (0, 0);
    for (w, p) in whole.iter().zip(&plain) {
        let m = w.mix.as_ref().expect("prob 1 mixes every batch");
        assert_ne!(w.images.f32s().unwrap(), p.images.f32s().unwrap());
        assert_eq!(
            m.partners,
            p.labels.iter().rev().copied().collect::<Vec<_>>()
        );
        match m.mix.cutmix {
            Some(_) => cutmix += 1,
            None => blend += 1,
        }
    }
    assert!(
        cutmix > 0 && blend > 0,
        "both kinds drawn: {cutmix} CutMix, {blend} Mixup"
    );
    for replicas in [2, 3] {
        let shares: Vec<Vec<_>> = (0..replicas)
            .map(|r| {
                let l = digits_loader(Some(mixup)).shard(r, replicas).unwrap();
                l.epoch(1).take(6).map(Result::unwrap).collect()
            })
            .collect();
        for (k, w) in whole.iter().enumerate() {
            let (mut images, mut labels, mut partners) = (vec![], vec![], vec![]);
            for s in &shares {
                let b = &s[k];
                images.extend_from_slice(b.images.f32s().unwrap());
                labels.extend_from_slice(&b.labels);
                partners.extend_from_slice(&b.mix.as_ref().unwrap().partners);
                assert_eq!(b.mix.as_ref().unwrap().mix, w.mix.as_ref().unwrap().mix);
            }
            assert_eq!(images, w.images.f32s().unwrap(), "batch {k}, dp {replicas}");
            assert_eq!(labels, w.labels);
            assert_eq!(partners, w.mix.as_ref().unwrap().partners);
        }
    }
}

/// A loader that leaves augmentation to the device leaves it the mixing too: the raw
/// batches (with each image's partner, appended where it lies in another replica's
/// share) give the CPU loader's mixed images, through the reference and through the
/// CPU backend's augment op, whole and under data parallelism, in f32 and bf16.
#[test]
fn device_augmentation_mixes_as_the_cpu_loader() {
    let mixup = Mixup {
        mixup_alpha: 0.8,
        cutmix_alpha: 1.0,
        prob: 1.0,
        switch_prob: 0.5,
    };
    let cpu = ferrovit::backend::for_device(Device::Cpu);
    for replicas in [1, 3] {
        let host = digits_loader(Some(mixup))
            .shard(1 % replicas, replicas)
            .unwrap();
        let mut device = host.clone();
        device.device_augment = true;
        for (h, d) in host.epoch(2).zip(device.epoch(2)).take(6) {
            let (h, d) = (h.unwrap(), d.unwrap());
            let raw = d.raw.as_ref().expect("raw pixels");
            assert_eq!(d.mix, h.mix);
            assert_eq!(raw.mix.as_ref().unwrap().mix, h.mix.as_ref().unwrap().mix);
            let want = h.images.f32s().unwrap();
            assert_eq!(raw.to_images().unwrap().f32s().unwrap(), want);
            for dtype in [DType::F32, DType::BF16] {
                let got = cpu.augment(&raw.batch(), dtype).unwrap();
                let want = h.images.to_dtype(dtype);
                assert_eq!(got.to_vec_f32(), want.to_vec_f32(), "dp {replicas} {dtype}");
            }
            // a pipeline's micro-batch carries its rows' partners
            let tail = raw.rows(3..h.labels.len());
            let row = 3 * 32 * 32;
            assert_eq!(
                tail.to_images().unwrap().f32s().unwrap(),
                &want[3 * row..],
                "dp {replicas}"
            );
        }
    }
}

/// The augment op refuses a partner past the images, a lambda outside [0, 1] and a
/// CutMix box outside the image, naming the value, on the CPU and in the reference.
#[test]
fn the_augment_op_refuses_a_bad_mix() {
    let (train, _) = Dataset::cifar_dir(&default_data_dir()).unwrap();
    let (raw, _) = train.raw_batch(&[0, 1], None).unwrap();
    let cpu = ferrovit::backend::for_device(Device::Cpu);
    let lam = |lam| Mix { lam, cutmix: None };
    let boxed = |y1| Mix {
        lam: 0.5,
        cutmix: Some(MixBox {
            y0: 0,
            y1,
            x0: 0,
            x1: 4,
        }),
    };
    for (mix, partner, what) in [
        (lam(0.5), vec![1, 2], "partner 2"),
        (lam(1.5), vec![1, 0], "lambda 1.5"),
        (boxed(33), vec![1, 0], "rows 0..33"),
        (lam(0.5), vec![1, 0, 1], "3 partners"),
    ] {
        let bad = RawImages {
            mix: Some(RawMix { mix, partner }),
            ..raw.clone()
        };
        let err = cpu
            .augment(&bad.batch(), DType::F32)
            .unwrap_err()
            .to_string();
        assert!(err.contains(what), "{err}");
        let err = bad.to_images().unwrap_err().to_string();
        assert!(err.contains(what), "{err}");
    }
}
