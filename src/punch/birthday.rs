//! The symmetric side of a birthday punch ([`super::symmetric::Strategy::OpenMany`]): many
//! sockets that each send a check to the peer's one mapping, so that each gets a random
//! public port of its own, and then the path over whichever socket the peer's probes found.
//!
//! The winning socket is not the agent's main socket, so its path is a channel path like a
//! TCP one: QUIC datagrams for the peer go out of it, and what comes in is handed to quinn
//! as if it came from the peer's virtual address. The peer keeps the path alive and checked
//! from its side (its checker's keepalives every half second arrive here and are answered), so
//! this side judges liveness by those checks arriving.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::router::answer;
use super::symmetric::SOCKETS;
use crate::path::Injected;
use crate::proto::{stun, Credentials};

/// How often each socket repeats its check to the peer, in case the first was lost.
const RESEND: Duration = Duration::from_secs(3);

/// Silence (no check from the peer) after which the path is reported not live: the same
/// verdict the peer's own checks of this path reach (see [`super::checker::DEAD_AFTER`]).
pub const DEAD_AFTER: Duration = super::checker::DEAD_AFTER;

/// Datagrams waiting to be sent before new ones are lost.
const QUEUE: usize = 1024;

/// Why no socket was reached.
#[derive(Debug, thiserror::Error)]
pub enum BirthdayError {
    /// Not one socket could be opened.
    #[error("cannot open sockets for the birthday punch: {0}")]
    Bind(std::io::Error),
    /// The peer's probes found none of the sockets before the deadline.
    #[error("none of {0} sockets was reached by the peer's probes before the deadline")]
    NotReached(usize),
}

/// Opens up to [`SOCKETS`] sockets on `local`, sends a Binding indication from each to `to`
/// (the peer's mapping) so that each gets a public port of its own, and waits until
/// `deadline` for the peer's probes to find one of them. Returns that socket and the peer's
/// address; every other socket is closed at once.
///
/// The sockets send indications, not checks, on purpose: a check that got through a NAT that
/// filters only by address would be answered, and the session would take a side socket when
/// the main one works as well. Only a probe of the peer's, which it sends when its ordinary
/// checks found nothing, makes a winner.
pub async fn open_many(
    local: IpAddr,
    to: SocketAddr,
    creds: &Credentials,
    deadline: Instant,
) -> Result<(UdpSocket, SocketAddr), BirthdayError> {
    let mut sockets = Vec::with_capacity(SOCKETS);
    for _ in 0..SOCKETS {
        match UdpSocket::bind(SocketAddr::new(local, 0)).await {
            Ok(s) => sockets.push(s),
            // Out of descriptors or ports: fewer sockets only lower the odds.
            Err(e) if !sockets.is_empty() => {
                tracing::debug!(opened = sockets.len(), error = %e, "birthday punch: fewer sockets");
                break;
            }
            Err(e) => return Err(BirthdayError::Bind(e)),
        }
    }
    let opened = sockets.len();
    let mut waiting = JoinSet::new();
    for socket in sockets {
        waiting.spawn(wait_for_probe(socket, to, creds.clone(), deadline));
    }
    let found = tokio::time::timeout_at(deadline, async {
        while let Some(done) = waiting.join_next().await {
            if let Ok(Some(found)) = done {
                return Some(found);
            }
        }
        None
    })
    .await;
    // Aborting closes the other sockets now, not at the deadline.
    waiting.abort_all();
    match found {
        Ok(Some(found)) => Ok(found),
        _ => Err(BirthdayError::NotReached(opened)),
    }
}

/// One socket's part: open (and every [`RESEND`] refresh) its mapping toward the peer, and
/// answer the first valid probe, which proves the peer reaches this socket.
async fn wait_for_probe(
    socket: UdpSocket,
    to: SocketAddr,
    creds: Credentials,
    deadline: Instant,
) -> Option<(UdpSocket, SocketAddr)> {
    let indication = stun::binding_indication();
    let mut buf = vec![0u8; 1500];
    let mut next_send = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(next_send) => {
                let _ = socket.send_to(&indication, to).await;
                next_send += RESEND;
            }
            got = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = got else { continue };
                // Only the peer's address may claim the socket, whatever port it uses.
                if from.ip() != to.ip() {
                    continue;
                }
                if let Some(reply) = answer_probe(&buf[..n], from, &creds) {
                    let _ = socket.send_to(&reply, from).await;
                    return Some((socket, from));
                }
            }
            _ = tokio::time::sleep_until(deadline) => return None,
        }
    }
}

/// The answer to `data` if it is a valid check of this session.
fn answer_probe(data: &[u8], from: SocketAddr, creds: &Credentials) -> Option<Vec<u8>> {
    if !stun::is_stun(data) {
        return None;
    }
    let msg = stun::decode(data).ok()?;
    if !stun::is_binding_request(&msg) {
        return None;
    }
    let (ours, theirs) = stun::username(&msg)?.split_once(':')?;
    if ours != creds.local_ufrag {
        return None;
    }
    answer(&msg, from, theirs, &creds.remote_ufrag, &creds.local_pwd)
}

