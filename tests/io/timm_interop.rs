//! timm `VisionTransformer`s in and out (tests/fixtures/timm, written by
//! scripts/make_timm_fixture.py): `ckpt import` reads the architecture from the tensor
//! shapes and `infer` then gives timm's probabilities; `ckpt export` writes a state dict
//! timm loads with strict=True: its names and shapes are timm's (strict_keys.json,
//! always), and timm loads it and gives ferrovit's probabilities (where python3 has
//! timm; skipped otherwise, as in CI); a bad file or flag is a one-line error naming the
//! tensor or flag.

use crate::ckpt_cli::write_safetensors;
use crate::common::{ferrovit, temp_dir};
use ferrovit::checkpoint::read_safetensors;
use ferrovit::Tensor;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/timm");
const IMAGENET: [&str; 4] = ["--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"];

/// A fixture model: its name, heads and classes.
const MODELS: [(&str, &str, usize); 2] = [
    ("vit_d64_l2_h4_p4_s32_c10", "4", 10),
    ("vit_d48_l2_h3_p8_s48_c7", "3", 7),
];

fn fixture(name: &str) -> PathBuf {
    Path::new(FIXTURES).join(name)
}

fn images(model: &str) -> Vec<String> {
    (0..3)
        .map(|i| fixture(&format!("{model}-{i}.png")).display().to_string())
        .collect()
}

/// `ferrovit ckpt import` of `file` into `out` with `args`; (ok, stdout, stderr).
fn import(file: &Path, out: &Path, args: &[&str]) -> (bool, String, String) {
    let base = [
        "ckpt",
        "import",
        file.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    ferrovit(&[&base[..], args].concat())
}

/// `ferrovit infer --json` on `images`: every class's probability, by class index.
fn infer(ckpt: &Path, classes: usize, images: &[String]) -> Vec<Vec<f32>> {
    let k = classes.to_string();
    let base = [
        "infer",
        "--json",
        "--top-k",
        &k,
        "--ckpt",
        ckpt.to_str().unwrap(),
    ];
    let args: Vec<&str> = base
        .iter()
        .copied()
        .chain(images.iter().map(|s| s.as_str()))
        .collect();
    let (ok, text, err) = ferrovit(&args);
    assert!(ok, "{err}");
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let per_image = json.as_array().unwrap();
    per_image
        .iter()
        .map(|img| {
            let mut p = vec![f32::NAN; classes];
            for s in img["top"].as_array().unwrap() {
                p[s["index"].as_u64().unwrap() as usize] =
                    s["probability"].as_f64().unwrap() as f32;
            }
            p
        })
        .collect()
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "{what}: {g:?} vs timm's {w:?}");
    }
}

#[test]
fn timm_vits_import_and_infer_gives_timms_probabilities() {
    let out = temp_dir("timm-import");
    for (model, heads, classes) in MODELS {
        let dest = out.join(model);
        let file = fixture(&format!("{model}.safetensors"));
        let (ok, text, err) = import(&file, &dest, &[&["--heads", heads][..], &IMAGENET].concat());
        assert!(ok, "{model}: {err}");
        assert!(text.contains(&format!("heads {heads} ")), "{text}");
        let probs = read_safetensors(&fixture(&format!("{model}-probs.safetensors")), &[]).unwrap();
        let want: Vec<Vec<f32>> = probs[0]
            .1
            .to_vec_f32()
            .chunks(classes)
            .map(|c| c.to_vec())
            .collect();
        assert_close(&infer(&dest, classes, &images(model)), &want, model);
    }
    // the size and patch came from the shapes: 48 × 48 images in 8 × 8 patches
    let (ok, text, err) = ferrovit(&["ckpt", "inspect", out.join(MODELS[1].0).to_str().unwrap()]);
    assert!(ok && text.contains("dim 48 depth 2"), "{text}{err}");
    std::fs::remove_dir_all(out).unwrap();
}

