//! Facts of this machine and moment that outputs record: the host's name (lock files,
//! TensorBoard file names) and the wall-clock time in unix seconds (metrics, lock files,
//! names of directories set aside).

/// This machine's host name (`HOSTNAME`, else `localhost`, where the system gives none).
pub fn host_name() -> String {
    #[cfg(unix)]
    {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is writable for the length passed; the name is cut at its NUL
        if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            if end > 0 {
                return String::from_utf8_lossy(&buf[..end]).into_owned();
            }
        }
    }
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Seconds since the Unix epoch (0 on a clock set before it).
pub fn unix_time() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
