//! Progress while an epoch runs: a bar on a terminal, otherwise a log line every
//! `--log-interval` ([`LogInterval`]: N optimizer steps or S seconds), so output under
//! `tee`, Slurm or CI shows how training goes between the epoch lines.

use super::{Hook, State, StepOutput};
use crate::error::{Error, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::time::Instant;

/// Longest time interval, in seconds (a day).
pub const MAX_LOG_INTERVAL_S: f64 = 86_400.0;

/// How often something periodic happens during training: every N optimizer steps
/// (written `50`) or every S seconds (written `30s`; fractions allowed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawInterval", into = "RawInterval")]
pub enum LogInterval {
    Steps(u64),
    Seconds(f64),
}

impl Default for LogInterval {
    fn default() -> Self {
        LogInterval::Seconds(30.0)
    }
}

impl std::str::FromStr for LogInterval {
    type Err = Error;
    fn from_str(text: &str) -> Result<LogInterval> {
        let bad = |why: &str| {
            Error::Config(format!(
                "`{}`: {why} (a number of steps such as 50, or of seconds such as 30s)",
                crate::text::escape(text)
            ))
        };
        if let Some(secs) = text.strip_suffix('s') {
            let v: f64 = secs.parse().map_err(|_| bad("not a number of seconds"))?;
            if !(v.is_finite() && v > 0.0 && v <= MAX_LOG_INTERVAL_S) {
                return Err(bad(&format!(
                    "seconds must be more than 0 and at most {MAX_LOG_INTERVAL_S}"
                )));
            }
            return Ok(LogInterval::Seconds(v));
        }
        match text.parse::<u64>() {
            Ok(n) if n >= 1 && n <= i64::MAX as u64 => Ok(LogInterval::Steps(n)),
            Ok(_) => Err(bad(&format!("steps must be 1 to {}", i64::MAX))),
            Err(_) => Err(bad("not a whole number of steps")),
        }
    }
}

impl std::fmt::Display for LogInterval {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LogInterval::Steps(n) => write!(f, "{n}"),
            LogInterval::Seconds(s) => write!(f, "{s}s"),
        }
    }
}

/// A config file's form: `log_interval = 50` or `log_interval = "30s"` (or `"50"`).
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RawInterval {
    Steps(u64),
    Text(String),
}

impl TryFrom<RawInterval> for LogInterval {
    type Error = Error;
    fn try_from(raw: RawInterval) -> Result<LogInterval> {
        match raw {
            RawInterval::Steps(n) => n.to_string().parse(),
            RawInterval::Text(t) => t.parse(),
        }
    }
}

impl From<LogInterval> for RawInterval {
    fn from(i: LogInterval) -> RawInterval {
        match i {
            LogInterval::Steps(n) => RawInterval::Steps(n),
            LogInterval::Seconds(_) => RawInterval::Text(i.to_string()),
        }
    }
}

/// Says when a [`LogInterval`] has come round: at every multiple of N steps (so a
/// resumed run keeps the same steps), or S seconds after it last came round.
#[derive(Clone, Debug)]
pub(crate) struct Every {
    interval: LogInterval,
    last: Instant,
}

impl Every {
    pub(crate) fn new(interval: LogInterval) -> Every {
        Every {
            interval,
            last: Instant::now(),
        }
    }

    /// Whether the interval has come round at optimizer step `step`.
    pub(crate) fn due(&mut self, step: u64) -> bool {
        let due = match self.interval {
            LogInterval::Steps(n) => step.is_multiple_of(n),
            LogInterval::Seconds(s) => self.last.elapsed().as_secs_f64() >= s,
        };
        if due {
            self.last = Instant::now();
        }
        due
    }
}

/// Rank 0's progress during training epochs. When INFO logging is on (not under
/// `--quiet`): on a terminal (stderr), a bar per epoch with loss, accuracy, images/s and
/// the epoch's ETA; otherwise (a pipe, a file, Slurm, CI) an INFO log line every
/// `interval` with the step, epoch and batch, loss, accuracy, lr, images/s and the
/// run's ETA. Never both: lines written under a live bar would tear it.
#[derive(Debug, Default)]
pub struct ProgressHook {
    interval: LogInterval,
    mode: Mode,
    bar: Option<ProgressBar>,
}

#[derive(Debug, Default)]
enum Mode {
    #[default]
    Off,
    Bar,
    Lines(Lines),
}

/// What the log lines need: when the next is due and the run's pace so far.
#[derive(Debug)]
struct Lines {
    every: Every,
    start: Instant,
    start_step: u64,
}

impl ProgressHook {
    /// Progress with log lines every `interval` when there is no terminal for a bar.
    pub fn new(interval: LogInterval) -> ProgressHook {
        ProgressHook {
            interval,
            ..ProgressHook::default()
        }
    }

