//! `rampart serve --dev --cluster N`: a local cluster of N node processes on 127.0.0.1 with a
//! generated PKI. Writes one config per node under `<dev dir>/cluster/`, starts the nodes
//! (each logging to its own file), waits for a leader, prints how to use the cluster, and stops
//! every node on Ctrl-C or SIGTERM. A node that exits, or no leader, is a failure: the others are
//! stopped, the first error line of the failing node's log is printed, and the command exits
//! non-zero. Data stays in the dev folder and is reused next time.

use std::path::{Path, PathBuf};
use std::time::Duration;

use std::process::ExitStatus;

use tokio::process::{Child, Command};

use crate::pki::DevPki;

/// Ports of node `n` (1-based): MQTT 1883+, mTLS 8883+, cluster 7070/7080/…, admin 9443+,
/// metrics 9090+.
struct Ports {
    mqtt: u16,
    mtls: u16,
    cluster: u16,
    quic: u16,
    admin: u16,
    http: u16,
}

fn ports(n: u16) -> Ports {
    Ports { mqtt: 1882 + n, mtls: 8882 + n, cluster: 7060 + 10 * n, quic: 7061 + 10 * n, admin: 9442 + n, http: 9089 + n }
}

fn node_config(pki: &DevPki, n: u16, nodes: u16) -> String {
    let p = ports(n);
    let (node_cert, node_key) = &pki.nodes[usize::from(n) - 1];
    let members: String = (1..=nodes)
        .map(|m| {
            let q = ports(m);
            format!("[[cluster.members]]\nid = {m}\nraft_addr = \"127.0.0.1:{}\"\nquic_addr = \"127.0.0.1:{}\"\n", q.cluster, q.quic)
        })
        .collect();
    format!(
        r#"# Node {n} of the development cluster (written by `rampart serve --dev --cluster {nodes}`).
[node]
data_dir = "node-{n}"
[auth]
state_file = {auth:?}
[http]
bind = "127.0.0.1:{http}"
[listeners.tcp]
bind = "127.0.0.1:{mqtt}"
[listeners.tls]
bind = "127.0.0.1:{mtls}"
cert_file = {server_cert:?}
key_file = {server_key:?}
client_certificate = "required"
ca_file = {ca:?}
[cluster]
node_id = {n}
bind = "127.0.0.1:{cluster}"
quic_bind = "127.0.0.1:{quic}"
cert_file = {node_cert:?}
key_file = {node_key:?}
ca_file = {ca:?}
{members}
[admin]
bind = "127.0.0.1:{admin}"
cert_file = {server_cert:?}
key_file = {server_key:?}
ca_file = {ca:?}
"#,
        auth = pki.auth_state.display().to_string(),
        http = p.http,
        mqtt = p.mqtt,
        mtls = p.mtls,
        cluster = p.cluster,
        quic = p.quic,
        admin = p.admin,
        server_cert = pki.server_cert.display().to_string(),
        server_key = pki.server_key.display().to_string(),
        ca = pki.ca_cert.display().to_string(),
        node_cert = node_cert.display().to_string(),
        node_key = node_key.display().to_string(),
    )
}

/// One node process of the development cluster.
struct DevNode {
    n: u16,
    child: Child,
    log: PathBuf,
    /// Length of the log (appended to across runs) when this run started it.
    log_start: u64,
}

