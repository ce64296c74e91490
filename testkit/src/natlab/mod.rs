//! The NAT lab: a small internet in network namespaces, with NAT routers made by the Linux
//! kernel (nftables), so tests can prove hole punching against real NAT behaviour.
//!
//! A module of the test kit (`p2ptun_testkit::natlab`), whose [`kit`](crate::kit) starts S
//! and agents on lab hosts.
//! Needs root, `ip` (iproute2) and `nft` (nftables); start every test with
//! `if !natlab::require_root() { return; }`.
//!
//! # Topology and addresses
//!
//! - **internet**: namespace `<lab>-inet` with bridge `br0`, no address of its own. Its
//!   addresses are TEST-NET-3, 203.0.113.0/24, and 2001:db8::/64 ([`INTERNET6`]), all
//!   on-link; no namespace has a route to anything else but the IPv6 LAN prefixes below, and
//!   nothing is connected to the root namespace.
//! - **S**: namespace `<lab>-s`, interface `eth0` with 203.0.113.1/24 and 203.0.113.2/24
//!   ([`S_ADDRS`], [`Lab::s_addrs`]) and always 2001:db8::1/64 and 2001:db8::2/64
//!   ([`S_ADDRS6`], [`Lab::s_addrs6`]); run the relay there (`lab.s().spawn(...)`) or the
//!   [`stun::Responder`].
//! - **public hosts and NAT WANs** get number n = 10, 11, … in creation order: 203.0.113.n
//!   and, with IPv6, 2001:db8::n (n's decimal digits as hex digits, so 2001:db8::10 goes
//!   with 203.0.113.10); interface `eth0` on a public host, `wan` on a router.
//! - **NAT router** number r (1, 2, … per lab): namespace `<lab>-r<r>`, LAN bridge `lan` with
//!   10.r.0.1/24; hosts behind it get 10.r.0.2, .3, … (interface `eth0`, default route via
//!   10.r.0.1). A carrier-grade outer router (for [`Nat::Double`]) has LAN 100.64.r.0/24
//!   instead; the inner router's `wan` is 100.64.r.2 with a default route via 100.64.r.1.
//! - **IPv6** (opt-in per router, [`RouterSpec::ipv6`], and per public host,
//!   [`Lab::add_public_host`]): router r's LAN is 2001:db8:<r>::/64 (2001:db8:64:<r>::/64 for
//!   a carrier-grade one), the router 2001:db8:<r>::1, hosts 2001:db8:<r>::2, ::3, … (the
//!   same n as their 10.r.0.n) with a default route via ::1. No NAT66: every namespace with
//!   IPv6 on the internet (S, IPv6 public hosts, IPv6 routers and ISP hops, whenever
//!   created) has a route to each prefix via its router's WAN address (for a double NAT,
//!   via the outer router, which routes it on to the inner one). Addresses are `nodad`,
//!   routers forward (`net.ipv6.conf.all.forwarding=1`), and adding an IPv6 host waits until
//!   it pings S over IPv6 (or its router, when its router passes no ICMPv6 outwards). An
//!   IPv6-only host ([`Stack::V6Only`], [`Lab::add_host_behind_with`]) has no IPv4 address
//!   or route at all.
//! - **ISP hop** ([`RouterSpec::isp_hop`]): namespace `<lab>-i<r>` between router r's `wan`
//!   (its `to-cpe`) and the bridge (its `to-inet`), forwarding with proxy ARP on both sides
//!   and a /32 route to the router's WAN address, so addresses stay as above but every
//!   packet to or from the router is forwarded once more (TTL one lower). Its own address,
//!   for ICMP errors, is 198.51.100.r (and 2001:db8:ffff::r). With IPv6 the router's WAN
//!   address is a /128 with a default route via the ISP's fe80::1, and the ISP answers
//!   neighbour solicitations for it on the bridge (proxy NDP).
//! - **hosts**: namespace `<lab>-h<n>`.
//! - **links with shaping**: namespace `<lab>-l<k>` holding the emulator's two veth ends,
//!   `to-nat` and `to-inet` (see [`emu`]); without shaping the WAN veth (or the ISP hop's
//!   `to-inet`) is plugged straight into the bridge.
//!
//! `<lab>` is `p2pl-<pid>-<n>`: the creating process and a per-process counter, so labs of
//! parallel tests never collide, and [`Lab::new`] removes namespaces whose PID is dead.
//! IPv6 is disabled in every lab namespace that does not ask for it (routers with
//! [`Ipv6::Off`], the default, their hosts, IPv4-only public hosts, the internet's and the
//! links' namespaces), so IPv4-only labs behave as before; S always has it. Bridge netfilter
//! is off.
//!
//! # Presets ([`Nat`])
//!
//! | preset | mapping | filtering (UDP) |
//! |---|---|---|
//! | `public` | none (own 203.0.113.x address) | none |
//! | `easy` | endpoint-independent (`masquerade`, keeps the port when free) | address and port dependent |
//! | `fullcone` | endpoint-independent | endpoint-independent (map `@fc` + prerouting DNAT) |
//! | `restricted` | endpoint-independent | address-dependent (map `@fc` + set `@rs`) |
//! | `hard` | endpoint-dependent (`masquerade random`) | address and port dependent |
//! | `double` | `easy` behind a carrier-grade `easy` (100.64.r.0/24) | as easy |
//! | `udp-blocked` | TCP as easy; all forwarded UDP dropped | — |
//! | `tcp-to-S-only` | TCP to S's two addresses only (as easy); everything else dropped | — |
//!
//! More router kinds are [`RouterSpec`] fields on these presets (not [`Nat`] variants, so
//! code matching every `Nat` and `Nat::ALL`, which the grid and the netcheck test iterate,
//! stay as they are):
//!
//! | spec | name | what |
//! |---|---|---|
//! | [`RouterSpec::sequential`]`(step)` | `sequential`, `sequential-N` | `hard` whose public ports count: 20000, +step, … per new mapping (kernel `snat … numgen inc`, see [`RouterSpec::sequential_step`]) |
//! | [`RouterSpec::easy_open`]`()` | `easy-open` | `easy` without input firewall ([`RouterSpec::open_wan`]), behind an ISP hop ([`RouterSpec::isp_hop`]) |
//! | `ipv6: Ipv6::Firewall` | `…+ipv6-firewall` | IPv6 routed, WAN to LAN only established/related (home router) |
//! | `ipv6: Ipv6::Drop` | `…+ipv6-drop` | hosts have IPv6 addresses; nothing IPv6 is forwarded |
//! | `ipv6: Ipv6::Open` | `…+ipv6-open` | IPv6 routed unfiltered |
//!
//! [`RouterSpec::named`] and [`RouterSpec::name`] go between specs and these names. With IPv6
//! on, `udp-blocked` drops forwarded IPv6 UDP as well and `tcp-to-S-only` passes only TCP to
//! S's IPv6 addresses.
//!
//! Every router masquerades only its LAN prefix and drops unsolicited traffic to itself
//! from its WAN side (`input`: established/related accepted, rest dropped; IPv6 neighbour
//! discovery accepted), unless [`RouterSpec::open_wan`]. The exact rules
//! are in [`rules`]; [`Lab::nft_ruleset`] prints a router's. Same LAN: two hosts behind one
//! router ([`Lab::add_same_lan_pair`]); they reach each other by LAN address (bridged).
//! Hairpinning (LAN host → router's public address:port → other LAN host) is off by default,
//! as with plain Linux masquerade; [`RouterSpec::hairpin`] turns it on (UDP only).
//!
//! # API
//!
//! ```ignore
//! if !natlab::require_root() { return; }
//! let lab = Lab::new()?;                                 // internet + S
//! let a = lab.add_host(Nat::Easy, Shaping { delay_ms: 50, loss_pct: 2.0 })?;
//! let b = lab.add_host(Nat::Hard, Shaping::none())?;
//! let (c, d) = lab.add_same_lan_pair(Nat::FullCone, Shaping::none())?;
//! let r = lab.add_router_with(RouterSpec { udp_timeout: Some(10), hairpin: true,
//!                                          ..RouterSpec::new(Nat::Restricted) })?;
//! let e = lab.add_host_behind(&r)?;                      // more hosts on r's LAN
//! let (s1, s2) = lab.s_addrs();                          // 203.0.113.1, 203.0.113.2
//! let relay = lab.s().spawn(Command::new(relay_bin).args(["--listen", "203.0.113.1:7000"]))?;
//! let mut cmd = a.command(env!("CARGO_BIN_EXE_p2ptun"))?; // a Command that runs in a's netns
//! let sock = a.udp_bind("0.0.0.0:0".parse()?)?;          // a socket in a's namespace
//! let v = a.run_in(|| std::fs::read_to_string("/proc/thread-self/net/udp")); // any closure, in a's netns
//! a.ip(); a.public_ip(); a.ns(); a.gateway(); a.nat();   // 10.r.0.x, 203.0.113.x, …
//! lab.set_udp_timeout(&a, 10)?;                          // conntrack + map timeouts, a's NATs
//! lab.block(&a, Block::Udp)?; lab.unblock(&a)?;          // drop rules in a's (inner) NAT
//! let r6 = lab.add_router_with(RouterSpec { ipv6: Ipv6::Firewall, ..RouterSpec::new(Nat::Easy) })?;
//! let f = lab.add_host_behind(&r6)?;                     // dual stack: f.ip6() == Some(2001:db8:r::2)
//! let g = lab.add_host_behind_with(&r6, Stack::V6Only)?; // no IPv4 at all: !g.has_ipv4()
//! let p = lab.add_public_host(Stack::Dual, Shaping::none())?; // 203.0.113.n + 2001:db8::n
//! let q = lab.add_host_with(RouterSpec::sequential(2))?; // mapped ports 20000, 20002, …
//! let o = lab.add_host_with(RouterSpec::easy_open())?;   // open WAN, one hop further
//! let ct = lab.router_of(&o).unwrap().conntrack()?;      // the router's conntrack entries
//! let stats = lab.link_stats(&a);                        // emulator counters, if shaped
//! print!("{}", lab.nft_ruleset(&a));                     // a's router's rules
//! let m = natlab::stun::binding(&sock, "203.0.113.1:7000".parse()?, wait, 3)?; // mapping
//! ```
//!
//! Processes started with [`Host::spawn`] or [`Host::command`] run in the host's namespace
//! (a `setns` before `exec`) with the command's own stdio settings. Sockets opened in
//! [`Host::run_in`] (or the `udp_bind`/`tcp_*` helpers) keep their namespace and can be used
//! from any thread, also turned into tokio sockets with `from_std` (set non-blocking first).
//! A tokio runtime whose sockets are all made that way needs no namespace of its own.
//!
//! `Drop for Lab` stops the link emulators, SIGKILLs every process living in the lab's
//! namespaces (also grandchildren) and deletes the namespaces; errors are logged, not raised.
//!
//! # Link shaping
//!
//! [`Shaping`] applies to the WAN link of a router (the outer one for `double`; with an ISP
//! hop, the hop's link to the internet) or of a public host: `delay_ms` in each direction,
//! `loss_pct` of IPv4 and IPv6 frames dropped in each direction independently (so a round
//! trip is lost with about 1-(1-p)² probability). ARP and IPv6 neighbour discovery are
//! delayed but never lost. Frames are segmented before they reach the emulator
//! (`gso_max_segs 1` on the devices feeding it), so loss hits single packets. There is no
//! jitter, reordering or rate limit.
//!
//! # Limits
//!
//! - Full-cone and restricted state (`@fc`, `@rs`) lives `udp_timeout` seconds (default
//!   120) after the host's last outbound packet on the mapping; inbound traffic does not
//!   refresh it (conntrack entries of flows in progress do live on).
//! - [`Lab::set_udp_timeout`] applies to state refreshed afterwards.
//! - Hairpinning is UDP only, and presents the sender as the router's public address with
//!   the sender's own port when free (not its mapped port under `hard`).
//! - Blocks act on forwarded traffic: LAN-to-LAN traffic of a same-LAN pair is bridged and
//!   not affected. They act on IPv6 too where the router (or public host) has it.
//! - IPv6 has no NAT, so full-cone/restricted/hairpin/sequential behaviour is IPv4 only;
//!   IPv6 filtering is the router's [`Ipv6`] policy (conntrack-based for `Firewall`).
//! - The sequential NAT's counter wraps after at most 4096 mappings, and a port that is
//!   already used towards the same remote endpoint is not skipped: that connection's first
//!   packet is dropped (see [`RouterSpec::sequential_step`]).

