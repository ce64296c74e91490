//! A real etcd cluster on 127.0.0.1 for the cluster tests: Debian's `etcd` (package
//! `etcd-server`), one process per member, each with its own data directory in the test's
//! files, so a member can be killed and started again with its data. In the NAT lab it runs
//! on the loopback of S's namespace, beside the S that use it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use p2ptun_relay::etcd::{Etcd, EtcdAuth};
use serde_json::json;

use crate::{free_port, installed, Lab, Place, Proc};

/// How long a new cluster may take to answer.
const HEALTHY: Duration = Duration::from_secs(20);

struct Member {
    name: String,
    client: u16,
    peer: u16,
    proc: Option<Proc>,
}

/// Some etcd members on loopback that form one cluster.
pub struct EtcdCluster {
    place: Place,
    /// The root login, once authentication is on.
    root: Option<EtcdAuth>,
    members: Vec<Member>,
    initial: String,
    dir: PathBuf,
    logs: PathBuf,
}

impl EtcdCluster {
    /// Whether etcd is installed.
    pub fn available() -> bool {
        installed("etcd", "--version")
    }

    /// Starts `n` members and waits until the cluster answers.
    pub async fn start(lab: &Lab, n: usize) -> anyhow::Result<EtcdCluster> {
        EtcdCluster::start_in(lab, Place::here(), n).await
    }

    /// [`EtcdCluster::start`] in `place` (S's namespace of the NAT lab). Out of this
    /// namespace, [`EtcdCluster::client`] cannot reach it; readiness is read off its logs.
    pub async fn start_in(lab: &Lab, place: Place, n: usize) -> anyhow::Result<EtcdCluster> {
        let members: Vec<Member> = (1..=n)
            .map(|i| Member {
                name: format!("e{i}"),
                client: free_port(),
                peer: free_port(),
                proc: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            place,
            root: None,
            members,
            initial,
            dir: lab.path().join("etcd"),
            logs: lab.logs(),
        };
        for i in 0..n {
            cluster.launch(i);
        }
        cluster.wait_healthy().await?;
        Ok(cluster)
    }

    fn launch(&mut self, i: usize) {
        let m = &self.members[i];
        let mut cmd = match self.place.command("etcd") {
            Ok(cmd) => cmd,
            Err(e) => panic!("etcd in {}: {e}", self.place),
        };
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(self.dir.join(&m.name))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{}",
                m.client
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                m.peer
            ))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=p2ptun-test");
        let proc = Proc::spawn(&format!("etcd-{}", m.name), cmd, &self.logs);
        self.members[i].proc = Some(proc);
    }

    fn url_list(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    /// The client URLs, comma-separated (`--etcd`).
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// A client of the whole cluster (logged in as root once authentication is on).
    pub fn client(&self) -> Etcd {
        Etcd::new(&self.url_list(), Duration::from_secs(2))
            .expect("the cluster's URLs")
            .with_auth(self.root.clone())
    }

    /// Turns etcd's authentication on, with `user`/`password` allowed to read and write
    /// the keys under `/p2ptun/` only, as an operator would set up S's user.
    pub async fn enable_auth(&mut self, user: &str, password: &str) -> anyhow::Result<()> {
        let root = EtcdAuth {
            user: "root".into(),
            password: format!("root-{password}"),
        };
        let client = self.client();
        let b64 = |s: &str| {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD.encode(s)
        };
        let calls = [
            ("/v3/auth/role/add", json!({ "name": "root" })),
            (
                "/v3/auth/user/add",
                json!({ "name": "root", "password": root.password }),
            ),
            (
                "/v3/auth/user/grant",
                json!({ "user": "root", "role": "root" }),
            ),
            ("/v3/auth/role/add", json!({ "name": user })),
            (
                "/v3/auth/role/grant",
                json!({ "name": user, "perm": {
                    "permType": "READWRITE",
                    "key": b64("/p2ptun/"),
                    // The end of the prefix: '/' + 1.
                    "range_end": b64("/p2ptun0"),
                }}),
            ),
            (
                "/v3/auth/user/add",
                json!({ "name": user, "password": password }),
            ),
            ("/v3/auth/user/grant", json!({ "user": user, "role": user })),
            ("/v3/auth/enable", json!({})),
        ];
        for (path, body) in calls {
            client
                .call(path, body)
                .await
                .with_context(|| format!("etcd {path}"))?;
        }
        self.root = Some(root);
        Ok(())
    }

    /// Waits until a write through the cluster succeeds (in another namespace: until every
    /// member running logs that it serves clients, which etcd does once it has joined a
    /// cluster with a quorum).
    pub async fn wait_healthy(&self) -> anyhow::Result<()> {
        if !self.place.is_here() {
            for m in self.members.iter().filter_map(|m| m.proc.as_ref()) {
                if m.wait_log_any(&["ready to serve client requests"], HEALTHY)
                    .await
                    .is_none()
                {
                    bail!(
                        "etcd did not get ready within {HEALTHY:?}\n{}",
                        self.reports()
                    );
                }
            }
            return Ok(());
        }
        let client = self.client();
        let start = Instant::now();
        loop {
            match client.put("/p2ptun-test/health", b"ok", None).await {
                Ok(()) => return Ok(()),
                Err(e) if start.elapsed() > HEALTHY => {
                    bail!(
                        "etcd did not answer within {HEALTHY:?}: {e}\n{}",
                        self.reports()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Kills member `i` (0-based).
    pub fn kill(&mut self, i: usize) {
        if let Some(p) = self.members[i].proc.take() {
            p.kill();
        }
    }

    /// Starts member `i` again with its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
    }

    /// Every member's log tail.
    pub fn reports(&self) -> String {
        self.members
            .iter()
            .filter_map(|m| m.proc.as_ref().map(Proc::report))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The value etcd holds for `key`, as text.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<String>> {
        let kv = self.client().get(key).await.context("reading etcd")?;
        Ok(kv.map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }
}
