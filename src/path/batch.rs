//! [`SendBatch`]: joins quinn's GSO transmits to one peer into bigger ones.
//!
//! quinn hands the socket at most ten datagrams per transmit. Each `sendmsg` becomes one
//! packet for the kernel to route, filter, NAT and deliver, and on a forwarding path (the
//! namespaces of the NAT lab, a container bridge, a VPN) that per-packet work, not the bytes,
//! is what the CPU spends most on. Holding back transmits whose datagrams are all full-size
//! (a bulk transfer in flight) and sending them as one transmit of up to about 64 KB cuts
//! that work several times. Anything else (a short last datagram, an ACK, a handshake) ends
//! the batch and goes out at once, so request/response traffic waits for nothing.
//!
//! This module decides; the socket owns the I/O and the task that sends a batch that nothing
//! else completes.

use std::net::{IpAddr, SocketAddr};

use quinn::udp::{EcnCodepoint, Transmit};

/// The most bytes one batch carries: a UDP datagram's payload, GSO or not, must fit in an
/// IPv4 packet (65,507 bytes) after the headers.
pub const MAX_BATCH_BYTES: usize = 65_000;

/// Whether `t` should wait for more: all of its datagrams are full-size, so the connection is
/// sending in bulk and more of the same is likely to follow at once.
pub fn worth_holding(t: &Transmit) -> bool {
    match t.segment_size {
        Some(size) => size > 0 && t.contents.len() > size && t.contents.len().is_multiple_of(size),
        None => false,
    }
}

/// Datagrams held for one destination, all of one segment size, ready to go as one GSO
/// transmit.
#[derive(Debug, Default)]
pub struct SendBatch {
    buf: Vec<u8>,
    destination: Option<SocketAddr>,
    segment_size: usize,
    ecn: Option<EcnCodepoint>,
    src_ip: Option<IpAddr>,
}

impl SendBatch {
    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// How many datagrams are held.
    pub fn segments(&self) -> usize {
        self.buf.len().div_ceil(self.segment_size.max(1))
    }

    /// The most datagrams of `segment_size` bytes one batch may hold when the socket takes
    /// `max_gso` per send.
    pub fn limit(segment_size: usize, max_gso: usize) -> usize {
        (MAX_BATCH_BYTES / segment_size.max(1)).min(max_gso)
    }

    /// Adds `t` if it continues the batch: the same destination, source, ECN marking and segment size, the batch so far ending on a whole
    /// datagram (a short one can only be last), and room for it within the limit for
    /// `max_gso` datagrams per send. An empty batch takes any transmit of several datagrams.
    /// Returns whether `t` was added.
    pub fn push(&mut self, t: &Transmit, max_gso: usize) -> bool {
        let size = t.segment_size.unwrap_or(t.contents.len());
        if size == 0 || t.contents.is_empty() {
            return false;
        }
        if self.is_empty() {
            if t.contents.len() > size * Self::limit(size, max_gso) {
                return false;
            }
            self.destination = Some(t.destination);
            self.segment_size = size;
            self.ecn = t.ecn;
            self.src_ip = t.src_ip;
            self.buf.extend_from_slice(t.contents);
            return true;
        }
        let continues = self.destination == Some(t.destination)
            && self.ecn == t.ecn
            && self.src_ip == t.src_ip
            && size <= self.segment_size
            // Only the last datagram of a transmit may be shorter, so a transmit of several
            // must have exactly the batch's size.
            && (t.segment_size.is_none() || size == self.segment_size)
            && self.buf.len().is_multiple_of(self.segment_size);
        let fits = self.segments() + t.contents.len().div_ceil(self.segment_size)
            <= Self::limit(self.segment_size, max_gso);
        if !(continues && fits) {
            return false;
        }
        self.buf.extend_from_slice(t.contents);
        true
    }

    /// Whether another full transmit of `per_transmit` datagrams would no longer fit, so the
    /// batch should go now rather than wait.
    pub fn is_full(&self, max_gso: usize, per_transmit: usize) -> bool {
        self.segments() + per_transmit > Self::limit(self.segment_size, max_gso)
    }