#![allow(dead_code)]

pub mod emu;
pub mod netns;
pub mod rules;
pub mod stun;
pub mod upnpd;

pub use emu::LinkStats;
pub use netns::CtEntry;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use emu::Emulator;
use rules::RouterRules;

/// S's two addresses (RFC 5780 needs two).
pub const S_ADDRS: [Ipv4Addr; 2] = [Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)];
/// Where the lab's S (`p2ptun-relay`) listens for QUIC, STUN and TCP: on [`S_ADDRS`]`[0]`,
/// the relay's default port. Every lab test and the benchmark start it there.
pub const S_LISTEN: &str = "203.0.113.1:7000";
/// S's second STUN address (`--stun-alt`), on its other IP ([`S_ADDRS`]`[1]`), so that
/// agents can tell how their NAT maps and filters.
pub const S_ALT: &str = "203.0.113.2:7001";
/// S's two IPv6 addresses, on the internet's prefix [`INTERNET6`] (always configured; only
/// namespaces with IPv6 on can reach them).
pub const S_ADDRS6: [Ipv6Addr; 2] = [
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2),
];
/// [`S_LISTEN`]'s IPv6 twin (S's relay must be told to listen there too).
pub const S_LISTEN6: &str = "[2001:db8::1]:7000";
/// [`S_ALT`]'s IPv6 twin.
pub const S_ALT6: &str = "[2001:db8::2]:7001";
/// The internet's IPv6 prefix (on-link on the internet bridge).
pub const INTERNET6: &str = "2001:db8::/64";
/// The first public port a sequential NAT ([`RouterSpec::sequential`]) hands out.
pub const SEQUENTIAL_FIRST_PORT: u16 = 20000;
/// How long a new link may take to come up.
const UP_TIMEOUT: Duration = Duration::from_secs(5);
/// The first address given to a public host or router WAN.
const FIRST_PUBLIC: u8 = 10;
/// How long full-cone / restricted state lives without outbound traffic when no UDP timeout
/// is set (the kernel's default `nf_conntrack_udp_timeout_stream`).
const DEFAULT_STATE_TIMEOUT: u32 = 120;

/// The behaviour of a host's connection to the internet. See the module docs' table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Nat {
    /// No NAT: the host has a 203.0.113.x address on the internet bridge.
    Public,
    /// Endpoint-independent mapping, address-and-port-dependent filtering (`masquerade`).
    Easy,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    Restricted,
    /// Endpoint-dependent mapping (`masquerade random`), port-dependent filtering.
    Hard,
    /// An `Easy` NAT behind a carrier-grade `Easy` NAT.
    Double,
    /// All UDP dropped; TCP NATed as `Easy`.
    UdpBlocked,
    /// Only TCP to S's addresses passes (NATed as `Easy`).
    TcpToSOnly,
}

impl Nat {
    /// Every preset, in a stable order.
    pub const ALL: [Nat; 8] = [
        Nat::Public,
        Nat::Easy,
        Nat::FullCone,
        Nat::Restricted,
        Nat::Hard,
        Nat::Double,
        Nat::UdpBlocked,
        Nat::TcpToSOnly,
    ];

    /// The preset's name as in the issue text ("easy", "tcp-to-S-only", …).
    pub fn name(self) -> &'static str {
        match self {
            Nat::Public => "public",
            Nat::Easy => "easy",
            Nat::FullCone => "fullcone",
            Nat::Restricted => "restricted",
            Nat::Hard => "hard",
            Nat::Double => "double",
            Nat::UdpBlocked => "udp-blocked",
            Nat::TcpToSOnly => "tcp-to-S-only",
        }
    }

    /// The preset called `name` (case-insensitive).
    pub fn from_name(name: &str) -> Option<Nat> {
        Nat::ALL
            .into_iter()
            .find(|n| n.name().eq_ignore_ascii_case(name))
    }

    /// Whether UDP passes at all (to S and peers).
    pub fn passes_udp(self) -> bool {
        !matches!(self, Nat::UdpBlocked | Nat::TcpToSOnly)
    }

    /// Whether the mapping is the same for every destination (public counts as yes).
    pub fn endpoint_independent_mapping(self) -> bool {
        !matches!(self, Nat::Hard)
    }
}

impl fmt::Display for Nat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Delay and loss on a WAN link (each direction). `Shaping::none()` plugs the link straight
/// into the internet bridge, without the emulator.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Shaping {
    /// One-way delay, milliseconds.
    pub delay_ms: u64,
    /// Share of IP frames dropped per direction, percent (0–100); ARP and IPv6 neighbour
    /// discovery are never dropped.
    pub loss_pct: f64,
}

impl Shaping {
    /// No shaping.
    pub const fn none() -> Shaping {
        Shaping {
            delay_ms: 0,
            loss_pct: 0.0,
        }
    }

    /// Only a one-way delay.
    pub const fn delay(ms: u64) -> Shaping {
        Shaping {
            delay_ms: ms,
            loss_pct: 0.0,
        }
    }

    /// Only loss.
    pub const fn loss(pct: f64) -> Shaping {
        Shaping {
            delay_ms: 0,
            loss_pct: pct,
        }
    }

    /// Whether this is no shaping at all.
    pub fn is_none(&self) -> bool {
        self.delay_ms == 0 && self.loss_pct <= 0.0
    }
}

/// IPv6 on a router and its LAN ([`RouterSpec::ipv6`]). There is no NAT66: hosts get
/// global addresses in the router's prefix, and the internet routes that prefix to the
/// router's WAN address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Ipv6 {
    /// No IPv6 on the router or its hosts (disabled in their namespaces), as before IPv6.
    #[default]
    Off,
    /// What home routers do: LAN to WAN passes, WAN to LAN only established/related
    /// (`iifname wan ct state established,related accept; iifname wan drop`).
    Firewall,
    /// Hosts have IPv6 addresses (and reach the router), but no IPv6 is forwarded either way.
    Drop,
    /// Routed, nothing filtered.
    Open,
}

