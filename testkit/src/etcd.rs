//! A real etcd cluster on 127.0.0.1 for the cluster tests: Debian's `etcd` (package
//! `etcd-server`), one process per member, each with its own data directory in the test's
//! files, so a member can be killed and started again with its data. In the NAT lab it runs
//! on the loopback of S's namespace, beside the S that use it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use p2ptun_relay::etcd::{Etcd, EtcdAuth, EtcdTls};
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
    /// With TLS on the client URLs: the files S needs to reach them.
    tls: Option<TlsFiles>,
    members: Vec<Member>,
    initial: String,
    dir: PathBuf,
    logs: PathBuf,
}

/// The certificates of an etcd with TLS on its client URLs, made for the test: a CA, the
/// members' certificate (for 127.0.0.1) and a client certificate, each signed by the CA.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA (`--etcd-ca`).
    pub ca: PathBuf,
    /// The client's certificate (`--etcd-cert`).
    pub client_cert: PathBuf,
    /// Its key (`--etcd-key`).
    pub client_key: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl TlsFiles {
    fn make(dir: &std::path::Path) -> anyhow::Result<TlsFiles> {
        use rcgen::{
            BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
        };
        std::fs::create_dir_all(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "p2ptun test etcd CA");
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;
        let write = |name: &str, pem: String| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
            Ok(path)
        };
        let signed = |sans: Vec<String>, cn: Option<&str>| -> anyhow::Result<(String, String)> {
            let mut params = CertificateParams::new(sans)?;
            params.distinguished_name = DistinguishedName::new();
            if let Some(cn) = cn {
                params.distinguished_name.push(DnType::CommonName, cn);
            }
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca, &ca_key)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = signed(vec!["127.0.0.1".into()], Some("etcd"))?;
        // No CommonName: with authentication on, etcd would take it for the user name, which
        // its JSON gateway refuses ("CommonName of client sending a request against gateway
        // will be ignored"); S logs in with its password instead.
        let (client_cert, client_key) = signed(Vec::new(), None)?;
        Ok(TlsFiles {
            ca: write("ca.pem", ca.pem())?,
            client_cert: write("client.pem", client_cert)?,
            client_key: write("client-key.pem", client_key)?,
            server_cert: write("server.pem", server_cert)?,
            server_key: write("server-key.pem", server_key)?,
        })
    }

    fn etcd_tls(&self) -> EtcdTls {
        EtcdTls {
            ca: Some(self.ca.clone()),
            client: Some((self.client_cert.clone(), self.client_key.clone())),
        }
    }
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

    /// [`EtcdCluster::start`] with TLS on the client URLs (`https://`), which take only
    /// clients with a certificate of the test's CA (etcd's `--client-cert-auth`).
    pub async fn start_tls(lab: &Lab, n: usize) -> anyhow::Result<EtcdCluster> {
        let tls = TlsFiles::make(&lab.path().join("etcd-tls"))?;
        EtcdCluster::start_with(lab, Place::here(), n, Some(tls)).await
    }

    /// [`EtcdCluster::start`] in `place` (S's namespace of the NAT lab). Out of this
    /// namespace, [`EtcdCluster::client`] cannot reach it; readiness is read off its logs.
    pub async fn start_in(lab: &Lab, place: Place, n: usize) -> anyhow::Result<EtcdCluster> {
        EtcdCluster::start_with(lab, place, n, None).await
    }

    async fn start_with(
        lab: &Lab,
        place: Place,
        n: usize,
        tls: Option<TlsFiles>,
    ) -> anyhow::Result<EtcdCluster> {
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
            tls,
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
            .arg(format!("--listen-client-urls={}", self.url(m)))
            .arg(format!("--advertise-client-urls={}", self.url(m)))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{}", m.peer))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{}",
                m.peer
            ))
            .arg(format!("--initial-cluster={}", self.initial))
            .arg("--initial-cluster-state=new")
            .arg("--initial-cluster-token=p2ptun-test");
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let proc = Proc::spawn(&format!("etcd-{}", m.name), cmd, &self.logs);
        self.members[i].proc = Some(proc);
    }

    fn url(&self, m: &Member) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", m.client)
    }

    fn url_list(&self) -> Vec<String> {
        self.members.iter().map(|m| self.url(m)).collect()
    }

    /// With TLS on: the files S needs to reach the members.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The client URLs, comma-separated (`--etcd`).
    pub fn urls(&self) -> String {
        self.url_list().join(",")
    }

    /// A client of the whole cluster (logged in as root once authentication is on).
    pub fn client(&self) -> Etcd {
        Etcd::new(&self.url_list(), Duration::from_secs(2))
            .and_then(|etcd| etcd.with_tls(self.tls.as_ref().map(TlsFiles::etcd_tls).as_ref()))
            .expect("the cluster's URLs and certificates")
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