    /// The held datagrams as one transmit; `None` when empty.
    pub fn transmit(&self) -> Option<Transmit<'_>> {
        let destination = self.destination?;
        if self.buf.is_empty() {
            return None;
        }
        Some(Transmit {
            destination,
            ecn: self.ecn,
            contents: &self.buf,
            segment_size: (self.buf.len() > self.segment_size).then_some(self.segment_size),
            src_ip: self.src_ip,
        })
    }

    /// Forgets the held datagrams (after sending them), keeping the buffer's memory.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.destination = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEER: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9);

    fn transmit(contents: &[u8], segment_size: Option<usize>) -> Transmit<'_> {
        Transmit {
            destination: PEER,
            ecn: None,
            contents,
            segment_size,
            src_ip: None,
        }
    }

    #[test]
    fn only_transmits_of_full_datagrams_are_worth_holding() {
        let full = vec![1u8; 3000];
        assert!(worth_holding(&transmit(&full, Some(1000))));
        assert!(!worth_holding(&transmit(&full[..2500], Some(1000))));
        // One datagram, even a full one, carries no sign of a bulk transfer.
        assert!(!worth_holding(&transmit(&full[..1000], None)));
        assert!(!worth_holding(&transmit(&full[..1000], Some(1000))));
    }

    #[test]
    fn transmits_of_one_size_join_and_go_as_one() {
        let a = vec![1u8; 3000];
        let b = vec![2u8; 2000];
        let tail = vec![3u8; 400];
        let mut batch = SendBatch::default();
        assert!(batch.push(&transmit(&a, Some(1000)), 64));
        assert!(batch.push(&transmit(&b, Some(1000)), 64));
        assert!(batch.push(&transmit(&tail, None), 64));
        assert_eq!(batch.segments(), 6);
        let t = batch.transmit().expect("held");
        assert_eq!(t.segment_size, Some(1000));
        assert_eq!(t.contents.len(), 5400);
        assert_eq!(&t.contents[..3000], &a[..]);
        assert_eq!(&t.contents[3000..5000], &b[..]);
        assert_eq!(&t.contents[5000..], &tail[..]);
        // Nothing may follow a short datagram.
        assert!(!batch.push(&transmit(&b, Some(1000)), 64));
        batch.clear();
        assert!(batch.is_empty());
        assert!(batch.transmit().is_none());
    }

    #[test]
    fn a_different_destination_size_or_marking_starts_a_new_batch() {
        let a = vec![1u8; 2000];
        let mut batch = SendBatch::default();
        assert!(batch.push(&transmit(&a, Some(1000)), 64));
        let mut elsewhere = transmit(&a, Some(1000));
        elsewhere.destination = "127.0.0.1:10".parse().expect("address");
        assert!(!batch.push(&elsewhere, 64));
        assert!(!batch.push(&transmit(&a, Some(500)), 64));
        // A single datagram longer than the batch's size would be cut by GSO.
        assert!(!batch.push(&transmit(&a[..1200], None), 64));
        let mut marked = transmit(&a, Some(1000));
        marked.ecn = Some(EcnCodepoint::Ect0);
        assert!(!batch.push(&marked, 64));
        assert_eq!(batch.segments(), 2);
    }

    #[test]
    fn a_batch_stays_within_the_gso_limit_and_64_kb() {
        let a = vec![1u8; 14_000];
        let mut batch = SendBatch::default();
        // 1400-byte datagrams: 46 fit in 65,000 bytes.
        assert_eq!(SendBatch::limit(1400, 64), 46);
        assert_eq!(SendBatch::limit(1400, 20), 20);
        for _ in 0..4 {
            assert!(batch.push(&transmit(&a, Some(1400)), 64));
        }
        assert!(batch.is_full(64, 10));
        assert!(!batch.push(&transmit(&a, Some(1400)), 64));
        assert!(batch.push(&transmit(&a[..2800], Some(1400)), 64));
        assert_eq!(batch.segments(), 42);
        // A socket that cannot segment at all gets nothing held.
        let mut single = SendBatch::default();
        assert!(!single.push(&transmit(&a[..2800], Some(1400)), 1));
        assert!(batch.transmit().expect("held").contents.len() <= MAX_BATCH_BYTES);
    }
}
