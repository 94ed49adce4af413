//! A rank-aware logger over `tracing`: by default only rank 0 speaks, and with more
//! than one rank every line says which rank it comes from.

/// Logs through `tracing` (install a subscriber, e.g. [`init_stdout`], to see it).
#[derive(Clone, Debug)]
pub struct Logger {
    pub rank: usize,
    pub world: usize,
    /// Log on every rank, not only rank 0.
    pub all_ranks: bool,
}

impl Default for Logger {
    fn default() -> Self {
        Logger::new(0, 1)
    }
}

impl Logger {
    pub fn new(rank: usize, world: usize) -> Logger {
        Logger {
            rank,
            world: world.max(1),
            all_ranks: false,
        }
    }

    /// Whether this rank writes logs.
    pub fn enabled(&self) -> bool {
        self.rank == 0 || self.all_ranks
    }

    /// Messages carry names from files and checkpoints (classes, paths): escaped, so
    /// none can send control sequences to the terminal or forge a line.
    fn line(&self, msg: &str) -> String {
        let msg = crate::text::escape(msg);
        if self.world > 1 {
            format!("[rank {}/{}] {msg}", self.rank, self.world)
        } else {
            msg.into_owned()
        }
    }

    pub fn info(&self, msg: impl AsRef<str>) {
        if self.enabled() {
            tracing::info!("{}", self.line(msg.as_ref()));
        }
    }

    /// Debug lines are logged on every rank (they are asked for: `--verbose`, RUST_LOG).
    pub fn debug(&self, msg: impl AsRef<str>) {
        tracing::debug!("{}", self.line(msg.as_ref()));
    }

    /// Warnings are logged on every rank.
    pub fn warn(&self, msg: impl AsRef<str>) {
        tracing::warn!("{}", self.line(msg.as_ref()));
    }
}

/// How much the command line logs (`--quiet`, `--verbose`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verbosity {
    /// Warnings and errors only.
    Quiet,
    /// RUST_LOG's filter when set, else INFO and above.
    #[default]
    Normal,
    /// DEBUG and above.
    Verbose,
}

impl Verbosity {
    /// The filter directives this verbosity stands for, given RUST_LOG's value: the
    /// flags win over RUST_LOG (the command line is the later, more specific choice);
    /// without a flag RUST_LOG decides, and INFO when it is unset or empty.
    fn directives(self, rust_log: Option<&str>) -> String {
        match (self, rust_log.map(str::trim)) {
            (Verbosity::Quiet, _) => "warn".into(),
            (Verbosity::Verbose, _) => "debug".into(),
            (Verbosity::Normal, Some(env)) if !env.is_empty() => env.into(),
            (Verbosity::Normal, _) => "info".into(),
        }
    }
}

/// Installs the command line's subscriber: each line the message only (no timestamps,
/// levels or targets: the output of a command-line tool), on stdout, or on stderr when
/// stdout carries JSON (`to_stderr`); what is shown as [`Verbosity::directives`] says.
/// An unparsable RUST_LOG is reported in one line and INFO is shown instead. Does
/// nothing if a subscriber is already installed.
pub fn init_logging(verbosity: Verbosity, to_stderr: bool) {
    use tracing_subscriber::EnvFilter;
    let rust_log = std::env::var("RUST_LOG").ok();
    let directives = verbosity.directives(rust_log.as_deref());
    let filter = EnvFilter::builder().parse(&directives).unwrap_or_else(|e| {
        eprintln!(
            "warning: ignoring RUST_LOG={}: {e}",
            crate::text::escape(&directives)
        );
        EnvFilter::new("info")
    });
    let fmt = tracing_subscriber::fmt()
        .with_target(false)
        .with_level(false)
        .without_time()
        .with_env_filter(filter);
    let _ = match to_stderr {
        true => fmt.with_writer(std::io::stderr).try_init(),
        false => fmt.with_writer(std::io::stdout).try_init(),
    };
}

/// [`init_logging`] with the default verbosity, on stdout: INFO and above, or what
/// RUST_LOG says.
pub fn init_stdout() {
    init_logging(Verbosity::Normal, false);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rank_zero_speaks_unless_asked_and_lines_name_the_rank() {
        let solo = Logger::default();
        assert!(solo.enabled());
        assert_eq!(solo.line("hi"), "hi");
        let r1 = Logger::new(1, 4);
        assert!(!r1.enabled());
        assert_eq!(r1.line("hi"), "[rank 1/4] hi");
        let all = Logger {
            all_ranks: true,
            ..r1
        };
        assert!(all.enabled());
    }

    #[test]
    fn the_flags_win_over_rust_log_which_wins_over_the_default() {
        use Verbosity::*;
        assert_eq!(Quiet.directives(Some("debug")), "warn");
        assert_eq!(Verbose.directives(Some("error")), "debug");
        assert_eq!(
            Normal.directives(Some(" ferrovit=debug ")),
            "ferrovit=debug"
        );
        assert_eq!(Normal.directives(Some("")), "info");
        assert_eq!(Normal.directives(None), "info");
    }
}
