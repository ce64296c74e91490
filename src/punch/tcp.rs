//! TCP hole punching: simultaneous open from the agent's listening port.
//!
//! Each agent listens on a TCP port with SO_REUSEADDR and SO_REUSEPORT, so that it can also
//! connect *from* that same port. At the start time S gave, both agents connect to each
//! other's TCP candidates, retrying every 1.5 s until the deadline; a connect that fails or
//! times out closes only its own socket, never the listener. Each outgoing SYN opens the
//! sender's NAT; the connection arrives either through `connect` (simultaneous open, or the
//! peer's NAT let the SYN through) or through `accept` (our NAT let the peer's SYN in).
//!
//! Whatever arrives must prove it belongs to the session before it is used: both ends send a
//! hello carrying the ICE-style username and an HMAC-SHA256 keyed by the receiver's session
//! password. Several connections may be proven at once (one each way); the forwarder (the
//! controlling side, as in ICE) nominates one with a byte `1` and the exposer uses that one.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::candidates::Families;
use super::checks::{self, DEADLINE, MAX_CANDIDATES};
use crate::proto::{stun, Credentials, Rendezvous};

const MAGIC: &[u8; 8] = b"P2PTT/1\n";

/// How often connects are retried, and how long one may take.
pub const RETRY: Duration = Duration::from_millis(1500);

/// How long a connection may take to send its hello or nomination.
const HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a TCP punch failed.
#[derive(Debug, thiserror::Error)]
pub enum TcpPunchError {
    /// The peer has no TCP candidates.
    #[error("the peer offers no TCP address")]
    NoCandidates,
    /// Nothing connected before the deadline.
    #[error(
        "no direct TCP path: none of the peer's {tried} TCP address(es) connected within {secs}s",
        secs = DEADLINE.as_secs()
    )]
    NoPath {
        /// How many addresses were tried.
        tried: usize,
    },
}

/// The hello that proves `creds`' session: `MAGIC`, the username `remote:local` (length-
/// prefixed), and HMAC-SHA256(remote password, username).
pub fn hello(creds: &Credentials) -> Vec<u8> {
    let username = format!("{}:{}", creds.remote_ufrag, creds.local_ufrag);
    let mac = mac(&creds.remote_pwd, &username);
    let mut out = Vec::with_capacity(8 + 1 + username.len() + 32);
    out.extend_from_slice(MAGIC);
    out.push(username.len().min(255) as u8);
    out.extend_from_slice(&username.as_bytes()[..username.len().min(255)]);
    out.extend_from_slice(mac.as_ref());
    out
}

fn mac(password: &str, username: &str) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, password.as_bytes());
    ring::hmac::sign(&key, username.as_bytes())
}

/// A hello as read off the wire: the username and its MAC, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// `receiver:sender` username fragments.
    pub username: String,
    mac: Vec<u8>,
}

impl Hello {
    /// The receiver's username fragment (ours, if the hello is for us).
    pub fn receiver(&self) -> &str {
        self.username.split_once(':').map_or("", |(r, _)| r)
    }

    /// Whether the hello proves the session of `creds` (seen from the receiving side).
    pub fn verify(&self, creds: &Credentials) -> bool {
        let expected = format!("{}:{}", creds.local_ufrag, creds.remote_ufrag);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, creds.local_pwd.as_bytes());
        self.username == expected
            && ring::hmac::verify(&key, expected.as_bytes(), &self.mac).is_ok()
    }
}

/// Reads a hello (bounded in size; the caller bounds the time).
pub async fn read_hello<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Hello> {
    let bad = |what| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).await?;
    if &magic != MAGIC {
        return Err(bad("not a p2ptun TCP hello"));
    }
    let len = r.read_u8().await? as usize;
    let mut username = vec![0u8; len];
    r.read_exact(&mut username).await?;
    let mut mac = vec![0u8; 32];
    r.read_exact(&mut mac).await?;
    let username = String::from_utf8(username).map_err(|_| bad("username is not UTF-8"))?;
    Ok(Hello { username, mac })
}

/// The agent's TCP punching port: one listener, and the sessions waiting for connections.
pub struct TcpPunch {
    local: SocketAddr,
    /// Sessions punching now, by our username fragment.
    waiting: Mutex<HashMap<String, Waiting>>,
}

/// A session punching now: its credentials and where proven connections go.
#[derive(Clone)]
struct Waiting {
    creds: Credentials,
    ready: mpsc::Sender<(TcpStream, SocketAddr)>,
}

impl std::fmt::Debug for TcpPunch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpPunch")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// A socket bound to `local` that shares its port with the listener.
fn reusable(local: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = if local.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(local)?;
    Ok(socket)
}

