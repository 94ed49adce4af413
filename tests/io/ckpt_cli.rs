//! `ferrovit ckpt …` on a checkpoint written by `ferrovit train`, and the checkpoint
//! read by Python's `safetensors` (scripts/check_checkpoint.py).

use crate::common::{edit_index, ferrovit, mkfifo, temp_dir, TINY};
use std::path::Path;
use std::process::Command;

/// Trains one epoch of a small model (32 parameter tensors, 2.6 MB of weights and
/// optimizer state in 1 MiB shards) into `out`; returns the checkpoint directory.
fn train_one_epoch(out: &Path) -> std::path::PathBuf {
    let (ok, _, err) = ferrovit(&[
        "train",
        "--epochs",
        "1",
        "--dim",
        "128",
        "--depth",
        "2",
        "--mlp-dim",
        "128",
        "--shard-size-mb",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    ferrovit::checkpoint::newest(&out.join("checkpoints"))
        .unwrap()
        .unwrap()
}

#[test]
fn inspect_verify_list_export_import() {
    let out = temp_dir("ckpt-cli");
    let dir = train_one_epoch(&out);
    let d = dir.to_str().unwrap();
    let root = out.join("checkpoints");

    let (ok, text, err) = ferrovit(&["ckpt", "inspect", root.to_str().unwrap()]);
    assert!(ok, "{err}");
    for want in [
        "version 2",
        "dim 128 depth 2",
        "1 epochs + 0 batches done, step 23",
        "exp_avg_sq.head.weight",
        "AdamW",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let (ok, text, _) = ferrovit(&["ckpt", "verify", d]);
    assert!(
        ok && text.starts_with("ok: 96 tensors") && !text.contains(" in 1 shard"),
        "{text}"
    );
    let (ok, text, _) = ferrovit(&["ckpt", "list", root.to_str().unwrap()]);
    assert!(ok && text.contains("step-0000000023  (latest)"), "{text}");

    // export, then import under other names mapped back
    let st = out.join("model.safetensors");
    let (ok, text, err) = ferrovit(&["ckpt", "export", d, "--safetensors", st.to_str().unwrap()]);
    assert!(ok && text.contains("wrote 32 model tensors"), "{err}");
    let renamed = out.join("renamed.safetensors");
    let tensors =
        ferrovit::checkpoint::read_safetensors(&st, &[("blocks.".into(), "encoder.layer.".into())])
            .unwrap();
    write_safetensors(&renamed, &tensors);
    let imported = out.join("imported");
    let base = [
        "ckpt",
        "import",
        renamed.to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
        "--preset",
        "vit_tiny_patch4_32",
    ];
    let (ok, _, err) = ferrovit(&base);
    assert!(
        !ok && err.contains("encoder.layer.0") && err.contains("--map"),
        "{err}"
    );
    let (ok, _, err) = ferrovit(&[&base[..], &["--map", "encoder.layer.=blocks."]].concat());
    assert!(
        !ok && err.contains("not preset vit_tiny_patch4_32's"),
        "a tiny model is not the preset: {err}"
    );

    // a full preset imports, renamed back, and loads strictly into that model
    let cfg = ferrovit::VitConfig::preset("vit_lite_depth7_patch4_32").unwrap();
    let engine = ferrovit::engine::Engine::new(&cfg, Default::default()).unwrap();
    let lite: Vec<(String, ferrovit::Tensor)> = engine
        .params()
        .named_parameters()
        .map(|(n, t)| (n.replace("blocks.", "encoder.layer."), t.clone()))
        .collect();
    write_safetensors(&renamed, &lite);
    let (ok, text, err) = ferrovit(&[
        "ckpt",
        "import",
        renamed.to_str().unwrap(),
        "--out",
        imported.to_str().unwrap(),
        "--map",
        "encoder.layer.=blocks.",
    ]);
    assert!(ok && text.contains("imported 92 tensors"), "{err}");
    assert!(
        text.contains("4 heads from preset vit_lite_depth7_patch4_32"),
        "{text}"
    );
    let mut other = ferrovit::engine::Engine::new(
        &cfg,
        ferrovit::engine::TrainConfig {
            seed: 5,
            ..Default::default()
        },
    )
    .unwrap();
    let weights_only = ferrovit::checkpoint::LoadOptions {
        strict: true,
        optimizer: false,
    };
    other
        .load_checkpoint(&imported.join("step-0000000000"), weights_only)
        .unwrap();
    for (a, b) in engine.params().iter().zip(other.params().iter()) {
        assert_eq!(a.value.to_vec_f32(), b.value.to_vec_f32(), "{}", a.name);
    }

    // a truncated shard: verify fails with the file named and a non-zero exit
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let (ok, _, err) = ferrovit(&["ckpt", "verify", d]);
    assert!(
        !ok && err.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{err}"
    );
    let (ok, _, err) = ferrovit(&["ckpt", "verify", "/nonexistent/ckpt"]);
    assert!(!ok && err.contains("does not exist"), "{err}");
    // a named pipe given as a checkpoint: said so, also to a resume
    let pipe = out.join("pipe");
    mkfifo(&pipe);
    let p = pipe.to_str().unwrap();
    let (ok, _, err) = ferrovit(&["ckpt", "verify", p]);
    assert!(
        !ok && err.to_lowercase().contains("pipe: not a directory"),
        "{err}"
    );
    let fresh = out.join("fresh");
    let (ok, _, err) = ferrovit(&["train", "--resume", p, "--out", fresh.to_str().unwrap()]);
    assert!(!ok && err.contains("pipe: not a directory"), "{err}");
    assert!(!fresh.exists());
    std::fs::remove_dir_all(out).unwrap();
}

/// A checkpoint's `ckpt` outputs with `--json`, parsed: the index's values, names from
/// the file JSON-escaped, a failed verify as `ok: false` with a failing exit.
#[test]
fn ckpt_json_outputs_carry_the_checkpoint() {
    let out = temp_dir("ckpt-json");
    let o = out.to_str().unwrap();
    let (ok, _, err) = ferrovit(&[&["train", "--epochs", "1", "--out", o][..], &TINY].concat());
    assert!(ok, "{err}");
    let root = out.join("checkpoints");
    let dir = ferrovit::checkpoint::newest(&root).unwrap().unwrap();
    // class names a crafted file could hold: control characters, quotes, a newline
    let hostile = "7\u{1b}[31m \"red\"\nline";
    edit_index(&dir, |v| {
        let mut classes: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        classes[7] = hostile.into();
        v["training"]["classes"] = serde_json::json!(classes);
    });
    let json = |args: &[&str]| -> (bool, serde_json::Value) {
        let (ok, text, err) = ferrovit(args);
        let v = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}\n{err}"));
        (ok, v)
    };
    let d = dir.to_str().unwrap();
    let (ok, v) = json(&["ckpt", "inspect", root.to_str().unwrap(), "--json"]);
    assert!(ok);
    assert_eq!(v["checkpoint"], d);
    assert_eq!(
        (v["format"].as_str(), v["version"].as_u64()),
        (Some("ferrovit-checkpoint"), Some(2))
    );
    let m = &v["model"];
    assert_eq!(
        (
            m["dim"].as_u64(),
            m["depth"].as_u64(),
            m["mlp_dim"].as_u64()
        ),
        (Some(32), Some(1), Some(32))
    );
    assert_eq!(
        m["dropout"].as_f64(),
        Some(0.1),
        "f32s in their shortest form"
    );
    assert_eq!(v["training"]["step"], 23);
    assert_eq!(v["training"]["classes"][7], hostile);
    assert_eq!(
        (v["layout"]["dp"].as_u64(), v["layout"]["pp"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(
        v["optimizer"]["AdamW"]["beta1"].as_f64().is_some(),
        "{}",
        v["optimizer"]
    );
    let tensors = v["tensors"].as_array().unwrap();
    let params: u64 = tensors
        .iter()
        .filter(|t| t["group"] == "model")
        .map(|t| {
            t["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_u64().unwrap())
                .product::<u64>()
        })
        .sum();
    assert_eq!(m["params"].as_u64(), Some(params));
    let head = tensors.iter().find(|t| t["name"] == "head.weight").unwrap();
    assert_eq!(head["shape"], serde_json::json!([10, 32]));
    assert_eq!(
        (head["dtype"].as_str(), head["bytes"].as_u64()),
        (Some("F32"), Some(10 * 32 * 4))
    );
    let bytes: u64 = tensors.iter().map(|t| t["bytes"].as_u64().unwrap()).sum();
    let shards: u64 = v["shards"]
        .as_object()
        .unwrap()
        .values()
        .map(|b| b.as_u64().unwrap())
        .sum();
    assert_eq!(bytes, shards);

    let (ok, r) = json(&["ckpt", "verify", d, "--json"]);
    assert!(ok, "{r}");
    assert_eq!(r["ok"], true);
    assert_eq!(r["tensors"].as_u64(), Some(tensors.len() as u64));
    assert_eq!(
        (r["bytes"].as_u64(), r["index_checksum"].as_bool()),
        (Some(bytes), Some(true))
    );

    // an interrupted save and a checkpoint-named directory without an index beside it,
    // then listed, then cleaned; a folder of the user's is neither listed nor removed
    std::fs::create_dir_all(root.join(".tmp-step-0000000099")).unwrap();
    std::fs::create_dir_all(root.join("step-0000000098")).unwrap();
    let notes = root.join("my-notes");
    std::fs::create_dir_all(&notes).unwrap();
    std::fs::write(notes.join("todo.txt"), "keep me").unwrap();
    let (ok, l) = json(&["ckpt", "list", root.to_str().unwrap(), "--json"]);
    assert!(ok);
    assert_eq!(
        l["committed"],
        serde_json::json!([{"path": d, "latest": true, "best": false}])
    );
    let uncommitted = l["uncommitted"].as_array().unwrap();
    assert_eq!(uncommitted.len(), 2, "{l}");
    assert_eq!(uncommitted[0]["removed"], false);
    let (ok, l) = json(&["ckpt", "list", root.to_str().unwrap(), "--clean", "--json"]);
    assert!(ok && l["uncommitted"][0]["removed"] == true, "{l}");
    for u in l["uncommitted"].as_array().unwrap() {
        assert!(!Path::new(u["path"].as_str().unwrap()).exists(), "{u}");
    }
    assert!(
        notes.join("todo.txt").is_file(),
        "--clean removed a user's folder"
    );
    assert!(dir.join("index.json").is_file());
    // the folder above the checkpoints (a run's): nothing listed or removed, a hint;
    // a missing root: an error naming it
    let above = root.parent().unwrap();
    let (ok, said, err) = ferrovit(&["ckpt", "list", above.to_str().unwrap(), "--clean"]);
    assert!(ok && said.contains("a run keeps them in"), "{said}{err}");
    assert!(
        !said.contains("removed") && !said.contains("committed"),
        "{said}"
    );
    assert!(dir.join("index.json").is_file() && notes.is_dir());
    let missing = root.join("no-such-root");
    let (ok, _, err) = ferrovit(&["ckpt", "list", missing.to_str().unwrap()]);
    assert!(
        !ok && err.contains("no-such-root") && err.contains("not a directory"),
        "{err}"
    );

    // a truncated shard: ok false, the file named, a failing exit
    let shard = dir.join(v["tensors"][0]["files"][0].as_str().unwrap());
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let (ok, r) = json(&["ckpt", "verify", d, "--json"]);
    assert!(!ok && r["ok"] == false, "{r}");
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains(shard.file_name().unwrap().to_str().unwrap()),
        "{r}"
    );
    std::fs::remove_dir_all(out).unwrap();
}

pub(crate) fn write_safetensors(path: &Path, tensors: &[(String, ferrovit::Tensor)]) {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.to_le_bytes(), t.dims().to_vec()))
        .collect::<Vec<_>>()
        .leak()
        .iter()
        .map(|(n, b, s)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn python_safetensors_reads_every_shard_and_the_export() {
    let have = Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var("FERROVIT_REQUIRE_PYTHON").is_err(),
            "FERROVIT_REQUIRE_PYTHON is set but python3 with safetensors and numpy is missing"
        );
        eprintln!(
            "SKIPPED: python3 with safetensors and numpy not found (pip install safetensors numpy)"
        );
        return;
    }
    let out = temp_dir("interop");
    let dir = train_one_epoch(&out);
    let st = out.join("model.safetensors");
    let (ok, _, err) = ferrovit(&[
        "ckpt",
        "export",
        dir.to_str().unwrap(),
        "--safetensors",
        st.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check_checkpoint.py");
    let res = Command::new("python3")
        .args([
            script,
            dir.to_str().unwrap(),
            "--export",
            st.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        text.contains("ok: 96 tensors in 3 shards")
            && text.contains("32 model tensors with equal values"),
        "{text}"
    );
    std::fs::remove_dir_all(out).unwrap();
}

/// `ckpt export` writes by renaming a finished file over its target: a target that is
/// not a file (a link, a directory, a named pipe) or that lies inside the checkpoint it
/// reads is refused, named, and left as it was.
#[test]
fn export_refuses_a_target_it_would_replace() {
    let out = temp_dir("ckpt-export-target");
    let dir = train_one_epoch(&out);
    let d = dir.to_str().unwrap();
    let (pipe, link, folder) = (out.join("pipe"), out.join("link"), out.join("folder"));
    mkfifo(&pipe);
    std::os::unix::fs::symlink(out.join("elsewhere"), &link).unwrap();
    std::fs::create_dir(&folder).unwrap();
    let shard = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    for (target, says) in [
        (&pipe, "named pipe"),
        (&link, "symbolic link"),
        (&folder, "a directory"),
        (&shard, "inside the checkpoint"),
        (&dir.join("index.json"), "inside the checkpoint"),
        (&dir.join("new.safetensors"), "inside the checkpoint"),
    ] {
        let t = target.to_str().unwrap();
        let (ok, _, err) = ferrovit(&["ckpt", "export", "--safetensors", t, d]);
        assert!(
            !ok && err.contains(says)
                && err.contains(target.file_name().unwrap().to_str().unwrap()),
            "{t}: {err}"
        );
    }
    use std::os::unix::fs::FileTypeExt;
    assert!(std::fs::symlink_metadata(&pipe)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(folder.is_dir() && !dir.join("new.safetensors").exists());
    let (ok, said, err) = ferrovit(&["ckpt", "verify", d]);
    assert!(ok && said.starts_with("ok:"), "{said}{err}");
    std::fs::remove_dir_all(out).unwrap();
}
