//! The NAT lab: a small internet in network namespaces, with NAT routers made by the Linux
//! kernel (nftables), so tests can prove hole punching against real NAT behaviour.
//!
//! The test kit includes it (`tests/common`, whose [`kit`](../common/kit.rs) starts S and
//! agents on lab hosts): use it as `common::natlab`; a test without the kit declares
//! `#[path = "natlab/mod.rs"] mod natlab;` (or `mod natlab;`).
//! Needs root, `ip` (iproute2) and `nft` (nftables); start every test with
//! `if !natlab::require_root() { return; }`.
//!
//! # Topology and addresses
//!
//! - **internet**: namespace `<lab>-inet` with bridge `br0`, no address of its own. Its
//!   addresses are TEST-NET-3, 203.0.113.0/24, all on-link; no namespace has a route to
//!   anything else, and nothing is connected to the root namespace.
//! - **S**: namespace `<lab>-s`, interface `eth0` with 203.0.113.1/24 and 203.0.113.2/24
//!   ([`S_ADDRS`], [`Lab::s_addrs`]); run the relay there (`lab.s().spawn(...)`) or the
//!   [`stun::Responder`].
//! - **public hosts and NAT WANs** get 203.0.113.10, .11, … in creation order
//!   (interface `eth0` on a public host, `wan` on a router).
//! - **NAT router** number r (1, 2, … per lab): namespace `<lab>-r<r>`, LAN bridge `lan` with
//!   10.r.0.1/24; hosts behind it get 10.r.0.2, .3, … (interface `eth0`, default route via
//!   10.r.0.1). A carrier-grade outer router (for [`Nat::Double`]) has LAN 100.64.r.0/24
//!   instead; the inner router's `wan` is 100.64.r.2 with a default route via 100.64.r.1.
//! - **hosts**: namespace `<lab>-h<n>`.
//! - **links with shaping**: namespace `<lab>-l<k>` holding the emulator's two veth ends,
//!   `to-nat` and `to-inet` (see [`emu`]); without shaping the WAN veth is plugged straight
//!   into the bridge.
//!
//! `<lab>` is `p2pl-<pid>-<n>`: the creating process and a per-process counter, so labs of
//! parallel tests never collide, and [`Lab::new`] removes namespaces whose PID is dead.
//! IPv6 is disabled in every lab namespace, and bridge netfilter is off.
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
//! Every router masquerades only its LAN prefix and drops unsolicited traffic to itself
//! from its WAN side (`input`: established/related accepted, rest dropped). The exact rules
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
//! let v = a.run_in(|| std::fs::read_to_string("/proc/net/udp")); // any closure, in a's netns
//! a.ip(); a.public_ip(); a.ns(); a.gateway(); a.nat();   // 10.r.0.x, 203.0.113.x, …
//! lab.set_udp_timeout(&a, 10)?;                          // conntrack + map timeouts, a's NATs
//! lab.block(&a, Block::Udp)?; lab.unblock(&a)?;          // drop rules in a's (inner) NAT
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
//! [`Shaping`] applies to the WAN link of a router (the outer one for `double`) or of a
//! public host: `delay_ms` in each direction, `loss_pct` of IPv4 frames dropped in each
//! direction independently (so a round trip is lost with about 1-(1-p)² probability). ARP
//! is delayed but never lost. Frames are segmented before they reach the emulator
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
//!   not affected.

#![allow(dead_code)]

pub mod emu;
pub mod netns;
pub mod rules;
pub mod stun;
pub mod upnpd;

pub use emu::LinkStats;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::io::{self, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
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
    /// Share of IPv4 frames dropped per direction, percent (0–100).
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

/// Traffic [`Lab::block`] drops in a host's (innermost) NAT router, both directions; on a
/// public host, in its own input and output.
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
}

impl RouterSpec {
    pub fn new(nat: Nat) -> RouterSpec {
        RouterSpec {
            nat,
            shaping: Shaping::none(),
            udp_timeout: None,
            hairpin: false,
        }
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
}

impl Host {
    /// The host's network namespace (for `ip netns exec`).
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// The host's own address (a 10.x LAN address behind a NAT, 203.0.113.x when public).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Same as [`Host::ip`].
    pub fn lan_ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// The address the internet sees the host's traffic come from (its outermost NAT's WAN
    /// address, or its own when public).
    pub fn public_ip(&self) -> Ipv4Addr {
        self.public_ip
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
}

struct RouterState {
    ns: String,
    rules: RouterRules,
    upstream: Option<usize>,
    lan_prefix: [u8; 3],
    next_lan_host: u8,
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
            lab.create_ns(&mut st, &lab.inet)?;
            netns::ip_batch(
                &lab.inet,
                &[
                    // Brought up with its first port (see `bring_up_bridge`).
                    "link add name br0 type bridge".into(),
                ],
            )?;
            lab.create_ns(&mut st, &lab.s)?;
            lab.attach(&mut st, &lab.s, "eth0", &S_ADDRS, Shaping::none())?;
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