#[test]
fn exports_load_in_timm_strictly_with_ferrovits_probabilities() {
    let out = temp_dir("timm-export");
    let (model, heads, _) = MODELS[1];
    let dest = out.join("five");
    // a fresh 5-class head: weights timm never had
    let args = [
        &["--heads", heads, "--num-classes", "5", "--seed", "3"][..],
        &IMAGENET,
    ]
    .concat();
    let (ok, text, err) = import(&fixture(&format!("{model}.safetensors")), &dest, &args);
    assert!(
        ok && text.contains("a fresh 5-class head (seed 3)"),
        "{text}{err}"
    );
    let st = out.join("export.safetensors");
    let (ok, text, err) = ferrovit(&[
        "ckpt",
        "export",
        dest.to_str().unwrap(),
        "--safetensors",
        st.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let call = text
        .lines()
        .find_map(|l| l.strip_prefix("timm: "))
        .and_then(|l| l.strip_suffix(".load_state_dict(..., strict=True)"))
        .unwrap_or_else(|| panic!("no timm call: {text}"));
    assert_eq!(
        call,
        "timm.models.vision_transformer.VisionTransformer(img_size=48, patch_size=8, in_chans=3, embed_dim=48, depth=2, num_heads=3, mlp_ratio=2.0, num_classes=5)"
    );
    assert_strict_keys(call, &st);
    let ferrovit_probs = infer(&dest, 5, &images(model));
    let has_timm = Command::new("python3")
        .args(["-c", "import timm, torch, PIL, safetensors"])
        .status()
        .is_ok_and(|s| s.success());
    if !has_timm {
        eprintln!("SKIPPED: the timm check of the export (python3 with timm, torch, pillow and safetensors not found)");
        std::fs::remove_dir_all(out).unwrap();
        return;
    }
    let ckpt = ferrovit::checkpoint::newest(&dest).unwrap().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_timm_export.py");
    let res = Command::new("python3")
        .args([
            script,
            "--call",
            call,
            "--weights",
            st.to_str().unwrap(),
            "--ckpt",
            ckpt.to_str().unwrap(),
        ])
        .args(images(model))
        .output()
        .unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let timm_probs: Vec<Vec<f32>> = serde_json::from_slice(&res.stdout).unwrap();
    assert_close(&ferrovit_probs, &timm_probs, "ferrovit's export in timm");
    std::fs::remove_dir_all(out).unwrap();
}

/// The export's tensor names and shapes are exactly those of the state dict of timm's
/// model `call` (strict_keys.json, written by timm): what `strict=True` checks, here
/// without torch.
fn assert_strict_keys(call: &str, export: &Path) {
    let text = std::fs::read_to_string(fixture("strict_keys.json")).unwrap();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    let want: BTreeMap<String, Vec<usize>> = serde_json::from_value(
        all.get(call)
            .unwrap_or_else(|| panic!("strict_keys.json has no {call}"))
            .clone(),
    )
    .unwrap();
    let got: BTreeMap<String, Vec<usize>> = read_safetensors(export, &[])
        .unwrap()
        .into_iter()
        .map(|(name, t)| (name, t.dims().to_vec()))
        .collect();
    assert_eq!(got, want, "the export's tensors against timm's state dict");
}

fn zeros(dims: &[usize]) -> Tensor {
    Tensor::from_vec(vec![0.0; dims.iter().product()], dims).unwrap()
}

/// The first fixture model's tensors, changed by `edit`, written to `dir/name`.
fn edited(dir: &Path, name: &str, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) -> PathBuf {
    let mut t = read_safetensors(&fixture(&format!("{}.safetensors", MODELS[0].0)), &[]).unwrap();
    edit(&mut t);
    let path = dir.join(name);
    write_safetensors(&path, &t);
    path
}

/// Import of `file` with `args` fails with one line containing every one of `want`.
fn refused(file: &Path, out: &Path, args: &[&str], want: &[&str]) {
    let (ok, _, err) = import(file, out, args);
    assert!(!ok, "{args:?} was accepted");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for w in want {
        assert!(err.contains(w), "{w}: {err}");
    }
}

#[test]
fn bad_timm_imports_are_one_line_errors_naming_the_tensor_or_flag() {
    let dir = temp_dir("timm-bad");
    let out = dir.join("out");
    let h4 = ["--heads", "4"];
    let good = fixture(&format!("{}.safetensors", MODELS[0].0));
    refused(
        &good,
        &out,
        &[],
        &[
            "--heads is required",
            "dim 64, depth 2, MLP width 128, patch 4, image 32",
        ],
    );
    refused(&good, &out, &["--heads", "3"], &["--heads 3", "dim 64"]);
    refused(
        &good,
        &out,
        &["--preset", "vit_tiny_patch4_32"],
        &["not preset vit_tiny_patch4_32's"],
    );

    let missing = edited(&dir, "missing.safetensors", |t| {
        t.retain(|(n, _)| n != "blocks.1.attn.qkv.bias")
    });
    refused(
        &missing,
        &out,
        &h4,
        &["`blocks.1.attn.qkv.bias` is missing", "qkv_bias=False"],
    );
    let shape = edited(&dir, "shape.safetensors", |t| {
        let fc2 = t
            .iter_mut()
            .find(|(n, _)| n == "blocks.1.mlp.fc2.weight")
            .unwrap();
        fc2.1 = zeros(&[64, 96]);
    });
    refused(
        &shape,
        &out,
        &h4,
        &["`blocks.1.mlp.fc2.weight` has shape [64, 96]", "[64, 128]"],
    );
    let unknown = edited(&dir, "unknown.safetensors", |t| {
        t.push(("dist_token".into(), zeros(&[1, 1, 64])))
    });
    refused(&unknown, &out, &h4, &["`dist_token`", "--ignore"]);
    let kept = dir.join("kept");
    let (ok, text, err) = import(&unknown, &kept, &[&h4[..], &["--ignore", "dist_"]].concat());
    assert!(ok && text.contains("1 tensors left out"), "{text}{err}");

    // timm features ferrovit's ViT lacks, named by the tensor that shows them
    let ls = edited(&dir, "ls.safetensors", |t| {
        t.push(("blocks.0.ls1.gamma".into(), zeros(&[64])))
    });
    refused(&ls, &out, &h4, &["`blocks.0.ls1.gamma`", "layer scale"]);
    let fc_norm = edited(&dir, "avg.safetensors", |t| {
        for (n, _) in t.iter_mut().filter(|(n, _)| n.starts_with("norm.")) {
            *n = n.replace("norm.", "fc_norm.");
        }
    });
    refused(&fc_norm, &out, &h4, &["`fc_norm.", "global_pool='avg'"]);
    let no_cls = edited(&dir, "nocls.safetensors", |t| {
        t.retain(|(n, _)| n != "cls_token");
        let pos = t.iter_mut().find(|(n, _)| n == "pos_embed").unwrap();
        pos.1 = zeros(&[1, 64, 64]);
    });
    refused(&no_cls, &out, &h4, &["`cls_token`", "class_token=False"]);
    let no_embed_class = edited(&dir, "nec.safetensors", |t| {
        let pos = t.iter_mut().find(|(n, _)| n == "pos_embed").unwrap();
        pos.1 = zeros(&[1, 64, 64]);
    });
    refused(
        &no_embed_class,
        &out,
        &h4,
        &["`pos_embed` has 64 positions", "no_embed_class"],
    );
    assert!(!out.exists(), "a refused import wrote nothing");
    std::fs::remove_dir_all(dir).unwrap();
}