/// Runs the development cluster until Ctrl-C or SIGTERM; an error when a node exits or no
/// leader is elected.
pub async fn run(dir: &Path, nodes: u16) -> anyhow::Result<()> {
    anyhow::ensure!((1..=9).contains(&nodes), "--cluster takes 1 to 9 nodes");
    let dir = std::path::absolute(dir)?;
    let pki = crate::pki::ensure_dev_pki(&dir, nodes.into())?;
    let cluster_dir = dir.join("cluster");
    std::fs::create_dir_all(&cluster_dir)?;
    let exe = std::env::current_exe()?;
    let mut children: Vec<DevNode> = Vec::new();
    for n in 1..=nodes {
        let config = cluster_dir.join(format!("node-{n}.toml"));
        std::fs::write(&config, node_config(&pki, n, nodes))?;
        let log = cluster_dir.join(format!("node-{n}.log"));
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let log_start = out.metadata()?.len();
        let child =
            Command::new(&exe).arg("serve").arg("--config").arg(&config).stdout(out.try_clone()?).stderr(out).kill_on_drop(true).spawn()?;
        children.push(DevNode { n, child, log, log_start });
    }
    println!("Starting {nodes} nodes (logs in {})…", cluster_dir.display());
    let started = tokio::select! {
        leader = wait_for_leader(&pki) => leader.map_err(|e| anyhow::anyhow!("no leader: {e:#}; see the node logs in {}", cluster_dir.display())),
        (index, status) = first_exit(&mut children) => Err(node_failed(&children[index], status)),
    };
    let result = match started {
        Ok(leader) => {
            let logs: Vec<(u16, &Path)> = children.iter().map(|node| (node.n, node.log.as_path())).collect();
            print!("{}", help(&pki, &logs, leader, &exe));
            use tokio::signal::unix::{signal, SignalKind};
            let mut terminate = signal(SignalKind::terminate())?;
            tokio::select! {
                _ = tokio::signal::ctrl_c() => Ok(()),
                _ = terminate.recv() => Ok(()),
                (index, status) = first_exit(&mut children) => Err(node_failed(&children[index], status)),
            }
        }
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        eprintln!("rampart: {e:#}");
    }
    println!("\nStopping the cluster…");
    for node in &mut children {
        if let Some(pid) = node.child.id() {
            // SAFETY: kill(2) on the PID of a child this process started and has not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(10), node.child.wait()).await.is_err() {
            eprintln!("node {} did not stop within 10 s; killing it", node.n);
            let _ = node.child.kill().await;
        }
    }
    result.map_err(|_| anyhow::anyhow!("the development cluster stopped because of the error above"))
}

/// Waits until one of the nodes exits: its index and exit status.
async fn first_exit(children: &mut [DevNode]) -> (usize, std::io::Result<ExitStatus>) {
    let (status, index, _) = futures_util::future::select_all(children.iter_mut().map(|node| Box::pin(node.child.wait()))).await;
    (index, status)
}

/// The error for a node that exited: its status and the first error line it logged this run.
fn node_failed(node: &DevNode, status: std::io::Result<ExitStatus>) -> anyhow::Error {
    let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
    match first_error_line(&node.log, node.log_start) {
        Some(line) => anyhow::anyhow!("node {} exited ({status}): {line}\n(full log: {})", node.n, node.log.display()),
        None => anyhow::anyhow!("node {} exited ({status}); see its log {}", node.n, node.log.display()),
    }
}

/// The first line logged at ERROR, or printed by `rampart` before logging started, after
/// `start` bytes of a node log.
fn first_error_line(log: &Path, start: u64) -> Option<String> {
    let text = std::fs::read(log).ok()?;
    let text = String::from_utf8_lossy(text.get(start as usize..)?);
    let is_error = |line: &&str| line.starts_with("rampart:") || line.contains(" ERROR ") || line.contains("\"level\":\"ERROR\"");
    text.lines().find(is_error).map(|line| line.trim().to_string())
}

async fn wait_for_leader(pki: &DevPki) -> anyhow::Result<u64> {
    let endpoint = format!("https://localhost:{}", ports(1).admin);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = async {
            let mut client = crate::admin::cli::connect(&endpoint, Some(&pki.ca_cert), Some((&pki.admin.0, &pki.admin.1))).await?;
            anyhow::Ok(client.cluster_status(rampart_proto::admin::ClusterStatusRequest {}).await?.into_inner())
        };
        match status.await {
            Ok(status) if status.leader_id != 0 => return Ok(status.leader_id),
            Ok(_) if tokio::time::Instant::now() < deadline => {}
            Err(_) if tokio::time::Instant::now() < deadline => {}
            Ok(_) => anyhow::bail!("no leader elected within 30 s"),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `word` as one shell word: as it is when it is plain, else in single quotes.
fn shell_word(word: &str) -> String {
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "/._-+:@%,=".contains(c)) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "'\\''"))
    }
}