impl TcpPunch {
    /// Listens at `local` (port 0 picks one) and starts accepting.
    pub fn bind(local: SocketAddr) -> std::io::Result<Arc<Self>> {
        let listener: TcpListener = reusable(local)?.listen(1024)?;
        let local = listener.local_addr()?;
        let this = Arc::new(TcpPunch {
            local,
            waiting: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(Arc::downgrade(&this), listener));
        Ok(this)
    }

    /// The listening address.
    pub fn local(&self) -> SocketAddr {
        self.local
    }

    /// This agent's TCP address as S sees it: a STUN Binding over TCP to S's port, from the
    /// punching port (so the NAT mapping is the one peers will connect to).
    pub async fn reflexive(&self, server: SocketAddr) -> Option<SocketAddr> {
        let exchange = async {
            let mut tcp = reusable(self.local).ok()?.connect(server).await.ok()?;
            let tid = stun::new_tid();
            tcp.write_all(&stun::binding_request(tid, None))
                .await
                .ok()?;
            let mut header = [0u8; 20];
            tcp.read_exact(&mut header).await.ok()?;
            let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
            if len > 512 {
                return None;
            }
            let mut msg = header.to_vec();
            msg.resize(20 + len, 0);
            tcp.read_exact(&mut msg[20..]).await.ok()?;
            let msg = stun::decode(&msg).ok()?;
            (msg.transaction_id() == tid && stun::is_binding_success(&msg))
                .then(|| stun::mapped_address(&msg))
                .flatten()
        };
        tokio::time::timeout(Duration::from_secs(3), exchange)
            .await
            .ok()
            .flatten()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiting>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Punches a TCP connection to the peer of session `rv`. The forwarder is `controlling`.
    pub async fn punch(
        self: &Arc<Self>,
        rv: &Rendezvous,
        controlling: bool,
    ) -> Result<(TcpStream, SocketAddr), TcpPunchError> {
        let targets = checks::plan(&rv.peer_candidates, Families::of(self.local), true);
        if targets.is_empty() {
            return Err(TcpPunchError::NoCandidates);
        }
        let creds = rv.credentials.clone();
        let (ready_tx, mut ready) = mpsc::channel::<(TcpStream, SocketAddr)>(MAX_CANDIDATES * 4);
        self.lock().insert(
            creds.local_ufrag.clone(),
            Waiting {
                creds: creds.clone(),
                ready: ready_tx.clone(),
            },
        );
        let _unregister = Unregister(self.clone(), creds.local_ufrag.clone());

        tokio::time::sleep(Duration::from_millis(rv.start_in_ms).min(Duration::from_secs(2))).await;
        let deadline = Instant::now() + DEADLINE;
        let mut attempts = JoinSet::new();
        let mut next_round = Instant::now();
        let (chosen_tx, mut chosen_rx) = mpsc::channel::<(TcpStream, SocketAddr)>(1);
        let chosen = loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next_round), if next_round < deadline => {
                    for to in &targets {
                        let (local, to, creds, tx) = (self.local, *to, creds.clone(), ready_tx.clone());
                        attempts.spawn(async move {
                            let attempt = tokio::time::timeout(RETRY, connect_and_greet(local, to, &creds));
                            if let Ok(Ok(stream)) = attempt.await {
                                let _ = tx.send((stream, to)).await;
                            }
                        });
                    }
                    next_round += RETRY;
                }
                Some((mut stream, from)) = ready.recv() => {
                    if controlling {
                        if stream.write_all(&[1]).await.is_ok() {
                            break Some((stream, from));
                        }
                    } else {
                        // Wait for the forwarder's choice on every proven connection at once.
                        let chosen_tx = chosen_tx.clone();
                        attempts.spawn(async move {
                            let byte = tokio::time::timeout(HELLO_TIMEOUT, stream.read_u8()).await;
                            if matches!(byte, Ok(Ok(1))) {
                                let _ = chosen_tx.send((stream, from)).await;
                            }
                        });
                    }
                }
                Some(chosen) = chosen_rx.recv() => break Some(chosen),
                Some(_) = attempts.join_next(), if !attempts.is_empty() => {}
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        attempts.abort_all();
        chosen.ok_or(TcpPunchError::NoPath {
            tried: targets.len(),
        })
    }
}

async fn connect_and_greet(
    local: SocketAddr,
    to: SocketAddr,
    creds: &Credentials,
) -> std::io::Result<TcpStream> {
    let mut stream = reusable(local)?.connect(to).await?;
    stream.write_all(&hello(creds)).await?;
    let theirs = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no hello"))??;
    if !theirs.verify(creds) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "bad hello",
        ));
    }
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

