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

/// The subcommands, each with the nested subcommands whose options it gathers.
const SUBCOMMANDS: [(&str, &[&str]); 9] = [
    ("train", &[]),
    ("launch", &[]),
    ("infer", &[]),
    ("eval", &[]),
    ("bench", &[]),
    ("presets", &[]),
    ("data", &["cifar10"]),
    ("ckpt", &["inspect", "verify", "list", "export", "import"]),
    ("completions", &[]),
];

/// The options every subcommand takes (documented once, on the synopsis' first line).
const GLOBAL: [&str; 2] = ["--quiet", "--verbose"];

/// The options `ferrovit <sub> [nested] --help` lists, with their aliases (not flags
/// in its prose); `ferrovit --help`'s for an empty `sub`.
fn help_flags(sub: &str, nested: &[&str]) -> BTreeSet<String> {
    let paths: Vec<Vec<&str>> = if nested.is_empty() {
        vec![[sub].into_iter().filter(|s| !s.is_empty()).collect()]
    } else {
        nested.iter().map(|n| vec![sub, n]).collect()
    };
    let mut all = BTreeSet::new();
    for path in paths {
        let help = Command::new(env!("CARGO_BIN_EXE_ferrovit"))
            .args(&path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(help.status.success(), "{path:?} --help");
        let options: String = String::from_utf8_lossy(&help.stdout)
            .lines()
            .filter(|l| l.trim_start().starts_with('-'))
            .map(|l| {
                let aliases = l.split_once("[alias").map_or("", |(_, a)| a);
                let aliases = aliases.split(']').next().unwrap_or("");
                l.split("  ")
                    .find(|p| !p.trim().is_empty())
                    .unwrap_or("")
                    .to_string()
                    + " "
                    + aliases
                    + "\n"
            })
            .collect();
        all.extend(flags(&options));
    }
    all.remove("--help");
    all
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
    for (sub, nested) in SUBCOMMANDS {
        let documented: BTreeSet<String> = synopsis
            .iter()
            .filter(|(s, _)| s == sub)
            .flat_map(|(_, l)| flags(l))
            .collect();
        assert!(
            synopsis.iter().any(|(s, _)| s == sub),
            "`ferrovit {sub}` is not in the synopsis"
        );
        let mut help = help_flags(sub, nested);
        help.retain(|f| !GLOBAL.contains(&f.as_str()));
        assert_eq!(
            documented, help,
            "`ferrovit {sub}`: README synopsis vs --help"
        );
    }
    // the global options, on the line `ferrovit [--quiet | --verbose] COMMAND …`
    let global = synopsis
        .iter()
        .find(|(s, _)| s.starts_with('['))
        .expect("a synopsis line of the global options");
    let mut top = help_flags("", &[]);
    top.remove("--version");
    assert_eq!(
        flags(&global.1),
        top,
        "global options: README synopsis vs --help"
    );
}

/// Every `ferrovit …` invocation anywhere in the README (code blocks and inline code)
/// uses only flags its subcommand has.
#[test]
fn every_invocation_in_the_readme_uses_real_flags() {
    let text = readme();
    let mut checked = 0;
    for piece in text.split('`').flat_map(str::lines) {
        let Some(at) = piece.find("ferrovit ") else {
            continue;
        };
        let rest = &piece[at + "ferrovit ".len()..];
        let Some(sub) = rest.split_whitespace().next() else {
            continue;
        };
        let Some((_, nested)) = SUBCOMMANDS.iter().find(|(s, _)| *s == sub) else {
            continue;
        };
        // `launch … -- train …`: the part after `--` belongs to train
        let (own, inner) = match rest.split_once(" -- ") {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        let known = help_flags(sub, nested);
        for f in flags(own) {
            assert!(
                known.contains(&f),
                "README: `{}` uses {f}, which `ferrovit {sub}` does not have",
                piece.trim()
            );
        }
        if let Some(inner) = inner {
            let inner_sub = inner.split_whitespace().next().unwrap_or_default();
            let known = help_flags(inner_sub, &[]);
            for f in flags(inner) {
                assert!(
                    known.contains(&f),
                    "README: `{}` uses {f}, which `ferrovit {inner_sub}` does not have",
                    piece.trim()
                );
            }
        }
        checked += 1;
    }
    assert!(checked > 10, "found only {checked} invocations");
}