impl Ipv6 {
    /// "off", "firewall", "drop", "open".
    pub fn name(self) -> &'static str {
        match self {
            Ipv6::Off => "off",
            Ipv6::Firewall => "firewall",
            Ipv6::Drop => "drop",
            Ipv6::Open => "open",
        }
    }

    /// Whether a LAN host's own IPv6 traffic to the internet passes.
    pub fn passes_outbound(self) -> bool {
        matches!(self, Ipv6::Firewall | Ipv6::Open)
    }
}

/// Which IP versions a host has ([`Lab::add_host_behind_with`], [`Lab::add_public_host`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stack {
    /// IPv4 only (IPv6 disabled in the namespace).
    V4,
    /// IPv4 and IPv6.
    Dual,
    /// IPv6 only: no IPv4 address or route at all (`Host::ip()` is 0.0.0.0).
    V6Only,
}

impl Stack {
    /// Whether the host has IPv4.
    pub fn v4(self) -> bool {
        self != Stack::V6Only
    }

    /// Whether the host has IPv6.
    pub fn v6(self) -> bool {
        self != Stack::V4
    }
}

/// Traffic [`Lab::block`] drops in a host's (innermost) NAT router, both directions; on a
/// public host, in its own input and output. IPv4 and, where the router or host has it, IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Block {
    /// All UDP.
    Udp,
    /// All TCP.
    Tcp,
    /// Everything.
    All,
}

/// Everything about a NAT router that [`Lab::add_router_with`] takes.
#[derive(Clone, Debug)]
pub struct RouterSpec {
    pub nat: Nat,
    pub shaping: Shaping,
    /// conntrack UDP timeouts (both `nf_conntrack_udp_timeout` and `..._stream`) and the
    /// lifetime of full-cone/restricted state, seconds; `None` keeps the kernel's defaults.
    pub udp_timeout: Option<u32>,
    /// LAN hosts can reach each other through the router's public address (UDP).
    pub hairpin: bool,
    /// IPv6 on the router and its hosts (default [`Ipv6::Off`]). For `Double` it is the
    /// inner (home) router's policy; the carrier-grade router then routes IPv6 unfiltered.
    pub ipv6: Ipv6,
    /// `Some(step)`: a counting NAT. Each new mapping (TCP or UDP connection, i.e. each new
    /// destination) gets the next public port: [`SEQUENTIAL_FIRST_PORT`], then `+step`, …
    /// (wrapping after at most 4096 mappings). Needs `nat: Nat::Hard` (endpoint-dependent
    /// mapping, address-and-port-dependent filtering), which it refines; see
    /// [`RouterSpec::sequential`]. `None` (default): the preset's own port choice.
    ///
    /// Made by the kernel: a NAT chain sees only the first packet of a connection, so
    /// `snat ip to WAN : numgen inc mod N map { 0 : P0, 1 : P0+step, … }` (chain `seqnat`,
    /// before the preset's masquerade) moves the counter once per new conntrack entry; checked
    /// in the lab (ports 20000, +step, … per new destination; a repeated destination keeps
    /// its mapping). What was tried: `numgen inc mod N offset P0` (no map) gives byte-swapped
    /// ports with nft 1.0.6 (host-order number read as a network-order port: steps of 256).
    /// Limits: the kernel does not look for a free port when the counter's port is already
    /// used towards the same remote address and port (after a wrap): it drops that
    /// connection's first packet (conntrack `insert_failed`) and the next one gets the next
    /// port; ICMP is masqueraded and does not count.
    pub sequential_step: Option<u16>,
    /// No input firewall: unsolicited packets to the router's WAN address reach the router
    /// itself (and create conntrack entries for it, which can push a LAN host's later
    /// mapping of the same port to another port), like cheap CPEs. For `Double`, the inner
    /// router's. IPv6 too (neighbour discovery is always let in).
    pub open_wan: bool,
    /// An "ISP" router between the WAN and the internet bridge (namespace `<lab>-i<r>`), so
    /// every packet to or from this router is forwarded once more (TTL / hop limit one
    /// lower) while the address plan stays the same (proxy ARP and proxy NDP). For `Double`,
    /// in front of the carrier-grade router.
    pub isp_hop: bool,
}

impl RouterSpec {
    pub fn new(nat: Nat) -> RouterSpec {
        RouterSpec {
            nat,
            shaping: Shaping::none(),
            udp_timeout: None,
            hairpin: false,
            ipv6: Ipv6::Off,
            sequential_step: None,
            open_wan: false,
            isp_hop: false,
        }
    }

    /// The counting NAT ("sequential", or "sequential-N" for step N): `Hard` with public
    /// ports [`SEQUENTIAL_FIRST_PORT`], `+step`, `+2·step`, … in order of new mappings.
    pub fn sequential(step: u16) -> RouterSpec {
        RouterSpec {
            sequential_step: Some(step),
            ..RouterSpec::new(Nat::Hard)
        }
    }

    /// A cheap CPE ("easy-open"): `Easy` without input firewall on the WAN side, behind an
    /// ISP hop ([`RouterSpec::open_wan`], [`RouterSpec::isp_hop`]).
    pub fn easy_open() -> RouterSpec {
        RouterSpec {
            open_wan: true,
            isp_hop: true,
            ..RouterSpec::new(Nat::Easy)
        }
    }

    /// The spec called `name`: a [`Nat`] name (not "public"), "sequential",
    /// "sequential-N" or "easy-open" (case-insensitive).
    pub fn named(name: &str) -> Option<RouterSpec> {
        let lower = name.to_ascii_lowercase();
        if lower == "easy-open" {
            return Some(RouterSpec::easy_open());
        }
        if lower == "sequential" {
            return Some(RouterSpec::sequential(1));
        }
        if let Some(step) = lower.strip_prefix("sequential-") {
            return step
                .parse::<u16>()
                .ok()
                .filter(|&s| s >= 1)
                .map(RouterSpec::sequential);
        }
        Nat::from_name(name)
            .filter(|&n| n != Nat::Public)
            .map(RouterSpec::new)
    }

    /// A short name: the preset's ("hard", "sequential-2", "easy-open", …), plus
    /// "+open-wan", "+isp-hop" and "+ipv6-<policy>" for what the preset does not say.
    pub fn name(&self) -> String {
        let easy_open = self.nat == Nat::Easy && self.open_wan && self.isp_hop;
        let mut name = match self.sequential_step {
            Some(1) => "sequential".to_owned(),
            Some(step) => format!("sequential-{step}"),
            None if easy_open => "easy-open".to_owned(),
            None => self.nat.name().to_owned(),
        };
        if self.open_wan && !easy_open {
            name += "+open-wan";
        }
        if self.isp_hop && !easy_open {
            name += "+isp-hop";
        }
        if self.ipv6 != Ipv6::Off {
            name += "+ipv6-";
            name += self.ipv6.name();
        }
        name
    }
}

/// A host in the lab (cheap to clone; it only names the namespace and addresses).
#[derive(Clone, Debug)]
pub struct Host {
    ns: String,
    ip: Ipv4Addr,
    gateway: Option<Ipv4Addr>,
    public_ip: Ipv4Addr,
    nat: Nat,
    router: Option<usize>,
    has_ipv4: bool,
    ip6: Option<Ipv6Addr>,
    gateway6: Option<Ipv6Addr>,
}

impl Host {
    /// The host's network namespace (for `ip netns exec`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The host's own address (a 10.x LAN address behind a NAT, 203.0.113.x when public;
    /// 0.0.0.0 for an IPv6-only host).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Same as [`Host::ip`].
    pub fn lan_ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The address the internet sees the host's traffic come from (its outermost NAT's WAN
    /// address, or its own when public; 0.0.0.0 for an IPv6-only host).
    pub fn public_ip(&self) -> Ipv4Addr {
        self.public_ip
    }

    /// Whether the host has IPv4 (false for [`Stack::V6Only`]).
    pub fn has_ipv4(&self) -> bool {
        self.has_ipv4
    }

    /// The host's IPv6 address, if it has IPv6: 2001:db8:<r>::<n> behind router r,
    /// 2001:db8::<n> when public. Global (no NAT66), so also what the internet sees.
    pub fn ip6(&self) -> Option<Ipv6Addr> {
        self.ip6
    }

    /// The IPv6 default gateway (the router's LAN address 2001:db8:<r>::1), if behind a
    /// router with IPv6.
    pub fn gateway6(&self) -> Option<Ipv6Addr> {
        self.gateway6
    }

    /// The default gateway (the NAT router's LAN address), if behind a NAT.
    pub fn gateway(&self) -> Option<Ipv4Addr> {
        self.gateway
    }

    /// The preset the host was added with.
    pub fn nat(&self) -> Nat {
        self.nat
    }

    /// Runs `f` on a thread inside the host's namespace and returns its result; sockets it
    /// opens stay in the namespace. Panics if the namespace is gone.
    pub fn run_in<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        netns::run_in(&self.ns, f)
            .unwrap_or_else(|e| panic!("natlab: cannot enter namespace {}: {e}", self.ns))
    }

    /// A command that runs `program` inside the host's namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> io::Result<Command> {
        netns::command(&self.ns, program)
    }

    /// Spawns `cmd` inside the host's namespace (its stdio etc. as configured). The lab kills
    /// it on drop if it still runs.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        netns::prepare(cmd, &self.ns)?;
        cmd.spawn()
    }

    /// A UDP socket bound to `addr` inside the host's namespace.
    pub fn udp_bind(&self, addr: SocketAddr) -> io::Result<UdpSocket> {
        self.run_in(|| UdpSocket::bind(addr))
    }

    /// A TCP listener bound to `addr` inside the host's namespace.
    pub fn tcp_listen(&self, addr: SocketAddr) -> io::Result<TcpListener> {
        self.run_in(|| TcpListener::bind(addr))
    }

    /// A TCP connection to `addr` made from inside the host's namespace.
    pub fn tcp_connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        self.run_in(|| TcpStream::connect_timeout(&addr, timeout))
    }
}

