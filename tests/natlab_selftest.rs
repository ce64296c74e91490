//! Checks of the NAT lab itself: each preset maps and filters as named (STUN from inside the
//! lab against S's two addresses), routers ignore unsolicited traffic to themselves, the link
//! emulator delays and loses, conntrack timeouts apply, same LAN, double NAT, blocks, and
//! cleanup. If these fail, the NAT tests' failures say nothing about p2ptun.
//!
//! Needs root and nftables (skips otherwise, unless CI=true).

use p2ptun_testkit::natlab;

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natlab::stun::{binding, Responder};
use natlab::{netns, Block, CtEntry, Host, Ipv6, Lab, Nat, Router, RouterSpec, Shaping, Stack};
use p2ptun::proto::stun as codec;

const S1: Ipv4Addr = natlab::S_ADDRS[0];
const S2: Ipv4Addr = natlab::S_ADDRS[1];
const WAIT: Duration = Duration::from_millis(400);

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn any() -> SocketAddr {
    sa(Ipv4Addr::UNSPECIFIED, 0)
}

/// STUN on S: 203.0.113.1:7000 and 203.0.113.2:7001 answer; 203.0.113.1:7002 (same IP,
/// other port) and 203.0.113.2:7003 (other IP) only send unsolicited datagrams.
struct S {
    _responder: Responder,
    same_ip: UdpSocket,
    other_ip: UdpSocket,
}

impl S {
    fn start(lab: &Lab) -> S {
        let s = lab.s();
        S {
            _responder: Responder::start(&s, &[sa(S1, 7000), sa(S2, 7001)])
                .expect("STUN responder"),
            same_ip: s.udp_bind(sa(S1, 7002)).expect("bind 7002"),
            other_ip: s.udp_bind(sa(S2, 7003)).expect("bind 7003"),
        }
    }
}

/// The datagrams (payloads) arriving on `sock` within `wait`.
fn collect(sock: &UdpSocket, wait: Duration) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 1500];
    for _ in 0..1000 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        sock.set_read_timeout(Some(left)).unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => got.push(buf[..n].to_vec()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(_) => continue,
        }
    }
    got
}

#[derive(Debug, Clone, PartialEq)]
struct Observed {
    mapping: &'static str,
    filtering: &'static str,
    mapped: Option<SocketAddr>,
}

/// Mapping: one socket asks both of S's addresses. Filtering: a fresh socket asks only
/// 203.0.113.1:7000, then S sends to its mapping from the same IP (other port) and from the
/// other IP.
fn observe(host: &Host, s: &S) -> Observed {
    let sock = host.udp_bind(any()).unwrap();
    let local = sock.local_addr().unwrap();
    let m1 = binding(&sock, sa(S1, 7000), WAIT, 3).unwrap();
    let Some(m1) = m1 else {
        return Observed {
            mapping: "no UDP",
            filtering: "-",
            mapped: None,
        };
    };
    let m2 = binding(&sock, sa(S2, 7001), WAIT, 3).unwrap();
    let mapping = match m2 {
        None => "no answer from S2",
        Some(m2) if m1 == m2 && m1 == sa(host.ip(), local.port()) => "none (public)",
        Some(m2) if m1 == m2 => "endpoint-independent",
        Some(_) => "endpoint-dependent",
    };

    let fresh = host.udp_bind(any()).unwrap();
    let m = binding(&fresh, sa(S1, 7000), WAIT, 3)
        .unwrap()
        .expect("second binding");
    s.same_ip.send_to(b"same-ip", m).unwrap();
    s.other_ip.send_to(b"other-ip", m).unwrap();
    let got = collect(&fresh, WAIT);
    let same = got.iter().any(|g| g == b"same-ip");
    let other = got.iter().any(|g| g == b"other-ip");
    let filtering = match (same, other) {
        (true, true) => "endpoint-independent",
        (true, false) => "address-dependent",
        (false, false) => "address+port-dependent",
        (false, true) => "odd (other IP only)",
    };
    Observed {
        mapping,
        filtering,
        mapped: Some(m1),
    }
}

/// A TCP listener in `host` accepting (and closing) connections for `secs`.
fn tcp_accepting(host: &Host, addr: SocketAddr, secs: u64) -> std::thread::JoinHandle<()> {
    let listener = host.tcp_listen(addr).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            match listener.accept() {
                Ok((mut c, _)) => {
                    let _ = c.write_all(b"hi");
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    })
}

fn tcp_works(host: &Host, addr: SocketAddr) -> bool {
    match host.tcp_connect(addr, Duration::from_millis(800)) {
        Ok(mut c) => {
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = [0u8; 2];
            c.read_exact(&mut buf).is_ok() && &buf == b"hi"
        }
        Err(_) => false,
    }
}

