//! The `rampart pki …` subcommands: argument parsing and human output over [`super::Store`].

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{CaKey, Issued, Kind, Store};

#[derive(Debug, Args)]
pub struct PkiArgs {
    /// The PKI folder.
    #[arg(long, global = true, env = "RAMPART_PKI_DIR", default_value = "rampart-pki")]
    pub dir: PathBuf,
    #[command(subcommand)]
    pub command: PkiCommand,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the certificate authority (ECDSA P-256, or RSA with --rsa). Refuses to overwrite an existing CA.
    InitCa {
        /// Common name of the CA certificate.
        #[arg(long, default_value = "Rampart Fleet CA")]
        name: String,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 3650, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// An RSA key of this many bits (2048, 3072 or 4096) instead of ECDSA P-256.
        #[arg(long, value_name = "BITS")]
        rsa: Option<usize>,
    },
    /// Issue an MQTT server certificate.
    IssueServer {
        /// Common name, and file name under servers/.
        #[arg(long)]
        name: String,
        /// DNS name or IP address (repeatable); defaults to the name.
        #[arg(long)]
        san: Vec<String>,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Issue a cluster node certificate (server and client authentication), bound to its node id.
    IssueNode {
        /// Node name (common name, and file name under nodes/).
        #[arg(long)]
        id: String,
        /// The node's `cluster.node_id`, written into the certificate (URI urn:rampart:node:<id>);
        /// the other nodes accept the certificate only for that id. Default: the number the name
        /// ends in (node-2: 2).
        #[arg(long)]
        node_id: Option<u64>,
        /// DNS name or IP address the other nodes reach it by (repeatable); defaults to the id.
        #[arg(long)]
        san: Vec<String>,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 825, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Issue an admin API client certificate.
    IssueAdmin {
        /// Admin name (common name; recorded as the caller in the audit trail).
        #[arg(long)]
        name: String,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Issue a device certificate (CN = the device id). Re-issuing rotates it.
    IssueDevice {
        /// Device id (common name, and file name under devices/).
        id: String,
        /// Validity in days (at least 1).
        #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Record the revocation of a certificate issued by this CA (then run `crl`).
    Revoke {
        /// The certificate file (PEM) to revoke.
        cert: PathBuf,
        /// RFC 5280 reason: unspecified, keyCompromise, cACompromise, affiliationChanged,
        /// superseded, cessationOfOperation, certificateHold, removeFromCRL, privilegeWithdrawn or
        /// aACompromise.
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Write crl.pem, signed by the CA, with every recorded revocation.
    Crl {
        /// Days until the CRL's next update (at least 1).
        #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
    },
    /// Create whatever of this set is missing; never replaces what exists (for scripts and compose).
    Ensure {
        /// Server certificate name (with --san).
        #[arg(long)]
        server: Option<String>,
        /// DNS names or IP addresses of the server certificate, also added to every node certificate.
        #[arg(long)]
        san: Vec<String>,
        /// Node certificates, comma-separated `NAME` or `NAME=NODE_ID` (the node id defaults to the
        /// number the name ends in); each is also valid for its own name (e.g. the compose service).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Admin certificates (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        admins: Vec<String>,
        /// Device certificates (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
        /// Also write each node's own files to DIR/<node name>/: ca.pem (the CA certificate, not
        /// its key), node.pem and node.key, and server.pem and server.key (--server's), so a node
        /// can be given its folder alone (as deploy/docker-compose.yml does).
        #[arg(long, value_name = "DIR")]
        bundles: Option<PathBuf>,
    },
}

pub fn run(args: PkiArgs) -> anyhow::Result<()> {
    let store = Store::new(&args.dir);
    match args.command {
        PkiCommand::InitCa { name, days, rsa } => {
            let key = rsa.map_or(CaKey::EcdsaP256, CaKey::Rsa);
            if rsa.is_some() {
                eprintln!("generating the RSA key (this can take a while)…");
            }
            print_issued("CA", &store.init_ca(&name, days, key)?)
        }
        PkiCommand::IssueServer { name, san, days } => print_issued("server", &store.issue(Kind::Server, &name, &san, days)?),
        PkiCommand::IssueNode { id, node_id, san, days } => {
            let node_id = match node_id {
                Some(node_id) => node_id,
                None => trailing_number(&id)?,
            };
            print_issued("node", &store.issue_node(&id, node_id, &san, days)?)
        }
        PkiCommand::IssueAdmin { name, days } => print_issued("admin", &store.issue(Kind::Admin, &name, &[], days)?),
        PkiCommand::IssueDevice { id, days } => print_issued("device", &store.issue(Kind::Device, &id, &[], days)?),
        PkiCommand::Revoke { cert, reason } => {
            let r = store.revoke(&cert, &reason)?;
            let at = r.revoked_at.format(&time::format_description::well_known::Rfc3339)?;
            println!("revoked serial {} ({}), reason {}, at {at}", r.serial, r.subject, r.reason);
            println!("run `rampart pki crl --dir {}` to publish it in crl.pem", store.dir().display());
        }
        PkiCommand::Crl { days } => {
            let path = store.write_crl(days)?;
            println!("wrote {} with {} revoked certificate(s), valid {days} days", path.display(), store.revocations()?.revoked.len());
        }
        PkiCommand::Ensure { server, san, nodes, admins, devices, bundles } => {
            if !store.has_ca() {
                print_issued("CA", &store.init_ca("Rampart Fleet CA", 3650, CaKey::EcdsaP256)?);
            }
            for entry in &nodes {
                let (name, node_id) = match entry.split_once('=') {
                    Some((name, id)) => (name, id.parse().map_err(|_| anyhow::anyhow!("--nodes {entry}: {id:?} is not a node id"))?),
                    None => (entry.as_str(), trailing_number(entry)?),
                };
                if store.node_id_in(name) == Some(node_id) && store.paths(Kind::Node, name).1.is_file() {
                    println!("kept {}", store.paths(Kind::Node, name).0.display());
                    continue;
                }
                let sans: Vec<String> = std::iter::once(name.to_string()).chain(san.iter().cloned()).collect();
                print_issued("node", &store.issue_node(name, node_id, &sans, 825)?);
            }
            let wanted = server
                .iter()
                .map(|s| (Kind::Server, s, san.clone()))
                .chain(admins.iter().map(|a| (Kind::Admin, a, Vec::new())))
                .chain(devices.iter().map(|d| (Kind::Device, d, Vec::new())));
            for (kind, name, sans) in wanted {
                let (cert, key) = store.paths(kind, name);
                if cert.is_file() && key.is_file() {
                    println!("kept {}", cert.display());
                    continue;
                }
                let days = if kind == Kind::Server { 825 } else { 365 };
                print_issued(&format!("{kind:?}").to_lowercase(), &store.issue(kind, name, &sans, days)?);
            }
            if let Some(bundles) = bundles {
                for entry in &nodes {
                    let name = entry.split_once('=').map_or(entry.as_str(), |(name, _)| name);
                    let folder = store.write_node_bundle(&bundles, name, server.as_deref())?;
                    println!("wrote {}", folder.display());
                }
            }
        }
    }
    Ok(())
}

/// The node id a node name stands for when none is given: the number it ends in.
fn trailing_number(name: &str) -> anyhow::Result<u64> {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    name[name.len() - digits..]
        .parse()
        .ok()
        .filter(|&id: &u64| id > 0)
        .ok_or_else(|| anyhow::anyhow!("node {name:?}: give its node id (--node-id N, or NAME=N); the name does not end in one"))
}

fn print_issued(what: &str, issued: &Issued) {
    println!("issued {what} certificate {}", issued.cert.display());
    println!("  private key  {} (mode 0600)", issued.key.display());
    println!("  serial       {}", issued.serial);
    println!("  SHA-256      {}", issued.sha256_fingerprint);
    println!("  expires      {}", issued.not_after.date());
    if let Some(old) = &issued.replaced {
        eprintln!(
            "warning: this replaces an earlier certificate, kept as {old}; it stays valid until it expires or is revoked \
             (rampart pki revoke {old})",
            old = old.display()
        );
    }
}