/// A NAT router in the lab.
#[derive(Clone, Debug)]
pub struct Router {
    idx: usize,
    ns: String,
    nat: Nat,
    wan_ip: Ipv4Addr,
    public_ip: Ipv4Addr,
    lan_gateway: Ipv4Addr,
    ipv6: Ipv6,
    wan_ip6: Option<Ipv6Addr>,
    lan_prefix6: Option<Ipv6Addr>,
    isp_ns: Option<String>,
    sequential_step: Option<u16>,
    open_wan: bool,
}

impl Router {
    /// The router's namespace.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The preset (`Double` for the inner router of a double NAT).
    pub fn nat(&self) -> Nat {
        self.nat
    }

    /// The router's WAN address (100.64.x.2 for the inner router of a double NAT).
    pub fn wan_ip(&self) -> Ipv4Addr {
        self.wan_ip
    }

    /// The address the internet sees (the outer router's WAN for a double NAT).
    pub fn public_ip(&self) -> Ipv4Addr {
        self.public_ip
    }

    /// The router's LAN address (its hosts' gateway).
    pub fn lan_gateway(&self) -> Ipv4Addr {
        self.lan_gateway
    }

    /// The router's IPv6 policy (for the inner router of a double NAT, the one asked for).
    pub fn ipv6(&self) -> Ipv6 {
        self.ipv6
    }

    /// The router's WAN IPv6 address (2001:db8::<n>, or 2001:db8:64:<r>::2 for the inner
    /// router of a double NAT), if it has IPv6.
    pub fn wan_ip6(&self) -> Option<Ipv6Addr> {
        self.wan_ip6
    }

    /// The router's LAN prefix (a /64: 2001:db8:<r>::), if it has IPv6.
    pub fn lan_prefix6(&self) -> Option<Ipv6Addr> {
        self.lan_prefix6
    }

    /// The router's LAN IPv6 address (its hosts' IPv6 gateway), if it has IPv6.
    pub fn lan_gateway6(&self) -> Option<Ipv6Addr> {
        self.lan_prefix6.map(|p| lan_addr6(p, 1))
    }

    /// The namespace of the ISP hop in front of the router ([`RouterSpec::isp_hop`]; for a
    /// double NAT, in front of the outer router), if any.
    pub fn isp_ns(&self) -> Option<&str> {
        self.isp_ns.as_deref()
    }

    /// The sequential NAT's step ([`RouterSpec::sequential_step`]), if it counts.
    pub fn sequential_step(&self) -> Option<u16> {
        self.sequential_step
    }

    /// Whether the router takes unsolicited input on its WAN side ([`RouterSpec::open_wan`]).
    pub fn open_wan(&self) -> bool {
        self.open_wan
    }

    /// The router's conntrack entries with ports (UDP, TCP), from `/proc/net/nf_conntrack`
    /// in its namespace.
    pub fn conntrack(&self) -> io::Result<Vec<CtEntry>> {
        netns::conntrack(&self.ns)
    }
}

struct RouterState {
    ns: String,
    rules: RouterRules,
    upstream: Option<usize>,
    lan_prefix: [u8; 3],
    next_lan_host: u8,
    /// WAN address and LAN prefix, if the router has IPv6.
    v6: Option<(Ipv6Addr, Ipv6Addr)>,
    /// The policy asked for (for the inner router of a double NAT, `rules.ipv6` is it too).
    ipv6: Ipv6,
    isp: Option<String>,
    sequential_step: Option<u16>,
}

/// A namespace on the internet with IPv6 on: it gets a route to every IPv6 LAN prefix.
struct Member6 {
    ns: String,
    dev: String,
    /// The top-level router this is (it routes its own prefixes itself).
    router: Option<usize>,
    /// The top-level router this ISP hop is in front of (routes its prefixes to `to-cpe`).
    isp_of: Option<usize>,
}

/// An IPv6 LAN prefix (/64) the internet routes to top-level router `router`'s WAN `via`.
struct Route6 {
    prefix: Ipv6Addr,
    via: Ipv6Addr,
    router: usize,
}

/// What [`Lab::new_router`] builds.
struct RouterPlan {
    preset: Nat,
    upstream: Option<usize>,
    shaping: Shaping,
    cgn: bool,
    udp_timeout: Option<u32>,
    hairpin: bool,
    ipv6: Ipv6,
    open_wan: bool,
    sequential_step: Option<u16>,
    isp_hop: bool,
}

#[derive(Default)]
struct State {
    /// Every namespace created (or being created), in creation order.
    namespaces: Vec<String>,
    next_public: u8,
    next_router: u8,
    next_host: u32,
    next_link: u32,
    routers: Vec<RouterState>,
    /// Block lists by the namespace holding the `labblock` table.
    blocks: HashMap<String, Vec<Block>>,
    /// Link emulators by the namespace whose WAN link they shape.
    emulators: HashMap<String, Emulator>,
    /// The UDP timeout of routers whose spec has none.
    default_udp_timeout: Option<u32>,
    /// Namespaces on the internet with IPv6 on.
    members6: Vec<Member6>,
    /// IPv6 LAN prefixes the internet routes.
    routes6: Vec<Route6>,
}

/// One lab: its namespaces, routers and link emulators. Dropping it removes everything.
pub struct Lab {
    id: String,
    inet: String,
    s: String,
    state: Mutex<State>,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// Builds the internet bridge and S (203.0.113.1 and .2). Removes stale namespaces of dead
    /// processes first.
    pub fn new() -> io::Result<Lab> {
        netns::remove_stale();
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{}-{}", netns::PREFIX, std::process::id(), n);
        let lab = Lab {
            inet: format!("{id}-inet"),
            s: format!("{id}-s"),
            id,
            state: Mutex::new(State {
                next_public: FIRST_PUBLIC,
                next_router: 1,
                next_host: 1,
                ..State::default()
            }),
        };
        {
            let mut st = lab.lock();
            lab.create_ns(&mut st, &lab.inet, false)?;
            netns::ip_batch(
                &lab.inet,
                &[
                    // Brought up with its first port (see `bring_up_bridge`). No multicast
                    // snooping: IPv6 neighbour discovery is multicast and must reach everyone.
                    "link add name br0 type bridge mcast_snooping 0".into(),
                ],
            )?;
            lab.create_ns(&mut st, &lab.s, true)?;
            let s = lab.s.clone();
            lab.attach(
                &mut st,
                &s,
                "eth0",
                &S_ADDRS,
                &S_ADDRS6,
                Shaping::none(),
                &s,
            )?;
            lab.join_internet6(&mut st, &s, "eth0", None, None)?;
        }
        Ok(lab)
    }

    /// The lab's name prefix, `p2pl-<pid>-<n>`; every namespace of the lab starts with it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The internet's namespace (bridge `br0`).
    pub fn internet_ns(&self) -> &str {
        &self.inet
    }

    /// S's namespace.
    pub fn s_ns(&self) -> &str {
        &self.s
    }

    /// S's two addresses, 203.0.113.1 and 203.0.113.2.
    pub fn s_addrs(&self) -> (Ipv4Addr, Ipv4Addr) {
        (S_ADDRS[0], S_ADDRS[1])
    }

    /// S's two IPv6 addresses, 2001:db8::1 and 2001:db8::2.
    pub fn s_addrs6(&self) -> (Ipv6Addr, Ipv6Addr) {
        (S_ADDRS6[0], S_ADDRS6[1])
    }

    /// S as a host (spawn the relay in it, open sockets in it).
    pub fn s(&self) -> Host {
        Host {
            ns: self.s.clone(),
            ip: S_ADDRS[0],
            gateway: None,
            public_ip: S_ADDRS[0],
            nat: Nat::Public,
            router: None,
            has_ipv4: true,
            ip6: Some(S_ADDRS6[0]),
            gateway6: None,
        }
    }

    /// The UDP timeout (see [`RouterSpec::udp_timeout`]) of routers added from now on whose
    /// spec sets none (`add_host`, `add_router`, `add_same_lan_pair`).
    pub fn set_default_udp_timeout(&self, secs: Option<u32>) {
        self.lock().default_udp_timeout = secs;
    }

    /// The names of the lab's namespaces.
    pub fn namespaces(&self) -> Vec<String> {
        self.lock().namespaces.clone()
    }

    /// A host with its own router of preset `nat` (or none for `Public`), with `shaping` on
    /// the WAN link.
    pub fn add_host(&self, nat: Nat, shaping: Shaping) -> io::Result<Host> {
        if nat == Nat::Public {
            return self.add_public_host(Stack::V4, shaping);
        }
        let router = self.add_router(nat, shaping)?;
        self.add_host_behind(&router)
    }

    /// A host with its own router as `spec` says (see [`Lab::add_host_behind`]).
    pub fn add_host_with(&self, spec: RouterSpec) -> io::Result<Host> {
        let router = self.add_router_with(spec)?;
        self.add_host_behind(&router)
    }

