//! The `ferrovit` binary: real runs on tiny settings and clear errors on bad input.

use std::process::Command;

fn ferrovit(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovit"))
        .args(args)
        .output()
        .expect("run ferrovit");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn presets_lists_exact_parameter_counts() {
    let (ok, out, _) = ferrovit(&["presets"]);
    assert!(ok);
    assert!(
        out.contains("vit_tiny_patch4_32") && out.contains("9532938"),
        "{out}"
    );
    assert!(
        out.contains("vit_lite_depth7_patch4_32") && out.contains("3722250"),
        "{out}"
    );
}

#[test]
fn train_runs_on_the_embedded_data() {
    let out_dir = std::env::temp_dir().join(format!("ferrovit-cli-out-{}", std::process::id()));
    let (ok, out, err) = ferrovit(&[
        "train",
        "--epochs",
        "2",
        "--dim",
        "32",
        "--depth",
        "1",
        "--mlp-dim",
        "32",
        "--augment",
        "crop-flip",
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("1437 train / 360 test") && out.contains("epoch   2/2"),
        "{out}"
    );
    assert!(
        out.contains("final test accuracy") && out.contains("confusion matrix"),
        "{out}"
    );
    let metrics = std::fs::read_to_string(out_dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<&str> = metrics.lines().collect();
    assert_eq!(lines.len(), 2, "{metrics}");
    for key in [
        "epoch",
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "lr",
        "images_per_s",
    ] {
        assert!(
            lines[1].contains(&format!("\"{key}\":")),
            "{key} missing: {}",
            lines[1]
        );
    }
    assert!(lines[1].starts_with("{\"epoch\":2,") && lines[1].ends_with('}'));
    std::fs::remove_dir_all(&out_dir).unwrap();
}

#[test]
fn bench_reports_images_per_second() {
    let (ok, out, err) = ferrovit(&[
        "bench",
        "--dim",
        "32",
        "--depth",
        "1",
        "--batch-size",
        "4",
        "--steps",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("images/s"), "{out}");
}

#[test]
fn bad_inputs_fail_with_one_clear_message() {
    let dir = std::env::temp_dir().join(format!("ferrovit-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("batches.meta.txt"), "a\nb\n").unwrap();
    std::fs::write(dir.join("data_batch_1.bin"), vec![0u8; 3073 + 5]).unwrap();
    let dir_s = dir.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["train", "--data", "/nonexistent/cifar"],
            "/nonexistent/cifar",
        ),
        (
            vec!["train", "--preset", "vit_giant"],
            "unknown preset `vit_giant`",
        ),
        (vec!["train", "--batch-size", "0"], "--batch-size"),
        (vec!["train", "--heads", "3"], "not divisible by heads 3"),
        (vec!["train", "--data", dir_s], "data_batch_1.bin"),
        (vec!["bench", "--threads", "0"], "--threads"),
        (vec!["train", "--augment", "mixup"], "mixup"),
    ];
    for (args, want) in cases {
        let (ok, out, err) = ferrovit(&args);
        assert!(!ok, "{args:?} should fail");
        assert!(
            err.starts_with("error: ") && err.contains(want),
            "{args:?}: {err}"
        );
        assert!(!out.contains("epoch"), "{args:?} printed results: {out}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
