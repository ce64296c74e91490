//! Keeping watch over a direct UDP path once found: a check every half second, with the
//! session's credentials. These checks double as the keepalive that holds both NATs' mappings
//! open; when they go unanswered the path is marked dead and traffic moves to the next best
//! path within about 1.5 s, and back when the checks are answered again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::router::StunRouter;
use super::session::check;
use crate::path::PathKind;
use crate::proto::Credentials;

/// Time between checks.
pub const INTERVAL: Duration = Duration::from_millis(500);

/// How long one check may go unanswered (its retransmits included) before the path is dead.
pub const TIMEOUT: Duration = Duration::from_millis(1000);

/// Watches the direct path to `remote` of the peer at `virt` until the task is dropped.
pub async fn watch(
    router: Arc<StunRouter>,
    virt: SocketAddr,
    remote: SocketAddr,
    creds: Credentials,
) {
    let mut live = true;
    let mut next = Instant::now() + INTERVAL;
    loop {
        tokio::time::sleep_until(next).await;
        next += INTERVAL;
        let start = Instant::now();
        let answered = check(
            router.clone(),
            remote,
            creds.clone(),
            start,
            start + TIMEOUT,
        )
        .await;
        let mut table = router.socket().table_write();
        match answered {
            Some((_, rtt)) => {
                table.add_udp_path(virt, remote, Some(rtt));
                if !live {
                    live = true;
                    tracing::info!(%remote, "direct UDP path is back; traffic returns to it");
                }
            }
            None if live => {
                live = false;
                table.set_live(virt, PathKind::DirectUdp, remote, false);
                let now = table.selected(virt);
                tracing::warn!(
                    %remote,
                    "direct UDP path stopped answering; now using {}",
                    now.map(|(k, a)| format!("{k} ({a})")).unwrap_or_else(|| "no path".into())
                );
            }
            None => {}
        }
        // Never let the checks fall behind: skip ticks that have passed.
        let now = Instant::now();
        if next < now {
            next = now + INTERVAL;
        }
    }
}

/// A task that ends when this guard is dropped.
#[derive(Debug)]
pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