    /// S as a host (spawn the relay in it, open sockets in it).
    pub fn s(&self) -> Host {
        Host {
            ns: self.s.clone(),
            ip: S_ADDRS[0],
            gateway: None,
            public_ip: S_ADDRS[0],
            nat: Nat::Public,
            router: None,
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
            let mut st = self.lock();
            let h = st.next_host;
            st.next_host += 1;
            let ns = format!("{}-h{h}", self.id);
            self.create_ns(&mut st, &ns)?;
            let ip = self.alloc_public(&mut st)?;
            self.attach(&mut st, &ns, "eth0", &[ip], shaping)?;
            return Ok(Host {
                ns,
                ip,
                gateway: None,
                public_ip: ip,
                nat,
                router: None,
            });
        }
        let router = self.add_router(nat, shaping)?;
        self.add_host_behind(&router)
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
        let mut st = self.lock();
        spec.udp_timeout = spec.udp_timeout.or(st.default_udp_timeout);
        let (idx, public_ip) = match spec.nat {
            Nat::Public => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a public host has no router",
                ))
            }
            Nat::Double => {
                let outer = self.new_router(
                    &mut st,
                    Nat::Easy,
                    None,
                    spec.shaping,
                    true,
                    spec.udp_timeout,
                    false,
                )?;
                let public_ip = st.routers[outer].rules.wan_ip;
                let inner = self.new_router(
                    &mut st,
                    Nat::Easy,
                    Some(outer),
                    Shaping::none(),
                    false,
                    spec.udp_timeout,
                    spec.hairpin,
                )?;
                (inner, public_ip)
            }
            nat => {
                let r = self.new_router(
                    &mut st,
                    nat,
                    None,
                    spec.shaping,
                    false,
                    spec.udp_timeout,
                    spec.hairpin,
                )?;
                (r, st.routers[r].rules.wan_ip)
            }
        };
        let r = &st.routers[idx];
        Ok(Router {
            idx,
            ns: r.ns.clone(),
            nat: spec.nat,
            wan_ip: r.rules.wan_ip,
            public_ip,
            lan_gateway: prefix_addr(r.lan_prefix, 1),
        })
    }

    /// A host on `router`'s LAN.
    pub fn add_host_behind(&self, router: &Router) -> io::Result<Host> {
        self.check_own(&router.ns);
        let mut st = self.lock();
        let h = st.next_host;
        st.next_host += 1;
        let ns = format!("{}-h{h}", self.id);
        self.create_ns(&mut st, &ns)?;
        let ip = self.connect_to_lan(&mut st, router.idx, &ns, "eth0")?;
        netns::ip_batch(
            &ns,
            &[format!("route add default via {}", router.lan_gateway)],
        )?;
        Ok(Host {
            ns,
            ip,
            gateway: Some(router.lan_gateway),
            public_ip: router.public_ip,
            nat: router.nat,
            router: Some(router.idx),
        })
    }

    /// The host's innermost router, if any.
    pub fn router_of(&self, host: &Host) -> Option<Router> {
        self.check_own(&host.ns);
        let idx = host.router?;
        let st = self.lock();
        let r = &st.routers[idx];
        Some(Router {
            idx,
            ns: r.ns.clone(),
            nat: host.nat,
            wan_ip: r.rules.wan_ip,
            public_ip: host.public_ip,
            lan_gateway: prefix_addr(r.lan_prefix, 1),
        })
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
        let (ns, on_router) = match host.router {
            Some(i) => (st.routers[i].ns.clone(), true),
            None => (host.ns.clone(), false),
        };
        if !on_router && !st.blocks.contains_key(&ns) {
            netns::nft(&ns, &rules::block_skeleton())?;
        }
        let list = st.blocks.entry(ns.clone()).or_default();
        if !list.contains(&what) {
            list.push(what);
        }
        let script = rules::block_rules(list, on_router);
        netns::nft(&ns, &script)
    }

    /// Removes every block of [`Lab::block`] for `host`.
    pub fn unblock(&self, host: &Host) -> io::Result<()> {
        self.check_own(&host.ns);
        let mut st = self.lock();
        let (ns, on_router) = match host.router {
            Some(i) => (st.routers[i].ns.clone(), true),
            None => (host.ns.clone(), false),
        };
        if let Some(list) = st.blocks.get_mut(&ns) {
            list.clear();
            netns::nft(&ns, &rules::block_rules(&[], on_router))?;
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
    /// loopback up, IPv6 off and bridge netfilter off.
    fn create_ns(&self, st: &mut State, ns: &str) -> io::Result<()> {
        st.namespaces.push(ns.to_owned());
        netns::add(ns)?;
        netns::sysctls(
            ns,
            &[],
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1".into()),
                ("net.ipv6.conf.default.disable_ipv6", "1".into()),
                ("net.bridge.bridge-nf-call-iptables", "0".into()),
                ("net.bridge.bridge-nf-call-ip6tables", "0".into()),
                ("net.bridge.bridge-nf-call-arptables", "0".into()),
            ],
        )?;
        netns::ip_batch(ns, &["link set dev lo up".into()])
    }

    fn alloc_public(&self, st: &mut State) -> io::Result<Ipv4Addr> {
        if st.next_public >= 250 {
            return Err(io::Error::other("natlab: out of 203.0.113.x addresses"));
        }
        let ip = Ipv4Addr::new(203, 0, 113, st.next_public);
        st.next_public += 1;
        Ok(ip)
    }

    /// Plugs interface `ifname` of `ns` into the internet bridge with `addrs` (/24), through
    /// a link emulator if `shaping` says so.
    fn attach(
        &self,
        st: &mut State,
        ns: &str,
        ifname: &str,
        addrs: &[Ipv4Addr],
        shaping: Shaping,
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
            self.create_ns(st, &link)?;
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
        cmds.push(format!("link set dev {ifname} up"));
        netns::ip_batch(ns, &cmds)?;
        netns::wait_up(ns, &[ifname], UP_TIMEOUT)?;
        netns::wait_up(inet, &[&port], UP_TIMEOUT)?;
        bring_up_bridge(inet, "br0")?;
        if let Some(link) = link_ns {
            netns::wait_up(&link, &["to-nat", "to-inet"], UP_TIMEOUT)?;
            let emu = Emulator::start(&link, ["to-nat", "to-inet"], shaping)?;
            st.emulators.insert(ns.to_owned(), emu);
        }
        Ok(())
    }

    /// Plugs interface `ifname` of `ns` into router `idx`'s LAN bridge and gives it the next
    /// LAN address.
    fn connect_to_lan(
        &self,
        st: &mut State,
        idx: usize,
        ns: &str,
        ifname: &str,
    ) -> io::Result<Ipv4Addr> {
        let r = &mut st.routers[idx];
        if r.next_lan_host >= 250 {
            return Err(io::Error::other("natlab: LAN full"));
        }
        let n = r.next_lan_host;
        r.next_lan_host += 1;
        let ip = prefix_addr(r.lan_prefix, n);
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
        netns::ip_batch(
            ns,
            &[
                format!("addr add {ip}/24 dev {ifname}"),
                format!("link set dev {ifname} up"),
            ],
        )?;
        netns::wait_up(ns, &[ifname], UP_TIMEOUT)?;
        netns::wait_up(&rns, &[&port], UP_TIMEOUT)?;
        bring_up_bridge(&rns, "lan")?;
        Ok(ip)
    }

    /// Builds one router; returns its index in `st.routers`.
    #[allow(clippy::too_many_arguments)]
    fn new_router(
        &self,
        st: &mut State,
        preset: Nat,
        upstream: Option<usize>,
        shaping: Shaping,
        cgn: bool,
        udp_timeout: Option<u32>,
        hairpin: bool,
    ) -> io::Result<usize> {
        if st.next_router >= 250 {
            return Err(io::Error::other("natlab: too many routers"));
        }
        let r = st.next_router;
        st.next_router += 1;
        let ns = format!("{}-r{r}", self.id);
        self.create_ns(st, &ns)?;
        netns::sysctls(
            &ns,
            &[("net.ipv4.ip_forward", "1".into())],
            &[
                // Hairpinned packets leave by the LAN they came from: no ICMP redirects.
                ("net.ipv4.conf.all.send_redirects", "0".into()),
                ("net.ipv4.conf.default.send_redirects", "0".into()),
            ],
        )?;
        let lan_prefix = if cgn { [100, 64, r] } else { [10, r, 0] };
        let gw = prefix_addr(lan_prefix, 1);
        netns::ip_batch(
            &ns,
            &[
                "link add name lan type bridge".into(),
                // Brought up with its first port (see `bring_up_bridge`).
                format!("addr add {gw}/24 dev lan"),
            ],
        )?;
        let wan_ip = match upstream {
            None => {
                let ip = self.alloc_public(st)?;
                self.attach(st, &ns, rules::WAN, &[ip], shaping)?;
                ip
            }
            Some(up) => {
                let ip = self.connect_to_lan(st, up, &ns, rules::WAN)?;
                let up_gw = prefix_addr(st.routers[up].lan_prefix, 1);
                netns::ip_batch(&ns, &[format!("route add default via {up_gw}")])?;
                ip
            }
        };
        let rules = RouterRules {
            nat: preset,
            wan_ip,
            lan_net: format!("{}/24", prefix_addr(lan_prefix, 0)),
            s_addrs: S_ADDRS,
            state_timeout: udp_timeout.unwrap_or(DEFAULT_STATE_TIMEOUT),
            hairpin,
            port_forwarding: false,
        };
        netns::nft(
            &ns,
            &format!(
                "{}{}{}",
                rules::skeleton(&rules),
                rules::rules(&rules),
                rules::block_rules(&[], true)
            ),
        )?;
        if let Some(t) = udp_timeout {
            set_conntrack_timeouts(&ns, t)?;
        }
        st.blocks.insert(ns.clone(), Vec::new());
        st.routers.push(RouterState {
            ns,
            rules,
            upstream,
            lan_prefix,
            next_lan_host: 2,
        });
        Ok(st.routers.len() - 1)
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
