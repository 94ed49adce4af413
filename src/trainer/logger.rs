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

    /// Warnings are logged on every rank.
    pub fn warn(&self, msg: impl AsRef<str>) {
        tracing::warn!("{}", self.line(msg.as_ref()));
    }
}

/// Installs a plain subscriber printing INFO and above to stdout (message only, no
/// timestamps or levels: the output of a command-line tool). Does nothing if one is
/// already installed.
pub fn init_stdout() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stdout)
        .with_target(false)
        .with_level(false)
        .without_time()
        .with_max_level(tracing::Level::INFO)
        .try_init();
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
}