/// How to use the running cluster; `rampart` commands name `exe`, the binary running now, so
/// they can be pasted as they are (it need not be on the PATH).
fn help(pki: &DevPki, logs: &[(u16, &Path)], leader: u64, exe: &Path) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let exe = shell_word(&exe.display().to_string());
    let _ = writeln!(out, "\nRampart development cluster: {} nodes, leader is node {leader}.", logs.len());
    for (n, log) in logs {
        let p = ports(*n);
        let _ = writeln!(
            out,
            "  node {n}: MQTT 127.0.0.1:{}  mTLS localhost:{}  admin https://localhost:{}  QUIC udp/{}  metrics http://127.0.0.1:{}/metrics  log {}",
            p.mqtt,
            p.mtls,
            p.admin,
            p.quic,
            p.http,
            log.display()
        );
    }
    let (admin_cert, admin_key) = &pki.admin;
    let _ = writeln!(out, "\nAdmin CLI (any node's admin port works; writes are forwarded to the leader):");
    let _ = writeln!(
        out,
        "  export RAMPART_ADMIN_ENDPOINT=https://localhost:{} RAMPART_ADMIN_CA={} RAMPART_ADMIN_CERT={} RAMPART_ADMIN_KEY={}",
        ports(1).admin,
        pki.ca_cert.display(),
        admin_cert.display(),
        admin_key.display()
    );
    let _ = writeln!(out, "  {exe} admin cluster status");
    let _ = writeln!(out, "  {exe} admin sessions");
    if let [(id, cert, key), ..] = pki.devices.as_slice() {
        let tls = |n: u16| {
            format!(
                "-h localhost -p {} --cafile {} --cert {} --key {}",
                ports(n).mtls,
                pki.ca_cert.display(),
                cert.display(),
                key.display()
            )
        };
        let _ = writeln!(out, "\nDevice {id}, subscribed on node 2 and publishing on node 1 (one broker across the nodes):");
        let _ = writeln!(out, "  mosquitto_sub {} -i {id} -t 'devices/{id}/#' -v &", tls(2));
        let _ = writeln!(out, "  mosquitto_pub {} -i {id}-pub -t devices/{id}/hello -m 'hello from node 1'", tls(1));
        let _ = writeln!(out, "Revoke it everywhere at once (its connections drop on every node):");
        let _ = writeln!(out, "  {exe} admin revoke --certificate {} --reason keyCompromise --wait", cert.display());
    }
    let _ = writeln!(out, "\nStop with Ctrl-C.\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_printed_admin_commands_name_the_running_binary() {
        crate::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let pki = crate::pki::ensure_dev_pki(dir.path(), 2).unwrap();
        let log = dir.path().join("node-1.log");
        let exe = Path::new("/opt/rampart 0.1/bin/rampart");
        let text = help(&pki, &[(1, &log), (2, &log)], 2, exe);
        assert!(text.contains("2 nodes, leader is node 2."), "{text}");
        let commands: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| ["admin cluster status", "admin sessions", "admin revoke "].iter().any(|c| l.contains(c)))
            .collect();
        assert_eq!(commands.len(), 3, "{text}");
        assert!(commands.iter().all(|c| c.starts_with("'/opt/rampart 0.1/bin/rampart' admin ")), "{text}");
        let plain = help(&pki, &[(1, &log)], 1, Path::new("/work/target/release/rampart"));
        assert!(plain.contains("\n  /work/target/release/rampart admin cluster status\n"), "{plain}");
        assert!(!text.contains("\n  rampart "), "{text}");
    }
}
