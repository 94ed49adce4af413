//! The parallel layout: `dp × pp` ranks, which rank holds which pipeline stage of
//! which data-parallel replica, and which blocks each stage runs.

use crate::error::{Error, Result};
use crate::nn::Part;
use std::ops::Range;

/// `dp` data-parallel replicas of a pipeline of `pp` stages. Rank `r` is stage
/// `r % pp` of replica `r / pp`, so the stages of one replica are neighbours.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    pub world: usize,
    pub dp: usize,
    pub pp: usize,
    /// Blocks of each stage (global indices, contiguous, covering the model).
    #[serde(default)]
    pub stages: Vec<Range<usize>>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            world: 1,
            dp: 1,
            pp: 1,
            stages: Vec::new(),
        }
    }
}

impl Layout {
    /// `dp × pp` over a model of `depth` blocks. `boundaries` are the first blocks of
    /// stages 1.. (`pp - 1` increasing values in `1..depth`); without them the blocks
    /// are split as evenly as possible, later stages taking the remainder.
    pub fn new(dp: usize, pp: usize, depth: usize, boundaries: Option<&[usize]>) -> Result<Self> {
        if dp == 0 || pp == 0 {
            return Err(Error::Config(format!(
                "--dp {dp} --pp {pp}: both must be at least 1"
            )));
        }
        if pp > depth {
            return Err(Error::Config(format!(
                "--pp {pp}: more pipeline stages than the model's {depth} blocks (each stage needs at least one)"
            )));
        }
        let starts: Vec<usize> = match boundaries {
            Some(b) => {
                let ok = b.len() == pp - 1
                    && b.windows(2).all(|w| w[0] < w[1])
                    && b.iter().all(|&x| x > 0 && x < depth);
                if !ok {
                    return Err(Error::Config(format!(
                        "--stages {b:?}: need {} increasing block indices in 1..{depth} (where stages 1.. start)",
                        pp - 1
                    )));
                }
                std::iter::once(0).chain(b.iter().copied()).collect()
            }
            None => (0..pp).map(|s| s * depth / pp).collect(),
        };
        let stages = (0..pp)
            .map(|s| starts[s]..starts.get(s + 1).copied().unwrap_or(depth))
            .collect();
        let world = dp
            .checked_mul(pp)
            .ok_or_else(|| Error::Config(format!("--dp {dp} --pp {pp}: too many ranks")))?;
        Ok(Layout {
            world,
            dp,
            pp,
            stages,
        })
    }

    /// Checks a layout read from elsewhere (a checkpoint) against a model of `depth`
    /// blocks: it must be what [`Layout::new`] makes of its own dp, pp and stages.
    pub fn check(&self, depth: usize) -> Result<()> {
        let starts: Vec<usize> = self.stages.iter().skip(1).map(|r| r.start).collect();
        let rebuilt = Layout::new(
            self.dp,
            self.pp,
            depth,
            (!self.stages.is_empty()).then_some(starts.as_slice()),
        )?;
        let same = rebuilt.world == self.world
            && (self.stages.is_empty() || rebuilt.stages == self.stages);
        if !same {
            return Err(Error::Config(format!(
                "layout {self:?} is not a consistent dp x pp split of {depth} blocks"
            )));
        }
        Ok(())
    }

    /// One rank holding the whole model.
    pub fn single(depth: usize) -> Self {
        Layout {
            stages: std::iter::once(0..depth).collect(),
            ..Layout::default()
        }
    }

    /// (replica, stage) of a rank.
    pub fn coords(&self, rank: usize) -> (usize, usize) {
        (rank / self.pp, rank % self.pp)
    }

    pub fn rank_of(&self, replica: usize, stage: usize) -> usize {
        replica * self.pp + stage
    }

    /// The model part of a stage.
    pub fn part(&self, stage: usize) -> Part {
        Part {
            embed: stage == 0,
            blocks: self.stages[stage].clone(),
            head: stage + 1 == self.pp,
        }
    }

    /// Short description, e.g. `dp=2 × pp=2 (blocks 0..3 | 3..7)`.
    pub fn describe(&self) -> String {
        let stages: Vec<String> = self.stages.iter().map(|r| format!("{r:?}")).collect();
        format!(
            "dp={} × pp={} (blocks {})",
            self.dp,
            self.pp,
            stages.join(" | ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_blocks_and_refuses_bad_layouts() {
        let l = Layout::new(2, 3, 7, None).unwrap();
        assert_eq!(l.stages, vec![0..2, 2..4, 4..7]);
        assert_eq!(l.world, 6);
        assert_eq!(l.coords(4), (1, 1));
        assert_eq!(l.rank_of(1, 1), 4);
        assert!(l.part(0).embed && !l.part(0).head && l.part(2).head);
        let l = Layout::new(1, 2, 7, Some(&[5])).unwrap();
        assert_eq!(l.stages, vec![0..5, 5..7]);
        for (dp, pp, b) in [
            (0, 1, None),
            (1, 8, None),
            (1, 2, Some(vec![0])),
            (1, 3, Some(vec![4, 2])),
        ] {
            assert!(
                Layout::new(dp, pp, 7, b.as_deref()).is_err(),
                "{dp} {pp} {b:?}"
            );
        }
    }
}
