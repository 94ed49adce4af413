//! Classification metrics.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A running mean weighted by batch size (an epoch's train loss so far): the sum and
/// the count, so that it can be saved and continued exactly.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMean {
    pub sum: f64,
    pub count: u64,
}

impl RunningMean {
    /// Adds `value` for `count` items and returns the mean so far.
    pub fn add(&mut self, value: f64, count: usize) -> f64 {
        self.sum += value * count as f64;
        self.count += count as u64;
        self.mean()
    }

    /// The mean so far (0 before anything was added).
    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }
}

/// Counts of (true label, predicted label) pairs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfusionMatrix {
    classes: usize,
    /// Row-major `[true, predicted]`.
    counts: Vec<u64>,
}

impl ConfusionMatrix {
    pub fn new(classes: usize) -> Self {
        ConfusionMatrix {
            classes,
            counts: vec![0; classes * classes],
        }
    }

    /// Records predictions; pairs outside the class range are ignored.
    pub fn add(&mut self, labels: &[usize], predictions: &[usize]) {
        for (&y, &p) in labels.iter().zip(predictions) {
            if y < self.classes && p < self.classes {
                self.counts[y * self.classes + p] += 1;
            }
        }
    }

    pub fn count(&self, label: usize, predicted: usize) -> u64 {
        self.counts[label * self.classes + predicted]
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Fraction of correct predictions (0 when empty).
    pub fn accuracy(&self) -> f64 {
        let correct: u64 = (0..self.classes).map(|c| self.count(c, c)).sum();
        correct as f64 / self.total().max(1) as f64
    }

    /// Accuracy within each true class (`None` for a class with no samples).
    pub fn per_class_accuracy(&self) -> Vec<Option<f64>> {
        (0..self.classes)
            .map(|c| {
                let row: u64 = (0..self.classes).map(|p| self.count(c, p)).sum();
                (row > 0).then(|| self.count(c, c) as f64 / row as f64)
            })
            .collect()
    }
}

impl fmt::Display for ConfusionMatrix {
    /// Rows are true labels, columns predictions, last column the row's accuracy.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "true\\pred")?;
        for p in 0..self.classes {
            write!(f, " {p:>5}")?;
        }
        writeln!(f, "    acc")?;
        for (c, acc) in self.per_class_accuracy().iter().enumerate() {
            write!(f, "{c:>9}")?;
            for p in 0..self.classes {
                write!(f, " {:>5}", self.count(c, p))?;
            }
            match acc {
                Some(a) => writeln!(f, " {:>5.1}%", 100.0 * a)?,
                None => writeln!(f, "      -")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_accuracy_and_per_class() {
        let mut m = ConfusionMatrix::new(3);
        m.add(&[0, 0, 1, 1, 1, 2], &[0, 1, 1, 1, 0, 2]);
        m.add(&[5], &[0]); // out of range: ignored
        assert_eq!(
            (m.count(0, 1), m.count(1, 0), m.count(2, 2), m.total()),
            (1, 1, 1, 6)
        );
        assert!((m.accuracy() - 4.0 / 6.0).abs() < 1e-12);
        let pc = m.per_class_accuracy();
        assert!((pc[0].unwrap() - 0.5).abs() < 1e-12 && (pc[1].unwrap() - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(ConfusionMatrix::new(2).per_class_accuracy(), [None, None]);
        let text = m.to_string();
        assert!(
            text.lines().count() == 4 && text.contains("50.0%"),
            "{text}"
        );
    }
}