/// Runs the path over `socket` to the peer at `remote` (virtual address `virt`): datagrams put
/// into the returned sender go out of the socket; QUIC datagrams from `remote` go to
/// `injector`; the peer's checks are answered. The watch says whether the peer's checks still
/// arrive; the oneshot fires when the path has ended, which it does when every sender is
/// dropped.
pub fn spawn_path(
    socket: UdpSocket,
    remote: SocketAddr,
    virt: SocketAddr,
    creds: Credentials,
    injector: mpsc::Sender<Injected>,
) -> (
    mpsc::Sender<Bytes>,
    oneshot::Receiver<std::io::Result<()>>,
    watch::Receiver<bool>,
) {
    let (tx, mut rx) = mpsc::channel::<Bytes>(QUEUE);
    let (done_tx, done_rx) = oneshot::channel();
    let (live_tx, live_rx) = watch::channel(true);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        let mut last_check = Instant::now();
        let mut ticker = tokio::time::interval(DEAD_AFTER / 3);
        let result: std::io::Result<()> = loop {
            tokio::select! {
                packet = rx.recv() => {
                    let Some(packet) = packet else { break Ok(()) };
                    if let Err(e) = socket.send_to(&packet, remote).await {
                        tracing::trace!(%remote, error = %e, "side path send failed");
                    }
                }
                got = socket.recv_from(&mut buf) => {
                    let (n, from) = match got {
                        Ok(got) => got,
                        Err(e) => break Err(e),
                    };
                    if from != remote {
                        continue;
                    }
                    let data = &buf[..n];
                    if stun::is_stun(data) {
                        if let Some(reply) = answer_probe(data, from, &creds) {
                            last_check = Instant::now();
                            live_tx.send_if_modified(|live| !std::mem::replace(live, true));
                            let _ = socket.send_to(&reply, from).await;
                        }
                        continue;
                    }
                    let packet = Injected { from: virt, data: Bytes::copy_from_slice(data) };
                    if injector.send(packet).await.is_err() {
                        break Ok(());
                    }
                }
                _ = ticker.tick() => {
                    let now = last_check.elapsed() < DEAD_AFTER;
                    live_tx.send_if_modified(|live| std::mem::replace(live, now) != now);
                }
            }
        };
        let _ = done_tx.send(result);
    });
    (tx, done_rx, live_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::punch::session::check_request;
    use crate::punch::testing::creds;

    #[test]
    fn only_the_sessions_checks_are_answered() {
        let (a, b) = (creds("aa", "bb"), creds("bb", "aa"));
        let from: SocketAddr = "203.0.113.9:4000".parse().unwrap();
        let reply = answer_probe(&check_request(stun::new_tid(), &b), from, &a)
            .expect("the peer's check is answered");
        let msg = stun::decode(&reply).unwrap();
        assert!(stun::is_binding_success(&msg));
        assert!(stun::has_valid_integrity(&msg, &a.local_pwd));
        // Another session's check, our own check reflected, an indication, garbage: nothing.
        let other = check_request(stun::new_tid(), &creds("cc", "aa"));
        assert!(answer_probe(&other, from, &a).is_none());
        assert!(answer_probe(&check_request(stun::new_tid(), &a), from, &a).is_none());
        assert!(answer_probe(&stun::binding_indication(), from, &a).is_none());
        assert!(answer_probe(&[0xc0; 40], from, &a).is_none());
        assert!(answer_probe(&[], from, &a).is_none());
    }

    #[tokio::test]
    async fn the_peer_finds_one_of_the_sockets_and_the_rest_close() {
        let (a, b) = (creds("aa", "bb"), creds("bb", "aa"));
        // The peer: one socket that learns a birthday socket's address from its indication
        // and probes it, as one of its random probes would.
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = peer.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let probe = async {
            let mut buf = [0u8; 1500];
            let (_, target) = peer.recv_from(&mut buf).await.unwrap();
            peer.send_to(&check_request(stun::new_tid(), &b), target)
                .await
                .unwrap();
            // Other sockets' indications may come first; wait for the answer.
            loop {
                let (n, from) = peer.recv_from(&mut buf).await.unwrap();
                let msg = stun::decode(&buf[..n]).unwrap();
                if stun::is_binding_success(&msg) {
                    assert!(stun::has_valid_integrity(&msg, &a.local_pwd));
                    return (target, from);
                }
            }
        };
        let (won, (target, answered_from)) = tokio::join!(
            open_many("127.0.0.1".parse().unwrap(), to, &a, deadline),
            probe
        );
        let (socket, remote) = won.unwrap();
        assert_eq!(remote, to);
        assert_eq!(socket.local_addr().unwrap(), target);
        assert_eq!(answered_from, target);
    }

    #[tokio::test]
    async fn nobody_probing_ends_at_the_deadline() {
        let a = creds("aa", "bb");
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let started = Instant::now();
        let result = open_many(
            "127.0.0.1".parse().unwrap(),
            silent.local_addr().unwrap(),
            &a,
            started + Duration::from_millis(300),
        )
        .await;
        assert!(matches!(result, Err(BirthdayError::NotReached(n)) if n > 0));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