    /// A public host (no NAT) with the IP versions of `stack`: 203.0.113.<n> and/or
    /// 2001:db8::<n> (one number per public host or router WAN, in creation order). With
    /// IPv6, returns once the host can ping S over IPv6.
    pub fn add_public_host(&self, stack: Stack, shaping: Shaping) -> io::Result<Host> {
        let mut st = self.lock();
        let h = st.next_host;
        st.next_host += 1;
        let ns = format!("{}-h{h}", self.id);
        self.create_ns(&mut st, &ns, stack.v6())?;
        let n = self.alloc_public(&mut st)?;
        let (ip, ip6) = (public_addr(n), public_addr6(n));
        let v4: &[Ipv4Addr] = if stack.v4() { &[ip] } else { &[] };
        let v6: &[Ipv6Addr] = if stack.v6() { &[ip6] } else { &[] };
        self.attach(&mut st, &ns, "eth0", v4, v6, shaping, &ns)?;
        if stack.v6() {
            self.join_internet6(&mut st, &ns, "eth0", None, None)?;
            netns::wait_ping6(&ns, S_ADDRS6[0], UP_TIMEOUT)?;
        }
        let ip = if stack.v4() {
            ip
        } else {
            Ipv4Addr::UNSPECIFIED
        };
        Ok(Host {
            ns,
            ip,
            gateway: None,
            public_ip: ip,
            nat: Nat::Public,
            router: None,
            has_ipv4: stack.v4(),
            ip6: stack.v6().then_some(ip6),
            gateway6: None,
        })
    }

    /// Two hosts on one LAN behind one router of preset `nat`.
    pub fn add_same_lan_pair(&self, nat: Nat, shaping: Shaping) -> io::Result<(Host, Host)> {
        let router = self.add_router(nat, shaping)?;
        Ok((
            self.add_host_behind(&router)?,
            self.add_host_behind(&router)?,
        ))
    }

    /// Two hosts behind one router of preset `nat` that cannot reach each other across the
    /// LAN (their bridge ports are isolated, like Wi-Fi client isolation): they meet only
    /// through the router's public address, which works when the router hairpins (`hairpin`,
    /// UDP only).
    pub fn add_same_nat_pair(
        &self,
        nat: Nat,
        hairpin: bool,
        shaping: Shaping,
    ) -> io::Result<(Host, Host)> {
        let router = self.add_router_with(RouterSpec {
            shaping,
            hairpin,
            ..RouterSpec::new(nat)
        })?;
        let pair = (
            self.add_host_behind(&router)?,
            self.add_host_behind(&router)?,
        );
        // `connect_to_lan` names each host's bridge port after its LAN address's last byte.
        let ports: Vec<String> = [&pair.0, &pair.1]
            .iter()
            .map(|h| {
                format!(
                    "link set dev h{} type bridge_slave isolated on",
                    h.lan_ip().octets()[3]
                )
            })
            .collect();
        netns::ip_batch(router.ns(), &ports)?;
        Ok(pair)
    }

    /// A NAT router without hosts (add them with [`Lab::add_host_behind`]).
    pub fn add_router(&self, nat: Nat, shaping: Shaping) -> io::Result<Router> {
        self.add_router_with(RouterSpec {
            shaping,
            ..RouterSpec::new(nat)
        })
    }

    /// A NAT router as `spec` says.
    pub fn add_router_with(&self, mut spec: RouterSpec) -> io::Result<Router> {
        let invalid = |msg: &str| Err(io::Error::new(io::ErrorKind::InvalidInput, msg.to_owned()));
        if let Some(step) = spec.sequential_step {
            if spec.nat != Nat::Hard || step == 0 {
                return invalid("a sequential NAT needs nat: Nat::Hard and a step of at least 1");
            }
        }
        let mut st = self.lock();
        spec.udp_timeout = spec.udp_timeout.or(st.default_udp_timeout);
        let plan = RouterPlan {
            preset: spec.nat,
            upstream: None,
            shaping: spec.shaping,
            cgn: false,
            udp_timeout: spec.udp_timeout,
            hairpin: spec.hairpin,
            ipv6: spec.ipv6,
            open_wan: spec.open_wan,
            sequential_step: spec.sequential_step,
            isp_hop: spec.isp_hop,
        };
        let (idx, public_ip) = match spec.nat {
            Nat::Public => return invalid("a public host has no router"),
            Nat::Double => {
                let outer = self.new_router(
                    &mut st,
                    RouterPlan {
                        preset: Nat::Easy,
                        cgn: true,
                        hairpin: false,
                        // The carrier routes IPv6 unfiltered; the home router filters.
                        ipv6: if spec.ipv6 == Ipv6::Off {
                            Ipv6::Off
                        } else {
                            Ipv6::Open
                        },
                        open_wan: false,
                        ..plan
                    },
                )?;
                let public_ip = st.routers[outer].rules.wan_ip;
                let inner = self.new_router(
                    &mut st,
                    RouterPlan {
                        preset: Nat::Easy,
                        upstream: Some(outer),
                        shaping: Shaping::none(),
                        isp_hop: false,
                        ..plan
                    },
                )?;
                (inner, public_ip)
            }
            _ => {
                let r = self.new_router(&mut st, plan)?;
                (r, st.routers[r].rules.wan_ip)
            }
        };
        Ok(self.router_handle(&st, idx, spec.nat, public_ip))
    }

    /// The public handle of router `idx`.
    fn router_handle(&self, st: &State, idx: usize, nat: Nat, public_ip: Ipv4Addr) -> Router {
        let r = &st.routers[idx];
        let mut outer = idx;
        for _ in 0..8 {
            match st.routers[outer].upstream {
                Some(up) => outer = up,
                None => break,
            }
        }
        Router {
            idx,
            ns: r.ns.clone(),
            nat,
            wan_ip: r.rules.wan_ip,
            public_ip,
            lan_gateway: prefix_addr(r.lan_prefix, 1),
            ipv6: r.ipv6,
            wan_ip6: r.v6.map(|v| v.0),
            lan_prefix6: r.v6.map(|v| v.1),
            isp_ns: st.routers[outer].isp.clone(),
            sequential_step: r.sequential_step,
            open_wan: r.rules.open_wan,
        }
    }

    /// A host on `router`'s LAN: dual-stack if the router has IPv6, else IPv4 only.
    pub fn add_host_behind(&self, router: &Router) -> io::Result<Host> {
        let stack = if router.ipv6 == Ipv6::Off {
            Stack::V4
        } else {
            Stack::Dual
        };
        self.add_host_behind_with(router, stack)
    }