#[test]
fn presets_map_and_filter_as_named() {
    if !natlab::require_root() {
        return;
    }
    let t = Instant::now();
    let lab = Lab::new().unwrap();
    let s = S::start(&lab);
    let hosts: Vec<Host> = Nat::ALL
        .iter()
        .map(|&nat| lab.add_host(nat, Shaping::none()).unwrap())
        .collect();
    println!("lab with {} hosts built in {:?}", hosts.len(), t.elapsed());
    let mut table =
        String::from("\npreset         | mapping              | filtering              | mapped\n");
    table +=
        "---------------+----------------------+------------------------+-------------------\n";
    let mut failures = Vec::new();
    for host in &hosts {
        let o = observe(host, &s);
        table += &format!(
            "{:<14} | {:<20} | {:<22} | {}\n",
            host.nat().name(),
            o.mapping,
            o.filtering,
            o.mapped.map(|m| m.to_string()).unwrap_or_default()
        );
        let (mapping, filtering) = match host.nat() {
            Nat::Public => ("none (public)", "endpoint-independent"),
            Nat::Easy | Nat::Double => ("endpoint-independent", "address+port-dependent"),
            Nat::FullCone => ("endpoint-independent", "endpoint-independent"),
            Nat::Restricted => ("endpoint-independent", "address-dependent"),
            Nat::Hard => ("endpoint-dependent", "address+port-dependent"),
            Nat::UdpBlocked | Nat::TcpToSOnly => ("no UDP", "-"),
        };
        if o.mapping != mapping || o.filtering != filtering {
            failures.push(format!(
                "{}: expected {mapping} / {filtering}, saw {} / {}; rules:\n{}",
                host.nat(),
                o.mapping,
                o.filtering,
                lab.nft_ruleset(host)
            ));
        }
        if std::env::var_os("NATLAB_PRINT_RULES").is_some() {
            println!("--- {}:\n{}", host.nat(), lab.nft_ruleset(host));
        }
        if let Some(m) = o.mapped {
            // S sees the outermost public address (203.0.113.x), never a LAN or CGN one.
            if m.ip() != IpAddr::V4(host.public_ip()) {
                failures.push(format!(
                    "{}: mapped {m}, public IP is {}",
                    host.nat(),
                    host.public_ip()
                ));
            }
        }
    }
    println!("{table}");

    // TCP: udp-blocked passes TCP anywhere; tcp-to-S-only only to S.
    let public = &hosts[0];
    let _a = tcp_accepting(&lab.s(), sa(S1, 7010), 20);
    let _b = tcp_accepting(public, sa(public.ip(), 7011), 20);
    for host in &hosts {
        let to_s = tcp_works(host, sa(S1, 7010));
        let to_peer = tcp_works(host, sa(public.ip(), 7011));
        println!(
            "{:<14} TCP to S: {to_s}, TCP to a public host: {to_peer}",
            host.nat().name()
        );
        let expect_peer = host.nat() != Nat::TcpToSOnly;
        if !to_s || to_peer != expect_peer {
            failures.push(format!(
                "{}: TCP to S {to_s}, to peer {to_peer}",
                host.nat()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Sends a Binding request from `host_sock` to `server` and answers it by hand on
/// `server_sock`; returns the mapped address the server saw.
fn binding_by_hand(
    host_sock: &UdpSocket,
    server_sock: &UdpSocket,
    server: SocketAddr,
) -> Option<SocketAddr> {
    let tid = codec::new_tid();
    host_sock
        .send_to(&codec::binding_request(tid, None), server)
        .unwrap();
    server_sock.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = server_sock.recv_from(&mut buf).ok()?;
    let msg = codec::decode(&buf[..n]).ok()?;
    assert!(codec::is_binding_request(&msg));
    let reply = codec::binding_success(msg.transaction_id(), from, Default::default(), None, 512);
    server_sock.send_to(&reply, from).unwrap();
    host_sock.set_read_timeout(Some(WAIT)).unwrap();
    let (n, _) = host_sock.recv_from(&mut buf).ok()?;
    codec::mapped_address(&codec::decode(&buf[..n]).ok()?)
}

#[test]
fn router_drops_unsolicited_input_and_keeps_the_port() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let guarded = lab.add_host(Nat::Easy, Shaping::none()).unwrap();
    let open = lab.add_host(Nat::Easy, Shaping::none()).unwrap();
    // The control router: the same NAT without the input rules.
    let open_router = lab.router_of(&open).unwrap();
    netns::nft(open_router.ns(), "flush chain ip lab input\n").unwrap();

    for (host, guarded) in [(&guarded, true), (&open, false)] {
        let port = 40000 + (std::process::id() % 1000) as u16;
        let server_addr = sa(S1, 7100 + guarded as u16);
        let server = lab.s().udp_bind(server_addr).unwrap();
        // Unsolicited: S -> router WAN:port, before the host ever used that port.
        let connected = lab.s().udp_bind(sa(S1, 7200 + guarded as u16)).unwrap();
        connected.connect(sa(host.public_ip(), port)).unwrap();
        connected.send(b"knock").unwrap();
        connected.set_read_timeout(Some(WAIT)).unwrap();
        let answer = connected.recv(&mut [0u8; 64]);
        // The knock that matters for the port: from the server's own address.
        server
            .send_to(b"knock", sa(host.public_ip(), port))
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));

        let sock = host.udp_bind(sa(Ipv4Addr::UNSPECIFIED, port)).unwrap();
        let mapped = binding_by_hand(&sock, &server, server_addr);
        println!(
            "router input drop {guarded}: answer to knock {answer:?}, later mapping {mapped:?}"
        );
        if guarded {
            let e = answer.expect_err("a guarded router must not answer");
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ),
                "guarded router answered: {e}"
            );
            assert_eq!(
                mapped,
                Some(sa(host.public_ip(), port)),
                "easy NAT must keep the port"
            );
        } else {
            // Without the rules the router answers (ICMP port unreachable) and the bogus
            // conntrack entry pushes the host's mapping to another port: the check means something.
            assert_eq!(
                answer.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionRefused)
            );
            let mapped = mapped.expect("mapping");
            assert_ne!(mapped.port(), port, "control router kept the port");
        }
    }
}