struct Unregister(Arc<TcpPunch>, String);

impl Drop for Unregister {
    fn drop(&mut self) {
        self.0.lock().remove(&self.1);
    }
}

/// Accepts connections on the punching port, reads their hello, and when it proves a session
/// punching now, answers with our hello and hands the connection to that session. Anything
/// else is closed without a word.
async fn accept_loop(this: std::sync::Weak<TcpPunch>, listener: TcpListener) {
    loop {
        let Ok((mut stream, from)) = listener.accept().await else {
            // Out of descriptors and the like: pause rather than spin.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Some(punch) = this.upgrade() else { return };
        tokio::spawn(async move {
            let Ok(Ok(theirs)) = tokio::time::timeout(HELLO_TIMEOUT, read_hello(&mut stream)).await
            else {
                return;
            };
            let Some(waiting) = punch.lock().get(theirs.receiver()).cloned() else {
                return;
            };
            if !theirs.verify(&waiting.creds) {
                tracing::debug!(%from, "TCP hello with bad credentials");
                return;
            }
            if stream.write_all(&hello(&waiting.creds)).await.is_err() {
                return;
            }
            let _ = stream.set_nodelay(true);
            let _ = waiting.ready.send((stream, from)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::testing::creds;

    #[tokio::test]
    async fn hellos_prove_the_session_and_nothing_else() {
        let (a, b) = (creds("aa", "bb"), creds("bb", "aa"));
        let from_a = read_hello(&mut &hello(&a)[..]).await.unwrap();
        assert_eq!(from_a.receiver(), "bb");
        assert!(from_a.verify(&b));
        assert!(!from_a.verify(&a));
        let mut wrong = b.clone();
        wrong.local_pwd = "other".into();
        assert!(!from_a.verify(&wrong));
        assert!(read_hello(&mut &b"GET / HTTP/1.1\r\n\r\n"[..])
            .await
            .is_err());
        assert!(read_hello(&mut &hello(&a)[..20]).await.is_err());
    }

    #[tokio::test]
    async fn two_punchers_on_loopback_agree_on_one_connection() {
        let (pa, pb) = (
            TcpPunch::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
            TcpPunch::bind("127.0.0.1:0".parse().unwrap()).unwrap(),
        );
        let rv = |peer: SocketAddr, creds: Credentials| Rendezvous {
            session: 1,
            name: "x".into(),
            peer_fingerprint: crate::proto::Fingerprint([0; 32]),
            peer_candidates: vec![crate::proto::Candidate {
                kind: crate::proto::CandidateKind::TcpHost,
                addr: peer,
            }],
            credentials: creds,
            start_in_ms: 0,
            relay: false,
            peer_nat: Default::default(),
        };
        let (ra, rb) = (
            rv(pb.local(), creds("aa", "bb")),
            rv(pa.local(), creds("bb", "aa")),
        );
        let (a, b) = tokio::join!(pa.punch(&ra, true), pb.punch(&rb, false));
        let (mut a, _) = a.unwrap();
        let (mut b, _) = b.unwrap();
        a.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        b.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[tokio::test]
    async fn a_punch_without_a_peer_ends_at_the_deadline_with_a_clear_error() {
        let p = TcpPunch::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let rv = Rendezvous {
            session: 1,
            name: "x".into(),
            peer_fingerprint: crate::proto::Fingerprint([0; 32]),
            peer_candidates: vec![],
            credentials: creds("aa", "bb"),
            start_in_ms: 0,
            relay: false,
            peer_nat: Default::default(),
        };
        assert!(matches!(
            p.punch(&rv, true).await,
            Err(TcpPunchError::NoCandidates)
        ));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// A hello made from any session's credentials reads back and proves that session
            /// to the other side, and only with its password.
            #[test]
            fn hellos_round_trip(local in "[ -~]{0,100}", remote in "[ -~]{0,100}", pwd in ".{1,40}", other in ".{1,40}") {
                let ours = Credentials {
                    local_ufrag: local.clone(),
                    local_pwd: other.clone(),
                    remote_ufrag: remote.clone(),
                    remote_pwd: pwd.clone(),
                };
                let theirs = Credentials {
                    local_ufrag: remote,
                    local_pwd: pwd.clone(),
                    remote_ufrag: local,
                    remote_pwd: other,
                };
                let bytes = hello(&ours);
                let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
                let read = rt.block_on(read_hello(&mut &bytes[..])).unwrap();
                prop_assert!(read.verify(&theirs));
                let mut wrong = theirs.clone();
                wrong.local_pwd = format!("{pwd}x");
                prop_assert!(!read.verify(&wrong));
            }
        }
    }
}
