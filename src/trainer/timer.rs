//! Named wall-clock timers (`train-epoch`, `train-step`, `test-step`, …).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Default)]
struct Timer {
    started: Option<Instant>,
    total: Duration,
    count: u64,
}

/// A set of timers addressed by name. Each accumulates the time between `start` and
/// `stop` and counts its intervals.
#[derive(Clone, Debug, Default)]
pub struct Timers {
    timers: BTreeMap<String, Timer>,
}

impl Timers {
    pub fn start(&mut self, name: &str) {
        self.timers.entry(name.to_string()).or_default().started = Some(Instant::now());
    }

    /// Stops a running timer; returns the interval in seconds (0 if it was not running).
    pub fn stop(&mut self, name: &str) -> f64 {
        let Some(t) = self.timers.get_mut(name) else {
            return 0.0;
        };
        let Some(started) = t.started.take() else {
            return 0.0;
        };
        let d = started.elapsed();
        t.total += d;
        t.count += 1;
        d.as_secs_f64()
    }

    /// Seconds since a running timer started (0 if it is not running).
    pub fn elapsed(&self, name: &str) -> f64 {
        self.timers
            .get(name)
            .and_then(|t| t.started)
            .map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// Accumulated seconds over completed intervals.
    pub fn total(&self, name: &str) -> f64 {
        self.timers.get(name).map_or(0.0, |t| t.total.as_secs_f64())
    }

    /// Completed intervals.
    pub fn count(&self, name: &str) -> u64 {
        self.timers.get(name).map_or(0, |t| t.count)
    }

    /// Mean seconds per completed interval.
    pub fn mean(&self, name: &str) -> f64 {
        self.total(name) / self.count(name).max(1) as f64
    }

    pub fn reset(&mut self, name: &str) {
        self.timers.remove(name);
    }

    /// Names of all timers that have been used, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.timers.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_accumulate_named_intervals() {
        let mut t = Timers::default();
        assert_eq!(t.stop("x"), 0.0);
        t.start("x");
        std::thread::sleep(Duration::from_millis(5));
        assert!(t.elapsed("x") > 0.0);
        let a = t.stop("x");
        t.start("x");
        let b = t.stop("x");
        assert!(a >= 0.005);
        assert_eq!(t.count("x"), 2);
        assert!((t.total("x") - (a + b)).abs() < 1e-9);
        assert_eq!(t.elapsed("x"), 0.0, "stopped");
        assert_eq!(t.names().collect::<Vec<_>>(), ["x"]);
        t.reset("x");
        assert_eq!(t.count("x"), 0);
    }
}
