//! One UDP datagram sent with control messages of its own (`sendmsg(2)`): the source
//! address (IP_PKTINFO / IPV6_PKTINFO) and the TTL or hop limit (IP_TTL / IPV6_HOPLIMIT).
//! Per datagram and not as socket options, because other sends on the same socket (QUIC,
//! every other peer) run at the same time and must keep the socket's defaults.
//!
//! quinn-udp has a `sendmsg` of its own that takes a source address, but a control message
//! the kernel refuses (EINVAL) makes it switch segmentation offload and ECN off for the
//! whole socket, QUIC included. The addresses used here come from strangers' datagrams (the
//! address a STUN request was sent to), so these sends keep away from quinn-udp's state.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;

/// What to set on one datagram besides its destination.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Options {
    /// The source IP, one of the host's own; `None` lets the kernel choose.
    pub(crate) src_ip: Option<IpAddr>,
    /// The IPv4 TTL or IPv6 hop limit, 1 to 255; `None` keeps the socket's.
    pub(crate) ttl: Option<u8>,
}

/// Sends `data` to `to`, spelled as the socket needs it (IPv4-mapped on an IPv6 socket), on
/// the non-blocking `socket`, with `options`. Returns WouldBlock when the socket is full,
/// like any non-blocking send; InvalidInput for a TTL of 0 or a source address of the other
/// family than the destination.
///
/// An IPv4 destination, and an IPv4-mapped one on an IPv6 socket (the datagram leaves as
/// IPv4), takes the IPv4 control messages; the kernel reads those for mapped destinations
/// and ignores IPv6 ones there.
#[cfg(any(target_os = "linux", target_os = "android"))]
pub(crate) fn send(
    socket: &impl AsFd,
    data: &[u8],
    to: SocketAddr,
    options: Options,
) -> io::Result<()> {
    let v4 = match to {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some(),
    };
    let mut control = Control::default();
    if let Some(ip) = options.src_ip {
        match (v4, ip.to_canonical()) {
            (true, IpAddr::V4(src)) => control.push(
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from_ne_bytes(src.octets()),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            )?,
            (false, IpAddr::V6(src)) => control.push(
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: src.octets(),
                    },
                    ipi6_ifindex: 0,
                },
            )?,
            (_, src) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("cannot send from {src} to {to}: not the same address family"),
                ))
            }
        }
    }
    if let Some(ttl) = options.ttl {
        if ttl == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a TTL of 0 cannot be sent",
            ));
        }
        let ttl = libc::c_int::from(ttl);
        if v4 {
            control.push(libc::IPPROTO_IP, libc::IP_TTL, ttl)?;
        } else {
            control.push(libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, ttl)?;
        }
    }
    let addr = socket2::SockAddr::from(to);
    let buffers = [io::IoSlice::new(data)];
    let mut msg = socket2::MsgHdr::new()
        .with_addr(&addr)
        .with_buffers(&buffers);
    if control.len > 0 {
        msg = msg.with_control(&control.bytes[..control.len]);
    }
    let socket = socket2::SockRef::from(socket);
    loop {
        match socket.sendmsg(&msg, 0) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            result => return result.map(|_| ()),
        }
    }
}

/// Elsewhere the kernel chooses the source address, and a TTL cannot be set per datagram.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
pub(crate) fn send(
    socket: &impl AsFd,
    data: &[u8],
    to: SocketAddr,
    options: Options,
) -> io::Result<()> {
    if options.ttl.is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a per-datagram TTL needs Linux",
        ));
    }
    socket2::SockRef::from(socket)
        .send_to(data, &socket2::SockAddr::from(to))
        .map(|_| ())
}

/// The bytes of a few control messages, each a `cmsghdr` followed by its value, laid out
/// as the CMSG_* macros lay them out.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[repr(C, align(8))]
struct Control {
    /// Room for a source address (`in6_pktinfo`, the larger) and a TTL, each with a header.
    bytes: [u8; 96],
    /// How many bytes are in use.
    len: usize,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl Default for Control {
    fn default() -> Self {
        Control {
            bytes: [0; 96],
            len: 0,
        }
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
impl Control {
    /// Appends a control message of `level` and `kind` carrying `value` (a plain C struct
    /// or integer, as the kernel expects for that message).
    fn push<T: Copy>(&mut self, level: libc::c_int, kind: libc::c_int, value: T) -> io::Result<()> {
        let size = std::mem::size_of::<T>() as libc::c_uint;
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute sizes from their argument.
        let (space, len) = unsafe { (libc::CMSG_SPACE(size), libc::CMSG_LEN(size)) };
        let (space, len) = (space as usize, len as usize);
        let value_at = len - size as usize;
        if self.len + space > self.bytes.len() {
            return Err(io::Error::other(
                "too many control messages for one datagram",
            ));
        }
        // SAFETY: cmsghdr is integers only (and private padding on some libcs), for which
        // all zeros is a valid value.
        let mut header: libc::cmsghdr = unsafe { std::mem::zeroed() };
        header.cmsg_len = len as _;
        header.cmsg_level = level;
        header.cmsg_type = kind;
        let start = self.bytes[self.len..].as_mut_ptr();
        // SAFETY: `start` points at `space` bytes within `self.bytes` (checked above), and
        // the header (at 0) and the value (at `value_at`, after the header) both lie within
        // them, as CMSG_LEN(size) <= CMSG_SPACE(size). The writes are unaligned ones, so
        // they need no alignment; `T: Copy` has no destructor to skip.
        unsafe {
            std::ptr::write_unaligned(start.cast::<libc::cmsghdr>(), header);
            std::ptr::write_unaligned(start.add(value_at).cast::<T>(), value);
        }
        self.len += space;
        Ok(())
    }
}