    /// A host on `router`'s LAN with the IP versions of `stack` (IPv6 needs a router with
    /// IPv6): 10.r.0.<n> with a default route via 10.r.0.1, and/or 2001:db8:<r>::<n>/64 with a
    /// default route via 2001:db8:<r>::1. With IPv6, returns once the host can ping S over
    /// IPv6 (or its router, when the router's policy or preset passes no ICMPv6 outwards).
    pub fn add_host_behind_with(&self, router: &Router, stack: Stack) -> io::Result<Host> {
        self.check_own(&router.ns);
        if stack.v6() && router.lan_prefix6.is_none() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("router {} has IPv6 off: no IPv6 host behind it", router.ns),
            ));
        }
        let mut st = self.lock();
        let h = st.next_host;
        st.next_host += 1;
        let ns = format!("{}-h{h}", self.id);
        self.create_ns(&mut st, &ns, stack.v6())?;
        let (ip, ip6) =
            self.connect_to_lan(&mut st, router.idx, &ns, "eth0", stack.v4(), stack.v6())?;
        let mut routes = Vec::new();
        if stack.v4() {
            routes.push(format!("route add default via {}", router.lan_gateway));
        }
        let gateway6 = router.lan_gateway6().filter(|_| stack.v6());
        if let Some(gw6) = gateway6 {
            routes.push(format!("route add ::/0 via {gw6} dev eth0"));
        }
        netns::ip_batch(&ns, &routes)?;
        if let Some(gw6) = gateway6 {
            let passes = router.ipv6.passes_outbound() && router.nat != Nat::TcpToSOnly;
            let target = if passes { S_ADDRS6[0] } else { gw6 };
            netns::wait_ping6(&ns, target, UP_TIMEOUT)?;
        }
        Ok(Host {
            ns,
            ip: ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
            gateway: stack.v4().then_some(router.lan_gateway),
            public_ip: if stack.v4() {
                router.public_ip
            } else {
                Ipv4Addr::UNSPECIFIED
            },
            nat: router.nat,
            router: Some(router.idx),
            has_ipv4: stack.v4(),
            ip6,
            gateway6,
        })
    }

    /// The host's innermost router, if any.
    pub fn router_of(&self, host: &Host) -> Option<Router> {
        self.check_own(&host.ns);
        let idx = host.router?;
        let st = self.lock();
        let public_ip = {
            let mut outer = idx;
            for _ in 0..8 {
                match st.routers[outer].upstream {
                    Some(up) => outer = up,
                    None => break,
                }
            }
            st.routers[outer].rules.wan_ip
        };
        Some(self.router_handle(&st, idx, host.nat, public_ip))
    }

    /// Sets the conntrack UDP timeouts (`nf_conntrack_udp_timeout` and `..._stream`) and the
    /// full-cone/restricted state lifetime of every NAT between `host` and the internet.
    /// Applies to state refreshed from now on. No-op for a public host.
    pub fn set_udp_timeout(&self, host: &Host, secs: u32) -> io::Result<()> {
        self.check_own(&host.ns);
        let mut st = self.lock();
        let mut next = host.router;
        let mut guard = 0;
        while let Some(i) = next {
            guard += 1;
            if guard > 8 {
                break;
            }
            let r = &mut st.routers[i];
            r.rules.state_timeout = secs;
            set_conntrack_timeouts(&r.ns, secs)?;
            netns::nft(&r.ns, &rules::rules(&r.rules))?;
            next = r.upstream;
        }
        Ok(())
    }

    /// Starts miniupnpd on `router` (see [`upnpd`]) with the protocols `which` enables, after
    /// opening the router's rules for its port forwards and its STUN test. S (the relay, or a
    /// STUN responder answering CHANGE-REQUEST from its second address) must already run at
    /// `stun`. The daemon is killed when the returned handle or the lab is dropped.
    pub fn start_miniupnpd(
        &self,
        router: &Router,
        which: upnpd::Protocols,
        stun: SocketAddr,
    ) -> io::Result<upnpd::Miniupnpd> {
        self.check_own(&router.ns);
        let (ns, lan_net) = {
            let mut st = self.lock();
            let r = &mut st.routers[router.idx];
            r.rules.port_forwarding = true;
            netns::nft(&r.ns, &rules::rules(&r.rules))?;
            (r.ns.clone(), r.rules.lan_net.clone())
        };
        upnpd::Miniupnpd::start(&ns, &lan_net, which, stun)
    }

    /// Drops `what` in the host's innermost NAT router (both directions, forwarded traffic
    /// only: LAN-to-LAN traffic is bridged and unaffected), or in a public host's own input
    /// and output. Blocks add up until [`Lab::unblock`].
    pub fn block(&self, host: &Host, what: Block) -> io::Result<()> {
        self.check_own(&host.ns);
        let mut st = self.lock();
        let (ns, on_router, v6) = match host.router {
            Some(i) => (st.routers[i].ns.clone(), true, st.routers[i].v6.is_some()),
            None => (host.ns.clone(), false, host.ip6.is_some()),
        };
        if !on_router && !st.blocks.contains_key(&ns) {
            netns::nft(&ns, &rules::block_skeleton(v6))?;
        }
        let list = st.blocks.entry(ns.clone()).or_default();
        if !list.contains(&what) {
            list.push(what);
        }
        let script = rules::block_rules(list, on_router, v6);
        netns::nft(&ns, &script)
    }

    /// Removes every block of [`Lab::block`] for `host`.
    pub fn unblock(&self, host: &Host) -> io::Result<()> {
        self.check_own(&host.ns);
        let mut st = self.lock();
        let (ns, on_router, v6) = match host.router {
            Some(i) => (st.routers[i].ns.clone(), true, st.routers[i].v6.is_some()),
            None => (host.ns.clone(), false, host.ip6.is_some()),
        };
        if let Some(list) = st.blocks.get_mut(&ns) {
            list.clear();
            netns::nft(&ns, &rules::block_rules(&[], on_router, v6))?;
        }
        Ok(())
    }

    /// The counters of the link emulator on the host's WAN link (its outermost router's, or
    /// its own when public), if that link is shaped.
    pub fn link_stats(&self, host: &Host) -> Option<LinkStats> {
        self.check_own(&host.ns);
        let st = self.lock();
        let ns = match host.router {
            Some(mut i) => {
                for _ in 0..8 {
                    match st.routers[i].upstream {
                        Some(up) => i = up,
                        None => break,
                    }
                }
                st.routers[i].ns.clone()
            }
            None => host.ns.clone(),
        };
        st.emulators.get(&ns).map(|e| e.stats())
    }

    /// The nftables rule set of the host's innermost router (or of the host), for debugging.
    pub fn nft_ruleset(&self, host: &Host) -> String {
        self.check_own(&host.ns);
        let ns = match host.router {
            Some(i) => self.lock().routers[i].ns.clone(),
            None => host.ns.clone(),
        };
        netns::nft_list(&ns).unwrap_or_else(|e| format!("(nft list failed: {e})"))
    }

    /// Panics if `ns` (a host's or router's namespace) belongs to another lab.
    fn check_own(&self, ns: &str) {
        assert!(
            ns.starts_with(&format!("{}-", self.id)),
            "natlab: {ns} is not part of lab {}",
            self.id
        );
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates a namespace (recorded first, so a failure halfway is still cleaned up) with
    /// loopback up and bridge netfilter off; IPv6 off unless `ipv6`, and then without
    /// duplicate address detection, router advertisements or autoconfiguration.
    fn create_ns(&self, st: &mut State, ns: &str, ipv6: bool) -> io::Result<()> {
        st.namespaces.push(ns.to_owned());
        netns::add(ns)?;
        let off = if ipv6 { "0" } else { "1" };
        let mut optional = vec![
            ("net.ipv6.conf.all.disable_ipv6", off.to_owned()),
            ("net.ipv6.conf.default.disable_ipv6", off.to_owned()),
            ("net.bridge.bridge-nf-call-iptables", "0".into()),
            ("net.bridge.bridge-nf-call-ip6tables", "0".into()),
            ("net.bridge.bridge-nf-call-arptables", "0".into()),
        ];
        let mut required = Vec::new();
        if ipv6 {
            for key in [
                "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.default.accept_dad",
                "net.ipv6.conf.all.accept_ra",
                "net.ipv6.conf.default.accept_ra",
                "net.ipv6.conf.all.autoconf",
                "net.ipv6.conf.default.autoconf",
            ] {
                required.push((key, "0".to_owned()));
            }
            optional.push(("net.ipv6.conf.default.router_solicitations", "0".into()));
        }
        netns::sysctls(ns, &required, &optional)?;
        netns::ip_batch(ns, &["link set dev lo up".into()])
    }

    /// The next public number n (203.0.113.n and 2001:db8::n).
    fn alloc_public(&self, st: &mut State) -> io::Result<u8> {
        if st.next_public >= 250 {
            return Err(io::Error::other("natlab: out of 203.0.113.x addresses"));
        }
        let n = st.next_public;
        st.next_public += 1;
        Ok(n)
    }

    /// Plugs interface `ifname` of `ns` into the internet bridge with `addrs` (/24) and
    /// `addrs6` (/64), through a link emulator if `shaping` says so; the emulator is filed
    /// under `owner` (the namespace whose WAN link it shapes).
    #[allow(clippy::too_many_arguments)]
    fn attach(
        &self,
        st: &mut State,
        ns: &str,
        ifname: &str,
        addrs: &[Ipv4Addr],
        addrs6: &[Ipv6Addr],
        shaping: Shaping,
        owner: &str,
    ) -> io::Result<()> {
        let k = st.next_link;
        st.next_link += 1;
        let port = format!("p{k}");
        let inet = &self.inet;
        let mut link_ns = None;
        if shaping.is_none() {
            netns::ip_batch(
                ns,
                &[format!(
                    "link add name {ifname} type veth peer name {port} netns {inet}"
                )],
            )?;
        } else {
            let link = format!("{}-l{k}", self.id);
            self.create_ns(st, &link, false)?;
            netns::ip_batch(
                ns,
                &[format!(
                    "link add name {ifname} type veth peer name to-nat netns {link}"
                )],
            )?;
            netns::ip_batch(
                &link,
                &[
                    format!("link add name to-inet type veth peer name {port} netns {inet}"),
                    "link set dev to-nat promisc on up".into(),
                    "link set dev to-inet promisc on up".into(),
                ],
            )?;
            link_ns = Some(link);
        }
        // Into the emulator, frames go segmented (GSO off on the devices sending to it), so
        // loss hits single packets, not 64 KiB bursts.
        let segment = |dev: &str| -> Vec<String> {
            if link_ns.is_some() {
                vec![format!("link set dev {dev} gso_max_segs 1")]
            } else {
                Vec::new()
            }
        };
        let mut cmds = segment(&port);
        cmds.push(format!("link set dev {port} master br0"));
        cmds.push(format!("link set dev {port} up"));
        netns::ip_batch(inet, &cmds)?;
        let mut cmds = segment(ifname);
        cmds.extend(
            addrs
                .iter()
                .map(|a| format!("addr add {a}/24 dev {ifname}")),
        );
        cmds.extend(
            addrs6
                .iter()
                .map(|a| format!("addr add {a}/64 dev {ifname} nodad")),
        );
        cmds.push(format!("link set dev {ifname} up"));
        netns::ip_batch(ns, &cmds)?;
        netns::wait_up(ns, &[ifname], UP_TIMEOUT)?;
        netns::wait_up(inet, &[&port], UP_TIMEOUT)?;
        bring_up_bridge(inet, "br0")?;
        if let Some(link) = link_ns {
            netns::wait_up(&link, &["to-nat", "to-inet"], UP_TIMEOUT)?;
            let emu = Emulator::start(&link, ["to-nat", "to-inet"], shaping)?;
            st.emulators.insert(owner.to_owned(), emu);
        }
        Ok(())
    }

    /// Records `ns` (interface `dev` on the internet bridge, IPv6 on) as a member of the
    /// IPv6 internet and gives it a route to every LAN prefix announced so far. `router`:
    /// the top-level router it is; `isp_of`: the top-level router it is the ISP hop of.
    fn join_internet6(
        &self,
        st: &mut State,
        ns: &str,
        dev: &str,
        router: Option<usize>,
        isp_of: Option<usize>,
    ) -> io::Result<()> {
        let member = Member6 {
            ns: ns.to_owned(),
            dev: dev.to_owned(),
            router,
            isp_of,
        };
        let cmds: Vec<String> = st
            .routes6
            .iter()
            .filter_map(|r| route6_cmd(&member, r))
            .collect();
        if !cmds.is_empty() {
            netns::ip_batch(ns, &cmds)?;
        }
        st.members6.push(member);
        Ok(())
    }

    /// Routes IPv6 LAN prefix `prefix` (/64) in every member of the IPv6 internet, existing
    /// and later ones, via top-level router `router`'s WAN address `via`.
    fn announce6(
        &self,
        st: &mut State,
        prefix: Ipv6Addr,
        via: Ipv6Addr,
        router: usize,
    ) -> io::Result<()> {
        let route = Route6 {
            prefix,
            via,
            router,
        };
        for m in &st.members6 {
            if let Some(cmd) = route6_cmd(m, &route) {
                netns::ip_batch(&m.ns, &[cmd])?;
            }
        }
        st.routes6.push(route);
        Ok(())
    }

    /// Plugs the WAN of router `idx` (namespace `ns`, not yet in `st.routers`) into an ISP
    /// hop, namespace `<lab>-i<r>`, which is plugged into the internet bridge (through the
    /// emulator if `shaping` says so). The router keeps its on-link 203.0.113.n/24; the ISP
    /// answers ARP for the rest of 203.0.113.0/24 on the router's side and for the router's
    /// address on the bridge (proxy ARP) and forwards between them. IPv6: the router has
    /// 2001:db8::n/128 and a default route via the ISP's fe80::1; the ISP answers neighbour
    /// solicitations for it on the bridge (proxy NDP) and is a member of the IPv6 internet.
    /// Returns the ISP's namespace.
    #[allow(clippy::too_many_arguments)]
    fn attach_via_isp(
        &self,
        st: &mut State,
        r: u8,
        idx: usize,
        ns: &str,
        wan: Ipv4Addr,
        wan6: Option<Ipv6Addr>,
        shaping: Shaping,
    ) -> io::Result<String> {
        let isp = format!("{}-i{r}", self.id);
        self.create_ns(st, &isp, wan6.is_some())?;
        let mut required = vec![("net.ipv4.ip_forward", "1".to_owned())];
        if wan6.is_some() {
            required.push(("net.ipv6.conf.all.forwarding", "1".into()));
            required.push(("net.ipv6.conf.all.proxy_ndp", "1".into()));
        }
        netns::sysctls(
            &isp,
            &required,
            &[
                ("net.ipv4.conf.all.send_redirects", "0".into()),
                ("net.ipv4.conf.default.send_redirects", "0".into()),
            ],
        )?;
        let (w, c) = (rules::WAN, ISP_CPE);
        netns::ip_batch(
            ns,
            &[format!(
                "link add name {w} type veth peer name {c} netns {isp}"
            )],
        )?;
        let mut cmds = vec![format!("addr add {wan}/24 dev {w}")];
        if let Some(wan6) = wan6 {
            cmds.push(format!("addr add {wan6}/128 dev {w} nodad"));
        }
        cmds.push(format!("link set dev {w} up"));
        netns::ip_batch(ns, &cmds)?;
        // Its own addresses (for ICMP errors such as time exceeded): outside 203.0.113.0/24.
        let mut cmds = vec![format!("addr add 198.51.100.{r}/32 dev lo")];
        if wan6.is_some() {
            cmds.push(format!(
                "addr add 2001:db8:ffff::{:x}/128 dev lo nodad",
                dec_hex(r)
            ));
            cmds.push(format!("addr add {ISP_LL6}/64 dev {c} nodad"));
        }
        cmds.push(format!("link set dev {c} up"));
        netns::ip_batch(&isp, &cmds)?;
        netns::wait_up(ns, &[w], UP_TIMEOUT)?;
        netns::wait_up(&isp, &[c], UP_TIMEOUT)?;
        self.attach(st, &isp, ISP_INET, &[], &[], shaping, ns)?;
        let i = ISP_INET;
        let mut keys = Vec::new();
        for dev in [c, i] {
            keys.push((format!("net.ipv4.conf.{dev}.proxy_arp"), "1".to_owned()));
            keys.push((format!("net.ipv4.neigh.{dev}.proxy_delay"), "0".to_owned()));
        }
        if wan6.is_some() {
            keys.push((format!("net.ipv6.neigh.{i}.proxy_delay"), "0".to_owned()));
        }
        let keys: Vec<(&str, String)> = keys.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        netns::sysctls(&isp, &keys, &[])?;
        let mut cmds = vec![
            format!("route add 203.0.113.0/24 dev {i}"),
            format!("route add {wan}/32 dev {c}"),
        ];
        if let Some(wan6) = wan6 {
            cmds.push(format!("route add {INTERNET6} dev {i}"));
            cmds.push(format!("route add {wan6}/128 dev {c}"));
            cmds.push(format!("neigh add proxy {wan6} dev {i}"));
        }
        netns::ip_batch(&isp, &cmds)?;
        if wan6.is_some() {
            netns::ip_batch(ns, &[format!("route add ::/0 via {ISP_LL6} dev {w}")])?;
            self.join_internet6(st, &isp, i, None, Some(idx))?;
        }
        Ok(isp)
    }

    /// Plugs interface `ifname` of `ns` into router `idx`'s LAN bridge and gives it the next
    /// LAN number n: 10.r.0.n (if `v4`) and 2001:db8:<r>::n (if `v6`).
    fn connect_to_lan(
        &self,
        st: &mut State,
        idx: usize,
        ns: &str,
        ifname: &str,
        v4: bool,
        v6: bool,
    ) -> io::Result<(Option<Ipv4Addr>, Option<Ipv6Addr>)> {
        let r = &mut st.routers[idx];
        if r.next_lan_host >= 250 {
            return Err(io::Error::other("natlab: LAN full"));
        }
        let n = r.next_lan_host;
        r.next_lan_host += 1;
        let ip = v4.then(|| prefix_addr(r.lan_prefix, n));
        let ip6 = match (v6, r.v6) {
            (true, Some((_, prefix6))) => Some(lan_addr6(prefix6, n)),
            (true, None) => return Err(io::Error::other("natlab: the router has no IPv6")),
            (false, _) => None,
        };
        let rns = r.ns.clone();
        let port = format!("h{n}");
        netns::ip_batch(
            ns,
            &[format!(
                "link add name {ifname} type veth peer name {port} netns {rns}"
            )],
        )?;
        netns::ip_batch(
            &rns,
            &[
                format!("link set dev {port} master lan"),
                format!("link set dev {port} up"),
            ],
        )?;
        let mut cmds = Vec::new();
        if let Some(ip) = ip {
            cmds.push(format!("addr add {ip}/24 dev {ifname}"));
        }
        if let Some(ip6) = ip6 {
            cmds.push(format!("addr add {ip6}/64 dev {ifname} nodad"));
        }
        cmds.push(format!("link set dev {ifname} up"));
        netns::ip_batch(ns, &cmds)?;
        netns::wait_up(ns, &[ifname], UP_TIMEOUT)?;
        netns::wait_up(&rns, &[&port], UP_TIMEOUT)?;
        bring_up_bridge(&rns, "lan")?;
        Ok((ip, ip6))
    }

    /// Builds one router; returns its index in `st.routers`.
    fn new_router(&self, st: &mut State, plan: RouterPlan) -> io::Result<usize> {
        if st.next_router >= 250 {
            return Err(io::Error::other("natlab: too many routers"));
        }
        let r = st.next_router;
        st.next_router += 1;
        let idx = st.routers.len();
        let ns = format!("{}-r{r}", self.id);
        let v6 = plan.ipv6 != Ipv6::Off;
        if v6 {
            if let Some(up) = plan.upstream {
                if st.routers[up].v6.is_none() {
                    return Err(io::Error::other(
                        "natlab: IPv6 router behind an upstream without IPv6",
                    ));
                }
            }
        }
        self.create_ns(st, &ns, v6)?;
        let mut required = vec![("net.ipv4.ip_forward", "1".to_owned())];
        if v6 {
            required.push(("net.ipv6.conf.all.forwarding", "1".into()));
        }
        netns::sysctls(
            &ns,
            &required,
            &[
                // Hairpinned packets leave by the LAN they came from: no ICMP redirects.
                ("net.ipv4.conf.all.send_redirects", "0".into()),
                ("net.ipv4.conf.default.send_redirects", "0".into()),
            ],
        )?;
        let lan_prefix = if plan.cgn { [100, 64, r] } else { [10, r, 0] };
        let lan_prefix6 = v6.then(|| router_prefix6(r, plan.cgn));
        let gw = prefix_addr(lan_prefix, 1);
        let mut cmds = vec![
            // Brought up with its first port (see `bring_up_bridge`).
            if v6 {
                "link add name lan type bridge mcast_snooping 0".to_owned()
            } else {
                "link add name lan type bridge".to_owned()
            },
            format!("addr add {gw}/24 dev lan"),
        ];
        if let Some(p6) = lan_prefix6 {
            cmds.push(format!("addr add {}/64 dev lan nodad", lan_addr6(p6, 1)));
        }
        netns::ip_batch(&ns, &cmds)?;
        let mut isp = None;
        let (wan_ip, wan_ip6) = match plan.upstream {
            None => {
                let n = self.alloc_public(st)?;
                let (ip, ip6) = (public_addr(n), v6.then(|| public_addr6(n)));
                if plan.isp_hop {
                    isp = Some(self.attach_via_isp(st, r, idx, &ns, ip, ip6, plan.shaping)?);
                } else {
                    let addrs6: Vec<Ipv6Addr> = ip6.into_iter().collect();
                    self.attach(st, &ns, rules::WAN, &[ip], &addrs6, plan.shaping, &ns)?;
                    if v6 {
                        self.join_internet6(st, &ns, rules::WAN, Some(idx), None)?;
                    }
                }
                (ip, ip6)
            }
            Some(up) => {
                let (ip, ip6) = self.connect_to_lan(st, up, &ns, rules::WAN, true, v6)?;
                let ip = ip.expect("an IPv4 WAN address");
                let up_gw = prefix_addr(st.routers[up].lan_prefix, 1);
                let mut cmds = vec![format!("route add default via {up_gw}")];
                if let Some((_, up_prefix6)) = st.routers[up].v6.filter(|_| v6) {
                    let up_gw6 = lan_addr6(up_prefix6, 1);
                    cmds.push(format!("route add ::/0 via {up_gw6} dev {}", rules::WAN));
                }
                netns::ip_batch(&ns, &cmds)?;
                (ip, ip6)
            }
        };
        if let (Some(p6), Some(w6)) = (lan_prefix6, wan_ip6) {
            match plan.upstream {
                None => self.announce6(st, p6, w6, idx)?,
                Some(up) => {
                    // The upstream routes the prefix to this router; the internet, to the
                    // upstream (a double NAT has one level).
                    netns::ip_batch(
                        &st.routers[up].ns,
                        &[format!("route add {p6}/64 via {w6} dev {}", rules::LAN)],
                    )?;
                    let (up_wan6, _) = st.routers[up].v6.expect("upstream IPv6");
                    self.announce6(st, p6, up_wan6, up)?;
                }
            }
        }
        let rules = RouterRules {
            nat: plan.preset,
            wan_ip,
            lan_net: format!("{}/24", prefix_addr(lan_prefix, 0)),
            s_addrs: S_ADDRS,
            state_timeout: plan.udp_timeout.unwrap_or(DEFAULT_STATE_TIMEOUT),
            hairpin: plan.hairpin,
            port_forwarding: false,
            open_wan: plan.open_wan,
            sequential: plan.sequential_step.map(|step| {
                (
                    SEQUENTIAL_FIRST_PORT,
                    step,
                    rules::sequential_span(SEQUENTIAL_FIRST_PORT, step),
                )
            }),
            ipv6: plan.ipv6,
            s_addrs6: S_ADDRS6,
        };
        netns::nft(
            &ns,
            &format!(
                "{}{}{}",
                rules::skeleton(&rules),
                rules::rules(&rules),
                rules::block_rules(&[], true, v6)
            ),
        )?;
        if let Some(t) = plan.udp_timeout {
            set_conntrack_timeouts(&ns, t)?;
        }
        st.blocks.insert(ns.clone(), Vec::new());
        st.routers.push(RouterState {
            ns,
            rules,
            upstream: plan.upstream,
            lan_prefix,
            next_lan_host: 2,
            v6: wan_ip6.zip(lan_prefix6),
            ipv6: plan.ipv6,
            isp,
            sequential_step: plan.sequential_step,
        });
        Ok(idx)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        for (_, mut emu) in st.emulators.drain() {
            emu.stop();
        }
        let killed = netns::kill_all_in_any(&st.namespaces);
        if killed > 0 {
            // Give the kernel a moment to reap them so the namespaces can go at once.
            std::thread::sleep(Duration::from_millis(20));
        }
        for ns in st.namespaces.iter().rev() {
            if netns::exists(ns) {
                if let Err(e) = netns::del(ns) {
                    eprintln!("natlab: cleanup: {e}");
                }
            }
        }
    }
}

