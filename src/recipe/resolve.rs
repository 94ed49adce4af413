//! A resume continues a run from its checkpoint alone: the options the run was saved
//! with (`TrainingState::options`; for older checkpoints the run's `config.toml`) are
//! the base, and of the options given now, those in [`MUST_MATCH`] must agree with
//! them while the rest are taken. Decided once, before any rank starts or anything is
//! written.

use super::options::{Resume, TrainOptions, MUST_MATCH};
use crate::checkpoint::{self, Checkpoint};
use crate::error::{Error, Result};
use crate::trainer::Logger;
use std::path::{Path, PathBuf};

/// Options never taken from a checkpoint: they say what this invocation does.
const INVOCATION: [&str; 4] = ["out", "resume", "init", "overwrite"];

/// The checkpoint a resume continues: `--resume DIR`, or the newest committed one
/// under `<out>/checkpoints` (none: `--resume auto` starts afresh).
pub(super) fn checkpoint_to_resume(opts: &TrainOptions) -> Result<Option<PathBuf>> {
    match &opts.resume {
        None => Ok(None),
        Some(Resume::Auto) => checkpoint::newest(&opts.checkpoint_root()),
        Some(Resume::Dir(dir)) => Ok(Some(dir.clone())),
    }
}

/// The options the run goes on with. Without a checkpoint to resume, `opts` as they
/// are. Otherwise the checkpoint's saved options, with the options in `given` (set on
/// the command line or in a `--config` file) taken from `opts` — an option of
/// [`MUST_MATCH`] given with another value than the saved one is an error naming both.
/// `launcher`: ranks were started by a launcher, whose world size decides `--dp` when
/// it is not given. A `--pp` given brings its own `--stages` and `--microbatches`
/// (given or defaults) along.
pub fn resume_options(
    opts: &TrainOptions,
    given: &[String],
    launcher: bool,
    logger: &Logger,
) -> Result<TrainOptions> {
    let Some(dir) = checkpoint_to_resume(opts)? else {
        return Ok(opts.clone());
    };
    let Some((saved, source)) = saved_options(&dir)? else {
        logger.info(format!(
            "{} records no options (an older checkpoint) and its run has no config.toml: resuming with the options as given",
            dir.display()
        ));
        return Ok(opts.clone());
    };
    let model = saved.model(1).map_err(|e| Error::Format {
        path: source.clone(),
        msg: format!("the saved options: {e}"),
    })?;
    let saved = saved.with_model(&model);
    check_agreement(opts, given, &saved, &source)?;
    let mut taken: Vec<String> = given.to_vec();
    taken.extend(INVOCATION.map(String::from));
    let is_given = |k: &str| given.iter().any(|g| g == k);
    if launcher && !is_given("dp") {
        taken.push("dp".into());
    }
    if is_given("pp") {
        // the saved stage boundaries and micro-batch count were for the saved stages
        taken.extend(["stages".into(), "microbatches".into()]);
    }
    let resolved = TrainOptions::merged(&saved, opts, &taken).map_err(|e| match e {
        Error::Config(m) => Error::Config(format!(
            "{m} (resuming with the options saved in {})",
            source.display()
        )),
        e => e,
    })?;
    logger.info(format!(
        "resuming with the run's options from {}{}",
        source.display(),
        changes(&saved, &resolved)?
    ));
    Ok(resolved)
}

/// The options saved with the checkpoint at `dir` and where they were read: its index,
/// or (an older checkpoint) the `config.toml` of its run, `<out>/checkpoints/<step>/`
/// being in `<out>`; `None` without either.
fn saved_options(dir: &Path) -> Result<Option<(TrainOptions, PathBuf)>> {
    let index = Checkpoint::open(dir)?.index;
    if let Some(map) = &index.training.options {
        let opts = TrainOptions::from_json(map).map_err(|e| Error::Format {
            path: dir.to_path_buf(),
            msg: format!("training.options: {e}"),
        })?;
        return Ok(Some((opts, dir.to_path_buf())));
    }
    let config = dir
        .parent()
        .and_then(Path::parent)
        .map(|run| run.join("config.toml"));
    match config {
        Some(c) if c.is_file() => Ok(Some((TrainOptions::from_toml_file(&c)?, c))),
        _ => Ok(None),
    }
}

/// Refuses an option of [`MUST_MATCH`] given with a value other than the saved one.
fn check_agreement(
    opts: &TrainOptions,
    given: &[String],
    saved: &TrainOptions,
    source: &Path,
) -> Result<()> {
    let (mine, theirs) = (opts.to_json()?, saved.to_json()?);
    for key in MUST_MATCH.iter().filter(|k| given.iter().any(|g| g == *k)) {
        let (a, b) = (mine.get(*key), theirs.get(*key));
        if a != b {
            return Err(Error::Config(format!(
                "--{} {} contradicts the checkpoint's {key} {} ({}); leave it out to continue, or start a new run (another --out, or --overwrite)",
                key.replace('_', "-"),
                show(a),
                show(b),
                source.display()
            )));
        }
    }
    Ok(())
}

/// `; changed: epochs 2 → 3, dp 1 → 2` for the options (but this invocation's own)
/// whose values differ between the saved and the resolved options; empty if none.
fn changes(saved: &TrainOptions, resolved: &TrainOptions) -> Result<String> {
    let (before, after) = (saved.to_json()?, resolved.to_json()?);
    let changed: Vec<String> = after
        .iter()
        .filter(|(k, v)| !INVOCATION.contains(&k.as_str()) && before.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k} {} → {}", show(before.get(k)), show(Some(v))))
        .collect();
    Ok(match changed.is_empty() {
        true => String::new(),
        false => format!("; changed: {}", changed.join(", ")),
    })
}

/// An option's value as a person writes it.
fn show(v: Option<&serde_json::Value>) -> String {
    match v {
        None | Some(serde_json::Value::Null) => "(unset)".into(),
        Some(serde_json::Value::String(s)) => s.clone(),
        // as the flag is written (`--mean 0.5,0.5,0.5`, `--stages 3,5`)
        Some(serde_json::Value::Array(a)) => a
            .iter()
            .map(|v| show(Some(v)))
            .collect::<Vec<_>>()
            .join(","),
        Some(v) => v.to_string(),
    }
}
