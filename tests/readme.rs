//! The README cannot rot: every line of its tour runs as written (the examples with
//! `--tiny`), and its command-line synopsis lists exactly the flags each subcommand's
//! `--help` shows.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// The lines of the code block between `<!-- tour -->` and `<!-- /tour -->`.
fn tour() -> Vec<String> {
    let text = readme();
    let start = text.find("<!-- tour -->").expect("tour start marker");
    let end = text.find("<!-- /tour -->").expect("tour end marker");
    text[start..end]
        .lines()
        .filter(|l| !l.starts_with("```") && !l.starts_with("<!--") && !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn python_with_safetensors() -> bool {
    Command::new("python3")
        .args(["-c", "import safetensors, numpy"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_tour_runs_as_written() {
    // a scratch copy of the repository root: the data and examples, nothing else
    let dir = std::env::temp_dir().join(format!("ferrovit-test-tour-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for name in ["data", "examples"] {
        std::os::unix::fs::symlink(repo().join(name), dir.join(name)).unwrap();
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_ferrovit"));
    let lines = tour();
    assert!(lines.len() >= 8, "{lines:?}");
    for line in &lines {
        let words: Vec<&str> = line.split_whitespace().collect();
        let mut cmd = match words.as_slice() {
            ["ferrovit", args @ ..] => {
                let mut c = Command::new(&bin);
                c.args(args);
                c
            }
            ["cargo", "run", "--release", "--example", name] => {
                let exe = bin.parent().unwrap().join("examples").join(name);
                let mut c = Command::new(exe);
                c.arg("--tiny").arg(dir.join("out").join(name));
                c
            }
            ["python3", args @ ..] => {
                if !python_with_safetensors() {
                    assert!(
                        std::env::var_os("FERROVIT_REQUIRE_PYTHON").is_none(),
                        "FERROVIT_REQUIRE_PYTHON is set but python3 with safetensors and numpy is missing"
                    );
                    eprintln!("skipped `{line}`: no python3 with safetensors and numpy");
                    continue;
                }
                let mut c = Command::new("python3");
                c.args(args);
                c
            }
            _ => panic!("the test does not know how to run `{line}`"),
        };
        let out = cmd.current_dir(&dir).output().unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(out.status.success(), "`{line}` failed:\n{stdout}\n{stderr}");
        if words[..2] == ["ferrovit", "infer"] {
            assert_eq!(stdout.lines().count(), 2, "one line per image: {stdout}");
        }
        if words[..2] == ["ferrovit", "eval"] {
            assert!(stdout.contains("accuracy"), "{stdout}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every `--flag` in `text`.
fn flags(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect()
}

#[test]
fn the_synopsis_lists_every_flag_of_every_subcommand() {
    let text = readme();
    let start = text.find("## Command line").expect("Command line section");
    let block = text[start..].split("```").nth(1).expect("synopsis block");
    // lines of a subcommand: its `ferrovit <sub>` line and the indented ones after it
    let mut synopsis: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if let Some(rest) = line.strip_prefix("ferrovit ") {
            let sub = rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
            synopsis.push((sub, line.to_string()));
        } else if let Some(last) = synopsis.last_mut() {
            last.1.push_str(line);
        }
    }
    let bin = env!("CARGO_BIN_EXE_ferrovit");
    for sub in ["train", "launch", "infer", "eval", "bench"] {
        let documented: BTreeSet<String> = synopsis
            .iter()
            .filter(|(s, _)| s == sub)
            .flat_map(|(_, l)| flags(l))
            .collect();
        let help = Command::new(bin).args([sub, "--help"]).output().unwrap();
        assert!(help.status.success());
        // the options list: lines that start with a flag (not the prose above it)
        let options: String = String::from_utf8_lossy(&help.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .map(|l| {
                l.split("  ")
                    .find(|p| !p.trim().is_empty())
                    .unwrap_or("")
                    .to_string()
                    + "\n"
            })
            .collect();
        let mut actual = flags(&options);
        actual.remove("--help");
        assert_eq!(
            documented, actual,
            "`ferrovit {sub}`: README synopsis vs --help"
        );
    }
}
