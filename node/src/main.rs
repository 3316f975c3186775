//! The `rampart` command: `serve` runs a broker node (or a local development cluster); `pki`
//! manages the fleet's certificates; `admin` calls a cluster's admin API; `cluster` restores a
//! backup into a stopped node's data directory.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use rampart_node::config::{Config, ConfigErrors, ListenerKind};
use rampart_node::server::Server;

#[derive(Parser)]
#[command(name = "rampart", version, about = "Rampart: a clustered MQTT broker for device fleets")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a broker node.
    Serve {
        /// TOML configuration file (see docs/configuration.md).
        #[arg(long, short, env = "RAMPART_CONFIG", conflicts_with = "dev")]
        config: Option<PathBuf>,
        /// Development mode: one node on 127.0.0.1 with anonymous MQTT on 1883 and mutual TLS on
        /// 8883, using a generated CA, server, device and admin certificates kept in --dev-dir.
        #[arg(long)]
        dev: bool,
        /// Where development mode keeps its certificates (and the cluster's data).
        #[arg(long, default_value = "rampart-dev", requires = "dev")]
        dev_dir: PathBuf,
        /// With --dev: run a local cluster of this many node processes (e.g. 3) instead of one node.
        #[arg(long, requires = "dev", value_name = "NODES")]
        cluster: Option<u16>,
        /// Only check the configuration: print every problem (file, key, reason), one a line, and
        /// exit 2, or print one line saying it is OK and exit 0. Starts nothing.
        #[arg(long, conflicts_with = "dev")]
        check_config: bool,
    },
    /// Call the admin API of a cluster (see `rampart admin --help`).
    Admin(Box<rampart_node::admin::cli::AdminArgs>),
    /// Offline work on a stopped node's data: restore a backup, check a backup file.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Manage a certificate authority for the fleet: CA, server, node, admin and device certificates, CRLs.
    Pki(rampart_node::pki::cli::PkiArgs),
    /// Print the argon2id hash (or, with --scram, the SCRAM verifier) of a password read from
    /// standard input, for a password credential.
    Passwd {
        /// Print a SCRAM verifier for the scram provider instead: sha-256 or sha-512.
        #[arg(long, value_parser = ["sha-256", "sha-512"])]
        scram: Option<String>,
        /// PBKDF2 iterations of the SCRAM verifier (at least 4096).
        #[arg(long, default_value_t = 4096, requires = "scram")]
        iterations: u32,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Seed the first node of a new cluster from a backup (`rampart admin snapshot save`). Run it
    /// with the node stopped, on its data directory without a Raft store; then start the node and
    /// add the others with `rampart admin cluster add-node`.
    Restore {
        /// The backup file.
        file: PathBuf,
        /// The node's `node.data_dir`.
        #[arg(long)]
        data_dir: PathBuf,
        /// The node's `cluster.node_id`.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        node_id: u64,
        /// host:port of its cluster port, as the other nodes reach it.
        #[arg(long)]
        raft_addr: String,
        /// host:port of its QUIC forwarding port, as the other nodes reach it.
        #[arg(long)]
        quic_addr: String,
    },
    /// Check a backup file (format, checksum, state) and print what it holds.
    Verify {
        /// The backup file.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Passwd { scram, iterations } => match read_password().and_then(|p| passwd(&p, scram.as_deref(), iterations)) {
            Ok(hash) => {
                println!("{hash}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("rampart passwd: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Pki(args) => match rampart_node::pki::cli::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rampart pki: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Cluster(command) => match cluster(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rampart cluster: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Admin(args) => {
            rampart_node::tls::install_crypto_provider();
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(rampart_node::admin::cli::run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                // The answer, printed, says so.
                Err(e) if e.is::<rampart_node::admin::cli::Denied>() => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("rampart admin: {}", rampart_node::admin::cli::describe_error(&e));
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve { dev: true, dev_dir, cluster: Some(nodes), .. } => {
            rampart_node::tls::install_crypto_provider();
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(rampart_node::dev_cluster::run(&dev_dir, nodes)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rampart: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Serve { config: path, dev, dev_dir, check_config, .. } => {
            let config = match load(path.as_deref(), dev, &dev_dir) {
                Ok(config) => config,
                Err(e) => {
                    match e.downcast_ref::<ConfigErrors>() {
                        Some(problems) => problems.0.iter().for_each(|p| eprintln!("rampart: {p}")),
                        None => eprintln!("rampart: {e:#}"),
                    }
                    return ExitCode::from(2);
                }
            };
            if check_config {
                let file = path.map_or_else(|| "the configuration".to_string(), |p| p.display().to_string());
                println!("{file}: OK ({})", summary(&config));
                return ExitCode::SUCCESS;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
            match runtime.block_on(serve(config, dev.then_some(dev_dir))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("rampart: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn cluster(command: ClusterCommand) -> anyhow::Result<()> {
    use rampart_node::cluster::backup::Backup;
    match command {
        ClusterCommand::Verify { file } => {
            let backup = Backup::read(&file)?;
            println!("{}: a usable backup (format {}): {}", file.display(), backup.header.format, backup.summary());
        }
        ClusterCommand::Restore { file, data_dir, node_id, raft_addr, quic_addr } => {
            let backup = Backup::read(&file)?;
            let node = rampart_node::cluster::NodeInfo { raft_addr, quic_addr };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            runtime.block_on(backup.restore(&data_dir, node_id, node))?;
            println!("restored {} into {}: {}", file.display(), data_dir.display(), backup.summary());
            println!(
                "Start node {node_id} on it: it forms a new cluster with itself as the only member. Then add each other node \
                 (with an empty data directory) with `rampart admin cluster add-node`."
            );
        }
    }
    Ok(())
}

/// The argon2id hash of a password, or its SCRAM verifier for `sha-256` / `sha-512`.
fn passwd(password: &str, scram: Option<&str>, iterations: u32) -> anyhow::Result<String> {
    use rampart_node::auth::scram::{Mechanism, Verifier};
    let verifier = |m| Verifier::generate(m, password, iterations).map(|v| v.to_string());
    match scram {
        None => rampart_node::auth::password::hash(password),
        Some("sha-512") => verifier(Mechanism::Sha512),
        Some(_) => verifier(Mechanism::Sha256),
    }
    .map_err(anyhow::Error::msg)
}

/// One line from standard input, without its line ending; an empty password is refused.
fn read_password() -> anyhow::Result<String> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        eprint!("Password (echoed): ");
    }
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(!password.is_empty(), "empty password");
    Ok(password)
}

/// What a checked configuration runs: its listeners and, if clustered, the node id.
fn summary(config: &Config) -> String {
    let listeners: Vec<String> = config.listener_specs().iter().map(|l| format!("{} on {}", l.kind.name(), l.bind)).collect();
    let cluster = config.cluster.as_ref().map_or("standalone".to_string(), |c| format!("cluster node {}", c.node_id));
    format!("{}; {cluster}", listeners.join(", "))
}

fn load(path: Option<&std::path::Path>, dev: bool, dev_dir: &std::path::Path) -> anyhow::Result<Config> {
    rampart_node::tls::install_crypto_provider();
    if dev {
        let pki = rampart_node::pki::ensure_dev_pki(dev_dir, 0)?;
        return Ok(Config::parse(&dev_config(&pki), "(built-in --dev configuration)", std::path::Path::new("."))?);
    }
    match path {
        Some(path) => Ok(Config::load(path)?),
        None => anyhow::bail!("no configuration: pass --config FILE, or --dev for a local development node"),
    }
}

fn dev_config(pki: &rampart_node::pki::DevPki) -> String {
    format!(
        r#"
[auth]
state_file = {:?}
[http]
bind = "127.0.0.1:9090"
[listeners.tcp]
bind = "127.0.0.1:1883"
[listeners.tls]
bind = "127.0.0.1:8883"
cert_file = {:?}
key_file = {:?}
client_certificate = "required"
ca_file = {:?}
"#,
        pki.auth_state.display().to_string(),
        pki.server_cert.display().to_string(),
        pki.server_key.display().to_string(),
        pki.ca_cert.display().to_string(),
    )
}

async fn serve(config: Config, dev_dir: Option<PathBuf>) -> anyhow::Result<()> {
    rampart_node::telemetry::init_logging(&config.log)?;
    // Installed before the listeners open, so a SIGTERM right after they do stops gracefully.
    let signals = StopSignals::install()?;
    let server = Server::start(&config).await?;
    for (kind, addr) in &server.listeners {
        tracing::info!(listener = kind.name(), %addr, "listening");
    }
    if let Some(addr) = server.http {
        tracing::info!(%addr, "metrics and health on http://{addr}/metrics, /healthz, /readyz");
    }
    if let Some(dir) = dev_dir {
        print_dev_help(&server, &rampart_node::pki::ensure_dev_pki(&dir, 0)?);
    }
    wait_for_stop(&server, signals).await?;
    tracing::info!("shutting down");
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

fn print_dev_help(server: &Server, pki: &rampart_node::pki::DevPki) {
    let port = |kind| server.listeners.iter().find(|(k, _)| *k == kind).map(|(_, a)| a.port());
    println!("\nRampart development node is running.");
    if let Some(p) = port(ListenerKind::Tcp) {
        println!("Anonymous MQTT on 127.0.0.1:{p}, for quick experiments:");
        println!("  mosquitto_sub -h 127.0.0.1 -p {p} -t 'demo/#' -v");
        println!("  mosquitto_pub -h 127.0.0.1 -p {p} -t demo/hello -m 'hello rampart'");
    }
    if let (Some(p), [(id, cert, key), (other, other_cert, other_key), ..]) = (port(ListenerKind::Tls), pki.devices.as_slice()) {
        let tls = |cert: &std::path::Path, key: &std::path::Path| {
            format!("-h localhost -p {p} --cafile {} --cert {} --key {}", pki.ca_cert.display(), cert.display(), key.display())
        };
        println!("Mutual TLS on localhost:{p}: each device certificate may use devices/<its id>/# only.");
        println!("  mosquitto_sub {} -i {id} -t 'devices/{id}/#' -v", tls(cert, key));
        println!("  mosquitto_pub {} -i {id}-pub -t devices/{id}/hello -m 'hello from {id}'", tls(cert, key));
        println!("  # refused (SUBACK 0x80): {other} may not read {id}'s topics");
        println!("  mosquitto_sub {} -i {other} -t 'devices/{id}/#' -v", tls(other_cert, other_key));
        println!("Rules: {} (edit, then kill -HUP {})", pki.auth_state.display(), std::process::id());
    }
    println!("Stop with Ctrl-C.\n");
}

/// SIGTERM and SIGHUP, caught from the start (their default action would end the process).
struct StopSignals {
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals { terminate: signal(SignalKind::terminate())?, hangup: signal(SignalKind::hangup())? })
    }
}

/// Runs until Ctrl-C or SIGTERM; SIGHUP re-reads the TLS files and the authorization state.
async fn wait_for_stop(server: &Server, signals: StopSignals) -> anyhow::Result<()> {
    let StopSignals { mut terminate, mut hangup } = signals;
    loop {
        tokio::select! {
            result = tokio::signal::ctrl_c() => return Ok(result?),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => match server.reload() {
                Ok(()) => tracing::info!("TLS files and authorization state reloaded"),
                Err(e) => tracing::error!(error = %format!("{e:#}"), "not reloaded; the previous TLS files and authorization state stay in force"),
            },
        }
    }
}