#[test]
fn shaping_delays_and_loses() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _s = S::start(&lab);
    let slow = lab.add_host(Nat::Easy, Shaping::delay(50)).unwrap();
    let lossy = lab.add_host(Nat::Public, Shaping::loss(30.0)).unwrap();
    let plain = lab.add_host(Nat::Easy, Shaping::none()).unwrap();

    let rtts = |host: &Host| -> Vec<Duration> {
        let sock = host.udp_bind(any()).unwrap();
        // Warm up (ARP through the emulator).
        binding(&sock, sa(S1, 7000), Duration::from_secs(1), 3)
            .unwrap()
            .expect("warm-up");
        (0..5)
            .map(|_| {
                let t = Instant::now();
                binding(&sock, sa(S1, 7000), Duration::from_secs(1), 1)
                    .unwrap()
                    .expect("answer");
                t.elapsed()
            })
            .collect()
    };
    let slow_rtts = rtts(&slow);
    let plain_rtts = rtts(&plain);
    println!("RTT with 50 ms each way: {slow_rtts:?}; without shaping: {plain_rtts:?}");
    let min = *slow_rtts.iter().min().unwrap();
    assert!(min >= Duration::from_millis(100), "RTT {min:?} < 100 ms");
    assert!(
        min < Duration::from_millis(1000),
        "RTT {min:?} far too long"
    );
    let stats = lab.link_stats(&slow).expect("emulator stats");
    assert!(
        stats.forwarded[0] > 0 && stats.forwarded[1] > 0,
        "{stats:?}"
    );
    assert!(lab.link_stats(&plain).is_none());

    // 50 requests, distinct transaction IDs, then count the answers.
    let sock = lossy.udp_bind(any()).unwrap();
    let mut tids = HashSet::new();
    for _ in 0..50 {
        let tid = codec::new_tid();
        tids.insert(tid);
        sock.send_to(&codec::binding_request(tid, None), sa(S1, 7000))
            .unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let answered: HashSet<_> = collect(&sock, Duration::from_secs(1))
        .iter()
        .filter_map(|p| codec::decode(p).ok())
        .map(|m| m.transaction_id())
        .filter(|t| tids.contains(t))
        .collect();
    let stats = lab.link_stats(&lossy).expect("emulator stats");
    println!(
        "30% loss each way: {} of 50 answered; {stats:?}",
        answered.len()
    );
    assert!(
        !answered.is_empty() && answered.len() < 50,
        "{} of 50 answered",
        answered.len()
    );
    assert!(stats.lost[0] + stats.lost[1] > 0);
}

#[test]
fn conntrack_timeout_forgets_idle_mappings() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let s = S::start(&lab);
    let full = lab.add_host(Nat::FullCone, Shaping::none()).unwrap();
    let easy = lab
        .add_router_with(RouterSpec {
            udp_timeout: Some(3),
            ..RouterSpec::new(Nat::Easy)
        })
        .and_then(|r| lab.add_host_behind(&r))
        .unwrap();
    lab.set_udp_timeout(&full, 3).unwrap();
    lab.set_default_udp_timeout(Some(3));
    let double = lab.add_host(Nat::Double, Shaping::none()).unwrap();
    let router = lab.router_of(&full).unwrap();
    assert_eq!(
        netns::read_sysctl(router.ns(), "net.netfilter.nf_conntrack_udp_timeout").unwrap(),
        "3"
    );

    // Full cone: S's other address reaches the mapping now, but not after 5 s idle.
    let sock = full.udp_bind(any()).unwrap();
    let m = binding(&sock, sa(S1, 7000), WAIT, 3)
        .unwrap()
        .expect("mapping");
    s.other_ip.send_to(b"fresh", m).unwrap();
    assert_eq!(
        collect(&sock, WAIT),
        vec![b"fresh".to_vec()],
        "full cone must admit S2"
    );

    // Easy: the server's own endpoint reaches the mapping now, but not after 5 s idle.
    let server = lab.s().udp_bind(sa(S1, 7300)).unwrap();
    let esock = easy.udp_bind(any()).unwrap();
    let em = binding_by_hand(&esock, &server, sa(S1, 7300)).expect("easy mapping");
    server.send_to(b"fresh", em).unwrap();
    assert_eq!(collect(&esock, WAIT), vec![b"fresh".to_vec()]);

    // Double NAT (timeout from the lab default): likewise.
    let dserver = lab.s().udp_bind(sa(S1, 7301)).unwrap();
    let dsock = double.udp_bind(any()).unwrap();
    let dm = binding_by_hand(&dsock, &dserver, sa(S1, 7301)).expect("double mapping");
    dserver.send_to(b"fresh", dm).unwrap();
    assert_eq!(collect(&dsock, WAIT), vec![b"fresh".to_vec()]);

    std::thread::sleep(Duration::from_secs(5));
    s.other_ip.send_to(b"stale", m).unwrap();
    server.send_to(b"stale", em).unwrap();
    dserver.send_to(b"stale", dm).unwrap();
    assert!(
        collect(&sock, WAIT).is_empty(),
        "full-cone mapping outlived its timeout"
    );
    assert!(
        collect(&esock, WAIT).is_empty(),
        "easy mapping outlived its timeout"
    );
    assert!(
        collect(&dsock, WAIT).is_empty(),
        "double-NAT mapping outlived its timeout"
    );
}

