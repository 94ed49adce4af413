//! Which bytes of a circular staging buffer an upload may use. Uploads copy the caller's
//! data into pinned host memory and return; the device copies it out later, in stream
//! order. A region may be written again only once the copy that read it has completed,
//! which the region's completion token (a CUDA event recorded after the copy) says.
//! Tokens complete in the order they were issued (one stream), so waiting for one
//! retires every older region too.

use crate::error::Result;
use std::collections::VecDeque;

pub struct Ring<E> {
    cap: usize,
    /// Where the next region starts, unless it does not fit before the end.
    head: usize,
    /// Regions still being read, oldest first: (start, end, completion token).
    busy: VecDeque<(usize, usize, E)>,
}

impl<E> Ring<E> {
    pub fn new(cap: usize) -> Ring<E> {
        Ring {
            cap,
            head: 0,
            busy: VecDeque::new(),
        }
    }

    /// The start of a free region of `n` bytes (`0 < n <= cap`), after `wait`ing for the
    /// newest in-flight region that overlaps it (which retires it and every older one:
    /// their tokens are dropped). Give the region's token to [`Ring::issued`] once its
    /// copy is enqueued.
    pub fn reserve(&mut self, n: usize, wait: impl FnOnce(&E) -> Result<()>) -> Result<usize> {
        debug_assert!(
            n > 0 && n <= self.cap,
            "region of {n} bytes in a ring of {}",
            self.cap
        );
        let start = if self.head + n <= self.cap {
            self.head
        } else {
            0
        };
        let end = start + n;
        if let Some(newest) = self
            .busy
            .iter()
            .rposition(|&(s, e, _)| s < end && start < e)
        {
            wait(&self.busy[newest].2)?;
            self.busy.drain(..=newest);
        }
        self.head = end;
        Ok(start)
    }

    /// Records that bytes `start..start + n` are being read until `token` completes.
    pub fn issued(&mut self, start: usize, n: usize, token: E) {
        self.busy.push_back((start, start + n, token));
    }

    /// Every token still outstanding.
    #[cfg(test)]
    pub fn drain(&mut self) -> impl Iterator<Item = E> + '_ {
        self.busy.drain(..).map(|(_, _, e)| e)
    }
}

#[cfg(test)]
mod tests {
    use super::Ring;

    /// Reserves `n` bytes, recording which token (if any) had to be waited for.
    fn take(ring: &mut Ring<u32>, n: usize, token: u32, waited: &mut Vec<u32>) -> usize {
        let start = ring
            .reserve(n, |&e| {
                waited.push(e);
                Ok(())
            })
            .unwrap();
        ring.issued(start, n, token);
        start
    }

    #[test]
    fn regions_are_reused_only_after_their_copy_completes() {
        let mut ring = Ring::new(100);
        let mut waited = Vec::new();
        assert_eq!(take(&mut ring, 40, 1, &mut waited), 0);
        assert_eq!(take(&mut ring, 40, 2, &mut waited), 40);
        assert!(waited.is_empty(), "free space needs no wait");
        // 30 bytes do not fit after 80: wrap to 0, which region 1 still holds
        assert_eq!(take(&mut ring, 30, 3, &mut waited), 0);
        assert_eq!(waited, [1]);
        // 30..70 overlaps region 2 (40..80): waiting for it also retires nothing older
        assert_eq!(take(&mut ring, 40, 4, &mut waited), 30);
        assert_eq!(waited, [1, 2]);
        // 70..100 is free (region 2 retired), no wait
        assert_eq!(take(&mut ring, 30, 5, &mut waited), 70);
        assert_eq!(waited, [1, 2]);
        // a full-size region overlaps everything: wait for the newest, 5, only
        assert_eq!(take(&mut ring, 100, 6, &mut waited), 0);
        assert_eq!(waited, [1, 2, 5]);
        assert_eq!(ring.drain().collect::<Vec<_>>(), [6]);
    }

    #[test]
    fn a_failed_wait_is_an_error_and_keeps_the_region_busy() {
        let mut ring = Ring::new(10);
        let start = ring.reserve(10, |_: &u32| Ok(())).unwrap();
        ring.issued(start, 10, 7);
        let err = ring
            .reserve(5, |_| Err(crate::Error::Device("device lost".into())))
            .unwrap_err();
        assert!(err.to_string().contains("device lost"), "{err}");
        assert_eq!(ring.drain().collect::<Vec<_>>(), [7]);
    }
}
