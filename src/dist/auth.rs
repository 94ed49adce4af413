//! Who may talk to a run: its ranks share a secret (FERROVIT_SECRET, which
//! `ferrovit launch` draws afresh for each run) and prove that they know it without
//! sending it: each side of a connection sends a fresh random nonce, and each answers
//! with an HMAC-SHA256, keyed by the secret, of everything both sent. A stranger can
//! neither answer (it lacks the key) nor replay an old answer (the nonces differ), nor
//! reflect one side's answer back (each direction has its own label).

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use std::io;

/// Bytes of a handshake nonce.
pub(crate) const NONCE: usize = 16;
/// Bytes of a handshake answer (an HMAC-SHA256).
pub(crate) const MAC: usize = 32;

/// The secret a run's ranks share, as an HMAC key. Empty when FERROVIT_SECRET is unset:
/// the handshake then still runs, and keeps out only programs that are not ferrovit
/// ranks (or ranks of a run with a secret).
#[derive(Clone)]
pub(crate) struct Secret {
    key: hmac::Key,
}

impl Secret {
    pub(crate) fn new(secret: &[u8]) -> Secret {
        Secret {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// The answer that proves knowledge of the secret for `label` and the handshake's
    /// bytes `parts`.
    pub(crate) fn answer(&self, label: &str, parts: &[&[u8]]) -> [u8; MAC] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(label.as_bytes());
        for p in parts {
            ctx.update(p);
        }
        let mut out = [0u8; MAC];
        out.copy_from_slice(ctx.sign().as_ref());
        out
    }

    /// Whether `answer` is the right one, compared in constant time (so the time taken
    /// tells nothing about how much of a guess was right).
    pub(crate) fn verify(&self, label: &str, parts: &[&[u8]], answer: &[u8]) -> bool {
        let mut data = label.as_bytes().to_vec();
        for p in parts {
            data.extend_from_slice(p);
        }
        hmac::verify(&self.key, &data, answer).is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

fn random(buf: &mut [u8]) -> io::Result<()> {
    SystemRandom::new()
        .fill(buf)
        .map_err(|_| io::Error::other("the system's random source failed"))
}

/// A fresh nonce for one handshake.
pub(crate) fn nonce() -> io::Result<[u8; NONCE]> {
    let mut n = [0u8; NONCE];
    random(&mut n)?;
    Ok(n)
}

/// A fresh secret for a run: 32 random bytes, in hex (it travels in an environment
/// variable).
pub fn random_secret() -> io::Result<String> {
    let mut b = [0u8; 32];
    random(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_depend_on_secret_label_and_every_byte() {
        let s = Secret::new(b"k");
        let a = s.answer("dial", &[b"ab", b"c"]);
        // the split between parts does not matter, each byte does
        assert!(s.verify("dial", &[b"a", b"bc"], &a));
        assert!(!s.verify("dial", &[b"ab", b"d"], &a));
        assert!(!s.verify("accept", &[b"ab", b"c"], &a));
        assert!(!Secret::new(b"K").verify("dial", &[b"ab", b"c"], &a));
        assert!(!s.verify("dial", &[b"ab", b"c"], &a[..31]));
        // an empty secret is a key like any other
        let e = Secret::new(b"");
        assert!(e.verify("x", &[], &e.answer("x", &[])));
        assert!(!s.verify("x", &[], &e.answer("x", &[])));
        let r = random_secret().unwrap();
        assert_eq!(r.len(), 64);
        assert_ne!(r, random_secret().unwrap());
        assert_ne!(nonce().unwrap(), nonce().unwrap());
    }
}