#[test]
fn same_lan_double_nat_and_hairpin() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _s = S::start(&lab);

    // Same LAN: each reaches the other by LAN address.
    let (c, d) = lab.add_same_lan_pair(Nat::Hard, Shaping::none()).unwrap();
    let cs = c.udp_bind(any()).unwrap();
    let ds = d.udp_bind(any()).unwrap();
    let (cp, dp) = (
        cs.local_addr().unwrap().port(),
        ds.local_addr().unwrap().port(),
    );
    cs.send_to(b"c->d", sa(d.ip(), dp)).unwrap();
    ds.send_to(b"d->c", sa(c.ip(), cp)).unwrap();
    assert_eq!(collect(&ds, WAIT), vec![b"c->d".to_vec()]);
    assert_eq!(collect(&cs, WAIT), vec![b"d->c".to_vec()]);
    assert_eq!(c.public_ip(), d.public_ip());

    // Double NAT: a CGN address on the inner WAN, 203.0.113.x towards S.
    let e = lab.add_host(Nat::Double, Shaping::none()).unwrap();
    let inner = lab.router_of(&e).unwrap();
    assert_eq!(inner.wan_ip().octets()[..2], [100, 64]);
    let es = e.udp_bind(any()).unwrap();
    let m = binding(&es, sa(S1, 7000), WAIT, 3)
        .unwrap()
        .expect("double NAT mapping");
    println!(
        "double NAT: host {} behind {} maps to {m}",
        e.ip(),
        inner.wan_ip()
    );
    assert_eq!(m.ip(), IpAddr::V4(e.public_ip()));
    assert_eq!(e.public_ip().octets()[..3], [203, 0, 113]);

    // Hairpin: off by default (easy), on when asked (full cone).
    for hairpin in [false, true] {
        let router = lab
            .add_router_with(RouterSpec {
                hairpin,
                ..RouterSpec::new(Nat::FullCone)
            })
            .unwrap();
        let x = lab.add_host_behind(&router).unwrap();
        let y = lab.add_host_behind(&router).unwrap();
        let xs = x.udp_bind(any()).unwrap();
        let ys = y.udp_bind(any()).unwrap();
        let xm = binding(&xs, sa(S1, 7000), WAIT, 3)
            .unwrap()
            .expect("x mapping");
        let ym = binding(&ys, sa(S1, 7000), WAIT, 3)
            .unwrap()
            .expect("y mapping");
        ys.send_to(b"via public", xm).unwrap();
        let got = collect(&xs, WAIT);
        println!("hairpin {hairpin}: y -> {xm} delivered {got:?} (y maps to {ym})");
        assert_eq!(!got.is_empty(), hairpin);
    }
}

#[test]
fn block_and_unblock() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _s = S::start(&lab);
    let _t = tcp_accepting(&lab.s(), sa(S1, 7010), 15);
    for nat in [Nat::Easy, Nat::Public] {
        let host = lab.add_host(nat, Shaping::none()).unwrap();
        let sock = host.udp_bind(any()).unwrap();
        let works = || binding(&sock, sa(S1, 7000), WAIT, 2).unwrap().is_some();
        assert!(works(), "{nat}: UDP before blocking");
        lab.block(&host, Block::Udp).unwrap();
        assert!(!works(), "{nat}: UDP while blocked");
        assert!(
            tcp_works(&host, sa(S1, 7010)),
            "{nat}: TCP while UDP blocked"
        );
        lab.block(&host, Block::Tcp).unwrap();
        assert!(!tcp_works(&host, sa(S1, 7010)), "{nat}: TCP while blocked");
        lab.unblock(&host).unwrap();
        assert!(works(), "{nat}: UDP after unblocking");
        assert!(
            tcp_works(&host, sa(S1, 7010)),
            "{nat}: TCP after unblocking"
        );
        lab.block(&host, Block::All).unwrap();
        assert!(!works(), "{nat}: UDP while all blocked");
        lab.unblock(&host).unwrap();
    }
}

#[test]
fn cleanup_removes_namespaces_and_processes() {
    if !natlab::require_root() {
        return;
    }
    // A namespace left by a dead process (PID above any pid_max) is removed by Lab::new.
    // (Labs of parallel tests may remove it first, even while `ip netns add` runs: retry.)
    let stale = format!("{}999999999-0-stale", netns::PREFIX);
    let mut added = netns::add(&stale);
    for _ in 0..5 {
        if added.is_ok() {
            break;
        }
        added = netns::add(&stale);
    }
    added.unwrap();
    let lab = Lab::new().unwrap();
    assert!(!netns::exists(&stale), "stale namespace survived Lab::new");

    let host = lab.add_host(Nat::Restricted, Shaping::delay(5)).unwrap();
    lab.add_host(Nat::Double, Shaping::none()).unwrap();
    let mut child = host
        .spawn(Command::new("sleep").arg("30").stdout(Stdio::null()))
        .unwrap();
    let out = host
        .command("ip")
        .unwrap()
        .args(["-4", "addr"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.contains(&host.ip().to_string()),
        "spawned outside the host: {out}"
    );
    let names = lab.namespaces();
    assert!(names.len() >= 8, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with(lab.id())));
    drop(lab);
    let status = child.wait().unwrap();
    assert!(!status.success(), "child was not killed: {status}");
    let listed = String::from_utf8(
        Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    for n in &names {
        assert!(!listed.contains(n.as_str()), "{n} still listed");
        assert!(!netns::exists(n));
    }
}

#[test]
fn tcp_bulk_crosses_the_emulator_intact() {
    if !natlab::require_root() {
        return;
    }
    use sha2::{Digest, Sha256};
    let lab = Lab::new().unwrap();
    let host = lab
        .add_host(
            Nat::Easy,
            Shaping {
                delay_ms: 10,
                loss_pct: 1.0,
            },
        )
        .unwrap();
    let listener = lab.s().tcp_listen(sa(S1, 7400)).unwrap();
    const LEN: usize = 4 << 20;
    let data: Vec<u8> = (0..LEN).map(|i| (i * 7 + i / 977) as u8).collect();
    let want: [u8; 32] = Sha256::digest(&data).into();
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut got = Vec::with_capacity(LEN);
        c.read_to_end(&mut got).unwrap();
        let digest: [u8; 32] = Sha256::digest(&got).into();
        (got.len(), digest)
    });
    let t = Instant::now();
    let mut c = host
        .tcp_connect(sa(S1, 7400), Duration::from_secs(3))
        .unwrap();
    c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(&data).unwrap();
    drop(c);
    let (len, digest) = server.join().unwrap();
    let stats = lab.link_stats(&host).unwrap();
    println!("4 MiB over 10 ms / 1% loss in {:?}; {stats:?}", t.elapsed());
    assert_eq!(len, LEN);
    assert_eq!(digest, want);
    // GSO is off towards the emulator: loss hits single packets.
    assert!(stats.max_frame <= 1514, "{stats:?}");
    assert!(stats.lost[0] + stats.lost[1] > 0, "{stats:?}");
}