    fn clear(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn update_bar(bar: &ProgressBar, s: &State) {
        let m = |k: &str| s.metrics.get(k).copied().unwrap_or(f64::NAN);
        bar.set_message(format!(
            "loss {:.4} acc {:5.1}% {:.0} img/s",
            m("train_loss"),
            100.0 * m("train_acc"),
            m("images_per_s")
        ));
        bar.inc(1);
    }
}

impl Hook for ProgressHook {
    fn before_train(&mut self, s: &mut State) -> Result<()> {
        self.mode = if s.logger.rank != 0 || !tracing::enabled!(tracing::Level::INFO) {
            Mode::Off
        } else if std::io::stderr().is_terminal() {
            Mode::Bar
        } else {
            Mode::Lines(Lines {
                every: Every::new(self.interval),
                start: Instant::now(),
                start_step: s.engine.step_count(),
            })
        };
        Ok(())
    }
    fn before_epoch(&mut self, s: &mut State) -> Result<()> {
        if !matches!(self.mode, Mode::Bar) {
            return Ok(());
        }
        let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
        let bar = ProgressBar::new(s.iters_per_epoch as u64).with_style(style);
        bar.set_prefix(format!("epoch {}/{}", s.epoch + 1, s.epochs));
        self.bar = Some(bar);
        Ok(())
    }
    fn after_iter(&mut self, s: &mut State, _: &StepOutput) -> Result<()> {
        if let Some(bar) = &self.bar {
            Self::update_bar(bar, s);
        }
        if let Mode::Lines(lines) = &mut self.mode {
            if lines.every.due(s.engine.step_count()) {
                s.logger.info(progress_line(s, lines));
            }
        }
        Ok(())
    }
    fn before_test(&mut self, _: &mut State) -> Result<()> {
        self.clear();
        Ok(())
    }
    fn after_epoch(&mut self, _: &mut State) -> Result<()> {
        self.clear();
        Ok(())
    }
    fn after_train(&mut self, _: &mut State) -> Result<()> {
        self.clear(); // a stopped epoch's bar
        Ok(())
    }
}

/// `step 40/460  epoch 2/20 batch 17/23  loss 0.4123  acc 87.12%  lr 1.234e-3
/// 1234 img/s  ETA 3m12s` (metrics that no hook records are left out).
fn progress_line(s: &State, lines: &Lines) -> String {
    let step = s.engine.step_count();
    let total = (s.epochs as u64).saturating_mul(s.iters_per_epoch as u64);
    let mut line = format!(
        "step {step}/{total}  epoch {}/{} batch {}/{}",
        s.epoch + 1,
        s.epochs,
        s.iter + 1,
        s.iters_per_epoch
    );
    let m = |k: &str| s.metrics.get(k).copied();
    if let Some(v) = m("train_loss") {
        line += &format!("  loss {v:.4}");
    }
    if let Some(v) = m("train_acc") {
        line += &format!("  acc {:.2}%", 100.0 * v);
    }
    if let Some(v) = m("lr") {
        line += &format!("  lr {v:.3e}");
    }
    if let Some(v) = m("images_per_s") {
        line += &format!("  {v:.0} img/s");
    }
    let done = step.saturating_sub(lines.start_step).max(1) as f64;
    let per_step = lines.start.elapsed().as_secs_f64() / done;
    line + &format!(
        "  ETA {}",
        duration(per_step * total.saturating_sub(step) as f64)
    )
}

/// `45s`, `3m12s`, `2h05m`.
fn duration(secs: f64) -> String {
    let s = secs.round().max(0.0) as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_parse_display_and_refuse_bad_values() {
        assert_eq!("50".parse::<LogInterval>().unwrap(), LogInterval::Steps(50));
        assert_eq!(
            "30s".parse::<LogInterval>().unwrap(),
            LogInterval::Seconds(30.0)
        );
        assert_eq!(
            "0.5s".parse::<LogInterval>().unwrap(),
            LogInterval::Seconds(0.5)
        );
        for i in [LogInterval::Steps(7), LogInterval::Seconds(2.5)] {
            assert_eq!(i.to_string().parse::<LogInterval>().unwrap(), i);
        }
        for bad in [
            "0", "-3", "0s", "-1s", "nans", "infs", "90000s", "5x", "", "s", "1.5",
        ] {
            let e = bad.parse::<LogInterval>().unwrap_err().to_string();
            assert!(e.contains("30s"), "{bad}: {e}");
        }
    }

    #[test]
    fn config_files_take_a_number_or_a_string() {
        #[derive(Deserialize, Serialize, Debug, PartialEq)]
        struct T {
            log_interval: LogInterval,
        }
        let t: T = toml::from_str("log_interval = 50").unwrap();
        assert_eq!(t.log_interval, LogInterval::Steps(50));
        let e = toml::from_str::<T>("log_interval = \"2m\"").unwrap_err();
        assert!(e.to_string().contains("log_interval"), "{e}");
        for i in [LogInterval::Steps(3), LogInterval::Seconds(30.0)] {
            let text = toml::to_string(&T { log_interval: i }).unwrap();
            assert_eq!(toml::from_str::<T>(&text).unwrap().log_interval, i);
        }
    }

    #[test]
    fn step_intervals_fall_on_multiples_and_durations_read_well() {
        let mut e = Every::new(LogInterval::Steps(3));
        let due: Vec<u64> = (1..=9).filter(|&s| e.due(s)).collect();
        assert_eq!(due, [3, 6, 9]);
        let mut e = Every::new(LogInterval::Seconds(3600.0));
        assert!(!e.due(1));
        assert_eq!(duration(44.6), "45s");
        assert_eq!(duration(192.0), "3m12s");
        assert_eq!(duration(7500.0), "2h05m");
    }
}
