//! Harness code the fuzz targets share: running async readers without a test framework, and
//! cutting one fuzz input into the several messages a target needs.
//!
//! The seed writer (`examples/seeds.rs`) uses [`join`] to build inputs [`split`] reads back,
//! so that the committed corpora and the targets agree on the layout.

use std::future::Future;

thread_local! {
    /// One runtime per thread, made once: building a runtime per input would cost more than
    /// most decoders do.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread tokio runtime");
}

/// Runs `future` to completion on this thread's current-thread tokio runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    RUNTIME.with(|rt| rt.block_on(future))
}

/// Cuts `data` into `n` parts: `n - 1` parts each written as a 2-byte big-endian length and
/// that many bytes, then the rest as the last part. A length running past the end takes what
/// is there; missing parts are empty.
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut parts = Vec::with_capacity(n);
    let mut rest = data;
    for _ in 1..n {
        let (len, after) = match rest {
            [a, b, after @ ..] => (usize::from(u16::from_be_bytes([*a, *b])), after),
            _ => (0, &[][..]),
        };
        let (part, after) = after.split_at(len.min(after.len()));
        parts.push(part);
        rest = after;
    }
    parts.push(rest);
    parts
}

/// The input [`split`] cuts into exactly `parts` (each but the last at most 65 535 bytes).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if i + 1 < parts.len() {
            let len = u16::try_from(part.len()).expect("a part of at most 65535 bytes");
            out.extend_from_slice(&len.to_be_bytes());
        }
        out.extend_from_slice(part);
    }
    out
}

/// Cuts `data` into length-prefixed records (2-byte big-endian length each) until it runs
/// out: a sequence of datagrams in one input.
pub fn records(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while let [a, b, after @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(after.len());
        let (record, after) = after.split_at(len);
        out.push(record);
        rest = after;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_and_split_agree() {
        let parts: [&[u8]; 3] = [b"one", b"", b"three"];
        assert_eq!(split(&join(&parts), 3), parts);
        assert_eq!(split(b"", 2), [&b""[..], &b""[..]]);
        assert_eq!(records(&join(&[b"ab", b"c", b""])), [&b"ab"[..], &b"c"[..]]);
    }
}