// ---- IPv6, the counting NAT, open-WAN routers and the ISP hop ----------------------------

const S6_1: Ipv6Addr = natlab::S_ADDRS6[0];
const S6_2: Ipv6Addr = natlab::S_ADDRS6[1];

fn sa6(ip: Ipv6Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(ip), port)
}

fn any6() -> SocketAddr {
    sa6(Ipv6Addr::UNSPECIFIED, 0)
}

/// What `ip -o ADDRESS-FAMILY WHAT show` prints inside `host`'s namespace.
fn ip_show(host: &Host, args: &[&str]) -> String {
    let out = host.command("ip").unwrap().args(args).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ipv6_policies_dual_stack_and_v6_only() {
    if !natlab::require_root() {
        return;
    }
    let t = Instant::now();
    let lab = Lab::new().unwrap();
    let s = lab.s();
    let _responder =
        Responder::start(&s, &[sa(S1, 7000), sa6(S6_1, 7000), sa6(S6_2, 7001)]).unwrap();
    let other6 = s.udp_bind(sa6(S6_2, 7003)).unwrap();
    // A public dual-stack host before any IPv6 router: it must get routes to later prefixes.
    let public6 = lab.add_public_host(Stack::Dual, Shaping::none()).unwrap();
    let off = lab.add_host(Nat::Easy, Shaping::none()).unwrap();
    let router = |ipv6: Ipv6| {
        lab.add_router_with(RouterSpec {
            ipv6,
            ..RouterSpec::new(Nat::Easy)
        })
        .unwrap()
    };
    let fw_router = router(Ipv6::Firewall);
    let fw = lab.add_host_behind(&fw_router).unwrap();
    let v6only = lab.add_host_behind_with(&fw_router, Stack::V6Only).unwrap();
    let open = lab.add_host_behind(&router(Ipv6::Open)).unwrap();
    let dropped = lab.add_host_behind(&router(Ipv6::Drop)).unwrap();
    let double = lab
        .add_host_with(RouterSpec {
            ipv6: Ipv6::Firewall,
            ..RouterSpec::new(Nat::Double)
        })
        .unwrap();
    let hop = lab
        .add_host_with(RouterSpec {
            ipv6: Ipv6::Firewall,
            isp_hop: true,
            shaping: Shaping::delay(5),
            ..RouterSpec::new(Nat::Easy)
        })
        .unwrap();
    let v6only_public = lab.add_public_host(Stack::V6Only, Shaping::none()).unwrap();
    let double_hop = lab
        .add_host_with(RouterSpec {
            ipv6: Ipv6::Firewall,
            isp_hop: true,
            ..RouterSpec::new(Nat::Double)
        })
        .unwrap();
    let udp_blocked = lab
        .add_host_with(RouterSpec {
            ipv6: Ipv6::Open,
            ..RouterSpec::new(Nat::UdpBlocked)
        })
        .unwrap();
    println!("IPv6 lab built in {:?}", t.elapsed());

    // IPv6 stays off where nobody asked for it.
    assert_eq!(off.ip6(), None);
    let off_router = lab.router_of(&off).unwrap();
    assert_eq!(off_router.wan_ip6(), None);
    for ns in [off.ns(), off_router.ns()] {
        assert_eq!(
            netns::read_sysctl(ns, "net.ipv6.conf.all.disable_ipv6").unwrap(),
            "1",
            "{ns}"
        );
    }
    assert!(off.udp_bind(any6()).is_err() || ip_show(&off, &["-6", "addr"]).is_empty());

    // Addresses: 2001:db8:<r>::<n> behind router r, like 10.r.0.n.
    let fw_ip6 = fw.ip6().expect("dual-stack host");
    let r = fw.ip().octets()[1];
    assert_eq!(
        fw_ip6.segments()[2],
        u16::from_str_radix(&r.to_string(), 16).unwrap()
    );
    assert_eq!(fw.gateway6(), fw_router.lan_gateway6());
    assert!(fw_router.wan_ip6().is_some());
    assert!(!v6only.has_ipv4() && v6only.ip() == Ipv4Addr::UNSPECIFIED);
    assert!(ip_show(&v6only, &["-4", "route"]).trim().is_empty());
    assert!(!ip_show(&v6only, &["-4", "addr"]).contains("inet 10."));
    assert!(lab.router_of(&hop).unwrap().isp_ns().is_some());
    println!(
        "fw {} / {fw_ip6}; v6-only {:?}; public {} / {:?}; double {:?}; hop {:?}",
        fw.ip(),
        v6only.ip6(),
        public6.ip(),
        public6.ip6(),
        double.ip6(),
        hop.ip6()
    );

    // STUN over IPv6: no NAT66, S sees each host's own address.
    let mut failures = Vec::new();
    for (name, host, passes) in [
        ("firewall", &fw, true),
        ("v6-only", &v6only, true),
        ("open", &open, true),
        ("drop", &dropped, false),
        ("double", &double, true),
        ("isp-hop", &hop, true),
        ("public", &public6, true),
        ("public v6-only", &v6only_public, true),
        ("double+isp-hop", &double_hop, true),
        ("udp-blocked", &udp_blocked, false),
    ] {
        let sock = host.udp_bind(any6()).unwrap();
        let local = sock.local_addr().unwrap().port();
        let m = binding(&sock, sa6(S6_1, 7000), WAIT, 3).unwrap();
        let want = passes.then(|| sa6(host.ip6().unwrap(), local));
        println!("{name:<15} IPv6 mapping {m:?}");
        if m != want {
            failures.push(format!("{name}: IPv6 mapping {m:?}, expected {want:?}"));
        }
        // IPv4 where the host has it (the NAT as before).
        let v4 = host.udp_bind(any()).unwrap();
        let m4 = binding(&v4, sa(S1, 7000), WAIT, 2).unwrap();
        let v4_passes = host.has_ipv4() && host.nat().passes_udp();
        if m4.map(|m| m.ip()) != v4_passes.then_some(IpAddr::V4(host.public_ip())) {
            failures.push(format!("{name}: IPv4 mapping {m4:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Filtering: S's other address reaches the open and public hosts, not the firewalled.
    for (name, host, admits) in [
        ("firewall", &fw, false),
        ("double", &double, false),
        ("open", &open, true),
        ("public", &public6, true),
    ] {
        let sock = host.udp_bind(any6()).unwrap();
        let m = binding(&sock, sa6(S6_1, 7000), WAIT, 3)
            .unwrap()
            .expect("mapping");
        other6.send_to(b"unsolicited", m).unwrap();
        let got = collect(&sock, WAIT);
        println!("{name:<9} unsolicited from S's other address: {got:?}");
        assert_eq!(!got.is_empty(), admits, "{name}");
    }

    // Host to host, across routers created before and after: firewall -> open passes, open
    // -> firewall only as an answer.
    let fs = fw.udp_bind(any6()).unwrap();
    let os = open.udp_bind(any6()).unwrap();
    let ps = public6.udp_bind(any6()).unwrap();
    let (f_at, o_at, p_at) = (
        sa6(fw_ip6, fs.local_addr().unwrap().port()),
        sa6(open.ip6().unwrap(), os.local_addr().unwrap().port()),
        sa6(public6.ip6().unwrap(), ps.local_addr().unwrap().port()),
    );
    os.send_to(b"o->f first", f_at).unwrap();
    assert!(
        collect(&fs, WAIT).is_empty(),
        "firewall let in a first packet"
    );
    fs.send_to(b"f->o", o_at).unwrap();
    assert_eq!(collect(&os, WAIT), vec![b"f->o".to_vec()]);
    os.send_to(b"o->f answer", f_at).unwrap();
    assert_eq!(collect(&fs, WAIT), vec![b"o->f answer".to_vec()]);
    ps.send_to(b"p->o", o_at).unwrap();
    assert_eq!(collect(&os, WAIT), vec![b"p->o".to_vec()]);
    os.send_to(b"o->p", p_at).unwrap();
    assert_eq!(collect(&ps, WAIT), vec![b"o->p".to_vec()]);

    // Blocks act on IPv6 too: a router's and a public host's.
    let _tcp = tcp_accepting(&s, sa6(S6_1, 7010), 15);
    for host in [&fw, &public6] {
        let sock = host.udp_bind(any6()).unwrap();
        let works = || binding(&sock, sa6(S6_1, 7000), WAIT, 2).unwrap().is_some();
        assert!(works(), "{}: IPv6 UDP before blocking", host.ns());
        lab.block(host, Block::Udp).unwrap();
        assert!(!works(), "{}: IPv6 UDP while blocked", host.ns());
        assert!(
            tcp_works(host, sa6(S6_1, 7010)),
            "{}: IPv6 TCP while UDP blocked",
            host.ns()
        );
        lab.block(host, Block::All).unwrap();
        assert!(
            !tcp_works(host, sa6(S6_1, 7010)),
            "{}: IPv6 TCP while blocked",
            host.ns()
        );
        lab.unblock(host).unwrap();
        assert!(works(), "{}: IPv6 UDP after unblocking", host.ns());
    }
    let stats = lab.link_stats(&hop).expect("the hop's link is shaped");
    assert!(
        stats.forwarded[0] > 0 && stats.forwarded[1] > 0,
        "{stats:?}"
    );
    println!("done in {:?}", t.elapsed());
}

#[test]
fn sequential_nat_counts_ports() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let s = lab.s();
    let dests = [sa(S1, 7000), sa(S1, 7001), sa(S2, 7000), sa(S2, 7001)];
    let _responder = Responder::start(&s, &dests).unwrap();
    let same_ip = s.udp_bind(sa(S1, 7002)).unwrap();
    let other_ip = s.udp_bind(sa(S2, 7003)).unwrap();
    for step in [1u16, 2, 3] {
        let router = lab.add_router_with(RouterSpec::sequential(step)).unwrap();
        assert_eq!(router.sequential_step(), Some(step));
        let host = lab.add_host_behind(&router).unwrap();
        assert_eq!(host.nat(), Nat::Hard);
        let sock = host.udp_bind(any()).unwrap();
        let mut ports = Vec::new();
        for d in dests {
            let m = binding(&sock, d, WAIT, 3).unwrap().expect("mapping");
            assert_eq!(m.ip(), IpAddr::V4(host.public_ip()));
            ports.push(m.port());
        }
        let p = natlab::SEQUENTIAL_FIRST_PORT;
        let want: Vec<u16> = (0..4).map(|i| p + i * step).collect();
        println!("step {step}: mapped ports {ports:?}");
        assert_eq!(ports, want, "step {step}");
        // A known destination keeps its mapping; a new socket's mapping comes next.
        let again = binding(&sock, dests[0], WAIT, 3).unwrap().expect("again");
        assert_eq!(again.port(), p);
        let sock2 = host.udp_bind(any()).unwrap();
        let next = binding(&sock2, dests[0], WAIT, 3).unwrap().expect("next");
        assert_eq!(next.port(), p + 4 * step);
        // Filtering as hard: neither S's other port nor its other address gets in.
        let m = sa(host.public_ip(), p);
        same_ip.send_to(b"same-ip", m).unwrap();
        other_ip.send_to(b"other-ip", m).unwrap();
        let got = collect(&sock, WAIT);
        assert!(got.is_empty(), "step {step}: unsolicited got in: {got:?}");
    }
    assert_eq!(
        RouterSpec::named("sequential-2").map(|s| s.name()),
        Some("sequential-2".into())
    );
    assert_eq!(
        RouterSpec::named("easy-open").map(|s| s.name()),
        Some("easy-open".into())
    );
}

/// A conntrack entry of `router` whose original direction went from `src` (any address if
/// `None`) to `dst`.
fn ct_find(router: &Router, src: Option<SocketAddr>, dst: SocketAddr) -> Option<CtEntry> {
    router
        .conntrack()
        .unwrap()
        .into_iter()
        .find(|e| e.proto == "udp" && e.orig.1 == dst && src.is_none_or(|s| e.orig.0 == s))
}

#[test]
fn open_wan_router_takes_unsolicited_packets() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _responder = Responder::start(&lab.s(), &[sa(S1, 7000)]).unwrap();
    for (i, open) in [false, true].into_iter().enumerate() {
        let spec = if open {
            RouterSpec::easy_open()
        } else {
            RouterSpec::new(Nat::Easy)
        };
        let a = lab.add_host_with(spec.clone()).unwrap();
        let b = lab.add_host_with(spec).unwrap();
        let rb = lab.router_of(&b).unwrap();
        assert_eq!(rb.open_wan(), open);
        let port = 41000 + i as u16;
        let b_wan = sa(b.public_ip(), port);
        let a_sock = a.udp_bind(any()).unwrap();
        let a_map = binding(&a_sock, sa(S1, 7000), WAIT, 3)
            .unwrap()
            .expect("A's mapping");
        // A knocks at B's WAN:port before B's host ever used that port.
        a_sock.send_to(b"knock", b_wan).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let knock = ct_find(&rb, Some(a_map), b_wan);
        // Now B's host sends from that port to A.
        let b_sock = b.udp_bind(sa(Ipv4Addr::UNSPECIFIED, port)).unwrap();
        b_sock.send_to(b"hello", a_map).unwrap();
        let got = collect(&a_sock, WAIT);
        let b_flow = ct_find(&rb, Some(sa(b.ip(), port)), a_map).expect("B's flow");
        let b_map = b_flow.reply.1;
        println!(
            "open WAN {open}: knock on B's router {:?}; B's host {port} mapped to {b_map}; A got {got:?}",
            knock.as_ref().map(|e| (e.orig, e.reply))
        );
        assert_eq!(
            knock.is_some(),
            open,
            "conntrack entry of the knock on B's router"
        );
        if open {
            assert_ne!(b_map.port(), port, "open WAN: the port should be taken");
            assert!(
                got.is_empty(),
                "A got B's packet from another port: {got:?}"
            );
        } else {
            assert_eq!(b_map, b_wan, "easy NAT keeps the port");
            assert_eq!(got, vec![b"hello".to_vec()]);
        }
    }
}

#[test]
fn low_ttl_expires_before_the_far_router() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let b = lab.add_host_with(RouterSpec::easy_open()).unwrap();
    // The same router without its ISP hop: the low TTL reaches it (the hop is what matters).
    let b_bare = lab
        .add_host_with(RouterSpec {
            isp_hop: false,
            ..RouterSpec::easy_open()
        })
        .unwrap();
    // TTL that passes A's own NAT (and A's ISP hop, if any) and dies at B's ISP hop.
    let cases = [
        (RouterSpec::new(Nat::Easy), &b, 2u32, false),
        (RouterSpec::easy_open(), &b, 3, false),
        (RouterSpec::new(Nat::Easy), &b_bare, 2, true),
    ];
    for (i, (spec, b, ttl, reaches)) in cases.into_iter().enumerate() {
        let rb = lab.router_of(b).unwrap();
        let a = lab.add_host_with(spec.clone()).unwrap();
        let ra = lab.router_of(&a).unwrap();
        let sock = a.udp_bind(any()).unwrap();
        let local = sa(a.ip(), sock.local_addr().unwrap().port());
        let low = sa(b.public_ip(), 42000 + 10 * i as u16);
        let high = sa(b.public_ip(), 42001 + 10 * i as u16);
        socket2::SockRef::from(&sock).set_ttl(ttl).unwrap();
        sock.send_to(b"low", low).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let own = ct_find(&ra, Some(local), low);
        let far = ct_find(&rb, None, low);
        // Control: the same with the default TTL reaches B's router.
        socket2::SockRef::from(&sock).set_ttl(64).unwrap();
        sock.send_to(b"high", high).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let far_high = ct_find(&rb, None, high);
        println!(
            "A {} -> B {}: TTL {ttl}: own mapping {:?}, at B {:?}; TTL 64 at B {:?}",
            spec.name(),
            if rb.isp_ns().is_some() {
                "with ISP hop"
            } else {
                "without"
            },
            own.as_ref().map(|e| e.reply.1),
            far.as_ref().map(|e| e.orig),
            far_high.as_ref().map(|e| e.orig)
        );
        assert!(own.is_some(), "TTL {ttl} did not open A's own mapping");
        assert_eq!(far.is_some(), reaches, "TTL {ttl} at B's router");
        assert!(far_high.is_some(), "TTL 64 did not reach B's router");
    }
}

/// One datagram on `sock` (which has IP_RECVTTL or IPV6_RECVHOPLIMIT on), with its sender
/// and TTL / hop limit.
fn recv_with_ttl(sock: &UdpSocket, wait: Duration) -> Option<(SocketAddr, u8)> {
    use std::os::fd::AsRawFd;
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 1500];
    let mut control = [0u64; 32];
    // SAFETY: plain data, all-zero is valid.
    let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: plain data, all-zero is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = &mut from as *mut libc::sockaddr_storage as *mut libc::c_void;
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: recvmsg with buffers that live through the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return None;
    }
    // SAFETY: `from` was filled in by recvmsg with `msg_namelen` bytes.
    let from = unsafe { socket2::SockAddr::new(from, msg.msg_namelen) }.as_socket()?;
    let mut ttl = None;
    // SAFETY: walking the control messages recvmsg wrote, with the libc macros.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if (level == libc::IPPROTO_IP && kind == libc::IP_TTL)
                || (level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT)
            {
                ttl = Some(*(libc::CMSG_DATA(c) as *const libc::c_int) as u8);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Some((from, ttl?))
}

#[test]
fn isp_hop_passes_traffic_one_hop_later() {
    if !natlab::require_root() {
        return;
    }
    let lab = Lab::new().unwrap();
    let s = lab.s();
    let _responder = Responder::start(&s, &[sa(S1, 7000), sa6(S6_1, 7000)]).unwrap();
    let probe4 = s.udp_bind(sa(S1, 7500)).unwrap();
    let probe6 = s.udp_bind(sa6(S6_1, 7500)).unwrap();
    let on = 1 as libc::c_int;
    for (sock, level, opt) in [
        (&probe4, libc::IPPROTO_IP, libc::IP_RECVTTL),
        (&probe6, libc::IPPROTO_IPV6, libc::IPV6_RECVHOPLIMIT),
    ] {
        use std::os::fd::AsRawFd;
        // SAFETY: setsockopt with a live c_int.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                level,
                opt,
                &on as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
    }
    let cases = [
        ("easy", RouterSpec::new(Nat::Easy), 63u8),
        (
            "easy+isp-hop+ipv6",
            RouterSpec {
                isp_hop: true,
                ipv6: Ipv6::Firewall,
                ..RouterSpec::new(Nat::Easy)
            },
            62,
        ),
        ("easy-open", RouterSpec::easy_open(), 62),
        (
            "easy-open shaped",
            RouterSpec {
                shaping: Shaping::delay(10),
                ..RouterSpec::easy_open()
            },
            62,
        ),
    ];
    for (name, spec, want) in cases {
        let host = lab.add_host_with(spec).unwrap();
        let router = lab.router_of(&host).unwrap();
        assert_eq!(router.isp_ns().is_some(), want == 62, "{name}");
        let mut targets = vec![(sa(S1, 7000), sa(S1, 7500), &probe4, any())];
        if host.ip6().is_some() {
            targets.push((sa6(S6_1, 7000), sa6(S6_1, 7500), &probe6, any6()));
        }
        for (stun_at, probe_at, probe, bind) in targets {
            let sock = host.udp_bind(bind).unwrap();
            let m = binding(&sock, stun_at, Duration::from_secs(1), 3)
                .unwrap()
                .unwrap_or_else(|| panic!("{name}: no STUN answer from {stun_at}"));
            sock.send_to(b"ttl?", probe_at).unwrap();
            let (from, ttl) = recv_with_ttl(probe, Duration::from_secs(1))
                .unwrap_or_else(|| panic!("{name}: nothing at {probe_at}"));
            println!("{name:<18} via {stun_at}: mapped {m}, seen from {from} with TTL {ttl}");
            assert_eq!(from, m, "{name}");
            assert_eq!(ttl, want, "{name}: TTL at S");
        }
        // A shaped link behind the hop is still the router's (its emulator's counters).
        let stats = lab.link_stats(&host);
        assert_eq!(
            stats.is_some(),
            name.ends_with("shaped"),
            "{name}: {stats:?}"
        );
    }
}