/// Sets a bridge up once it has a port that is up, and waits until it passes frames.
///
/// A bridge opened without carrier gets its qdisc (and "up" state) only when the kernel's
/// link watcher processes its carrier change, which for bridges is rate-limited to once a
/// second; frames sent meanwhile are dropped. Opened with a forwarding port, it has carrier
/// and a working qdisc at once. Later calls are no-ops.
fn bring_up_bridge(ns: &str, bridge: &str) -> io::Result<()> {
    netns::ip_batch(ns, &[format!("link set dev {bridge} up")])?;
    netns::wait_bridge(ns, bridge, UP_TIMEOUT)
}

fn prefix_addr(p: [u8; 3], last: u8) -> Ipv4Addr {
    Ipv4Addr::new(p[0], p[1], p[2], last)
}

/// The ISP hop's interface towards its router.
const ISP_CPE: &str = "to-cpe";
/// The ISP hop's interface towards the internet bridge.
const ISP_INET: &str = "to-inet";
/// The ISP hop's link-local address on `to-cpe`, its router's IPv6 default gateway.
const ISP_LL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// A small decimal number written in hex digits, so IPv6 addresses read like their IPv4
/// twins: 10 -> 0x10 (2001:db8::10 for 203.0.113.10).
fn dec_hex(n: u8) -> u16 {
    u16::from_str_radix(&n.to_string(), 16).expect("decimal digits are hex digits")
}

