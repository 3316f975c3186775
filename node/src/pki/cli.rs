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
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
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
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Issue a cluster node certificate (server and client authentication).
    IssueNode {
        /// Node name (common name, and file name under nodes/).
        #[arg(long)]
        id: String,
        /// DNS name or IP address the other nodes reach it by (repeatable); defaults to the id.
        #[arg(long)]
        san: Vec<String>,
        /// Validity in days.
        #[arg(long, default_value_t = 825)]
        days: u32,
    },
    /// Issue an admin API client certificate.
    IssueAdmin {
        /// Admin name (common name; recorded as the caller in the audit trail).
        #[arg(long)]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Issue a device certificate (CN = the device id). Re-issuing rotates it.
    IssueDevice {
        /// Device id (common name, and file name under devices/).
        id: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
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
        /// Days until the CRL's next update.
        #[arg(long, default_value_t = 7)]
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
        /// Node certificates (each also valid for its own name, e.g. the compose service name).
        #[arg(long, value_delimiter = ',')]
        nodes: Vec<String>,
        /// Admin certificates (comma-separated names).
        #[arg(long, value_delimiter = ',')]
        admins: Vec<String>,
        /// Device certificates (comma-separated ids).
        #[arg(long, value_delimiter = ',')]
        devices: Vec<String>,
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
        PkiCommand::IssueNode { id, san, days } => print_issued("node", &store.issue(Kind::Node, &id, &san, days)?),
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
        PkiCommand::Ensure { server, san, nodes, admins, devices } => {
            if !store.has_ca() {
                print_issued("CA", &store.init_ca("Rampart Fleet CA", 3650, CaKey::EcdsaP256)?);
            }
            let wanted = server
                .iter()
                .map(|s| (Kind::Server, s, san.clone()))
                .chain(nodes.iter().map(|n| (Kind::Node, n, std::iter::once(n.clone()).chain(san.iter().cloned()).collect())))
                .chain(admins.iter().map(|a| (Kind::Admin, a, Vec::new())))
                .chain(devices.iter().map(|d| (Kind::Device, d, Vec::new())));
            for (kind, name, sans) in wanted {
                let (cert, key) = store.paths(kind, name);
                if cert.is_file() && key.is_file() {
                    println!("kept {}", cert.display());
                    continue;
                }
                let days = if matches!(kind, Kind::Server | Kind::Node) { 825 } else { 365 };
                print_issued(&format!("{kind:?}").to_lowercase(), &store.issue(kind, name, &sans, days)?);
            }
        }
    }
    Ok(())
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
