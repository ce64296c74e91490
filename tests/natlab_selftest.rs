//! Checks of the NAT lab itself: each preset maps and filters as named (STUN from inside the
//! lab against S's two addresses), routers ignore unsolicited traffic to themselves, the link
//! emulator delays and loses, conntrack timeouts apply, same LAN, double NAT, blocks, and
//! cleanup. If these fail, the NAT tests' failures say nothing about p2ptun.
//!
//! Needs root and nftables (skips otherwise, unless CI=true).

#[path = "natlab/mod.rs"]
mod natlab;

use std::collections::HashSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use natlab::stun::{binding, Responder};
use natlab::{netns, Block, Host, Lab, Nat, RouterSpec, Shaping};
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