/// 203.0.113.n.
fn public_addr(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, n)
}

/// 2001:db8::n (n's decimal digits).
fn public_addr6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, dec_hex(n))
}

/// Router r's IPv6 LAN prefix (/64): 2001:db8:<r>::, or 2001:db8:64:<r>:: for a
/// carrier-grade router (like 100.64.r.0/24).
fn router_prefix6(r: u8, cgn: bool) -> Ipv6Addr {
    if cgn {
        Ipv6Addr::new(0x2001, 0xdb8, 0x64, dec_hex(r), 0, 0, 0, 0)
    } else {
        Ipv6Addr::new(0x2001, 0xdb8, dec_hex(r), 0, 0, 0, 0, 0)
    }
}

/// Address n (decimal digits) in the /64 `prefix`.
fn lan_addr6(prefix: Ipv6Addr, n: u8) -> Ipv6Addr {
    let mut s = prefix.segments();
    s[7] = dec_hex(n);
    Ipv6Addr::from(s)
}

/// The `ip route` command that gives member `m` route `r`, if it needs one (a router routes
/// its own prefixes; its ISP hop sends them to it).
fn route6_cmd(m: &Member6, r: &Route6) -> Option<String> {
    if m.router == Some(r.router) {
        return None;
    }
    let dev = if m.isp_of == Some(r.router) {
        ISP_CPE
    } else {
        m.dev.as_str()
    };
    Some(format!("route add {}/64 via {} dev {dev}", r.prefix, r.via))
}

fn set_conntrack_timeouts(ns: &str, secs: u32) -> io::Result<()> {
    netns::sysctls(
        ns,
        &[
            ("net.netfilter.nf_conntrack_udp_timeout", secs.to_string()),
            (
                "net.netfilter.nf_conntrack_udp_timeout_stream",
                secs.to_string(),
            ),
        ],
        &[],
    )
}

/// Whether the lab can run here: root, `ip netns` and `nft` usable. If not, prints
/// "SKIPPED: <test name>: needs root and nftables (<reason>)" and returns false — unless
/// the environment has `CI=true`, where it panics instead.
pub fn require_root() -> bool {
    static CHECK: OnceLock<Result<(), String>> = OnceLock::new();
    let result = CHECK.get_or_init(check_environment);
    match result {
        Ok(()) => true,
        Err(reason) => {
            let name = std::thread::current()
                .name()
                .unwrap_or("<unnamed test>")
                .to_owned();
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!(
                    "{name}: needs root and nftables ({reason}); CI=true does not allow skipping"
                );
            }
            // Straight to stderr (one write), past the test harness's output capture.
            let line = format!("SKIPPED: {name}: needs root and nftables ({reason})\n");
            let _ = io::stderr().write_all(line.as_bytes());
            false
        }
    }
}

fn check_environment() -> Result<(), String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not running as root".into());
    }
    let ok = |program: &str, args: &[&str]| {
        Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("{program}: {e}"))
            .and_then(|o| {
                if o.status.success() {
                    Ok(())
                } else {
                    Err(format!(
                        "{program} {}: {}",
                        args.join(" "),
                        String::from_utf8_lossy(&o.stderr).trim()
                    ))
                }
            })
    };
    ok("ip", &["netns", "list"])?;
    ok("nft", &["--version"])?;
    // A real try: a namespace with a NAT table in it.
    let probe = format!("{}{}-probe", netns::PREFIX, std::process::id());
    netns::add(&probe).map_err(|e| e.to_string())?;
    let tried = netns::nft(
        &probe,
        "table ip t {\n chain p {\n type nat hook postrouting priority srcnat;\n masquerade\n }\n}\n",
    );
    let _ = netns::del(&probe);
    tried.map_err(|e| format!("nft in a namespace: {e}"))
}
