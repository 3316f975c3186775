//! `rampart admin …`: every admin API call from the command line, with tables (or
//! `--output json`), endpoint and admin certificate from flags or the environment, a progress
//! line for bulk imports, and a non-zero exit with the gRPC error (or a denied `check-access`).
//! State documents (`defaults`, `providers`, `client-types`) print as the state-file table their
//! `set` reads back.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand, ValueEnum};
use rampart_proto::admin::admin_client::AdminClient;
use rampart_proto::admin::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::convert;
use crate::auth::state::{self, AuthState};
use crate::cluster::backup::Backup;

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// Admin API of any node.
    #[arg(long, global = true, env = "RAMPART_ADMIN_ENDPOINT", default_value = "https://localhost:9443", help_heading = CONNECTION)]
    pub endpoint: String,
    /// CA bundle the admin API's server certificate chains to.
    #[arg(long, global = true, env = "RAMPART_ADMIN_CA", help_heading = CONNECTION)]
    pub ca_file: Option<PathBuf>,
    /// Admin certificate (from `rampart pki issue-admin`), with --key-file.
    #[arg(long, global = true, env = "RAMPART_ADMIN_CERT", help_heading = CONNECTION)]
    pub cert_file: Option<PathBuf>,
    /// Private key of the admin certificate.
    #[arg(long, global = true, env = "RAMPART_ADMIN_KEY", help_heading = CONNECTION)]
    pub key_file: Option<PathBuf>,
    /// Tables and sentences for people, or the API's reply as JSON for scripts.
    #[arg(long, global = true, value_enum, default_value = "table", help_heading = CONNECTION)]
    pub output: Output,
    /// For writes: return once every reachable node has applied the change (nodes that do not
    /// answer are listed, not waited for).
    #[arg(long, global = true, help_heading = CONNECTION)]
    pub wait: bool,
    #[command(subcommand)]
    pub command: AdminCommand,
}

/// Help heading of the options every admin command takes.
const CONNECTION: &str = "Connection and output (every command)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum AdminCommand {
    /// Credentials: certificate identities or user names with their permissions.
    #[command(subcommand)]
    Credential(CredentialCommand),
    /// Roles: named rule sets.
    #[command(subcommand)]
    Role(RoleCommand),
    /// Rules for certificates without a credential and for anonymous clients (`[defaults]`).
    #[command(subcommand)]
    Defaults(StateFileCommand),
    /// The authentication provider chain: order, enabled providers, JWT settings (`[providers]`).
    #[command(subcommand)]
    Providers(StateFileCommand),
    /// Offline queue limits per client type.
    #[command(subcommand)]
    ClientTypes(ClientTypesCommand),
    /// Revoke certificates on every node: by serial, identity regex, issuer or issue time.
    Revoke(RevokeArgs),
    /// Import a CRL (PEM or DER) signed by a CA the nodes trust for clients.
    ImportCrl {
        /// The CRL file.
        file: PathBuf,
    },
    /// List revocations.
    Revocations {
        /// Only revocations of this issuer DN.
        #[arg(long)]
        issuer: Option<String>,
    },
    /// Undo revocations by id.
    Unrevoke {
        /// Revocation ids (from `revocations`).
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Clients connected anywhere in the cluster.
    Sessions {
        /// Only clients of this node (0: every node).
        #[arg(long, default_value_t = 0)]
        node: u64,
        /// Only clients whose client id or identity contains this.
        #[arg(long, default_value = "")]
        contains: String,
        /// At most this many rows (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        /// Only clients whose certificate expires within this time: a number with a unit, `d`
        /// (days), `h`, `m` or `s`, e.g. `30d`.
        #[arg(long, value_parser = parse_duration)]
        expiring_within: Option<u64>,
    },
    /// Disconnect a client wherever it is connected.
    Kick {
        /// The client id to disconnect.
        client_id: String,
        /// Why, for the log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Dry run: would this client be allowed to connect, publish or subscribe? Exit status 0
    /// when allowed, 1 when denied (or on an error).
    CheckAccess(CheckAccessArgs),
    /// Cluster membership and progress.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The audit trail of admin changes.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Backups of the replicated state (restore one with `rampart cluster restore`).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
}

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Save the state the answering node has applied (credentials, roles, defaults, client
    /// types, revocations and CRL entries, providers, audit) to FILE, with a checksummed header.
    Save {
        /// The file to write (created with mode 0600: it holds password hashes).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CredentialCommand {
    /// Create or replace a credential.
    Put(Box<CredentialArgs>),
    /// Show one credential.
    Get {
        /// Credential name.
        name: String,
    },
    /// List credentials, filtered.
    List {
        /// Name, identity or user name contains this.
        #[arg(long, default_value = "")]
        contains: String,
        /// Only credentials of this client type.
        #[arg(long, value_enum)]
        client_type: Option<ClientTypeArg>,
        /// Only enabled (true) or disabled (false) credentials.
        #[arg(long)]
        enabled: Option<bool>,
        /// Only credentials with this role.
        #[arg(long)]
        role: Option<String>,
        /// Credentials per page (at most 1000).
        #[arg(long, default_value_t = 100)]
        page_size: u32,
        /// Start after this credential name (the previous page's `next_page_after`).
        #[arg(long, default_value = "")]
        page_after: String,
    },
    /// Delete a credential; its live connections are closed.
    Delete {
        /// Credential name.
        name: String,
    },
    /// Enable a credential.
    Enable {
        /// Credential name.
        name: String,
    },
    /// Disable a credential; its live connections are closed.
    Disable {
        /// Credential name.
        name: String,
    },
    /// Create or replace every credential of a state file (`[[credentials]]` tables, as in
    /// `auth.state_file`), streamed in batches.
    Import {
        /// The state file (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ClientTypeArg {
    Device,
    Application,
}

/// Rules are `ACCESS:TOPIC` with ACCESS `read`, `write` or `readwrite`; `%u` and `%c` are the
/// identity and client id.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Allow an MQTT topic filter, e.g. `readwrite:devices/%u/#`.
    #[arg(long = "allow")]
    allow: Vec<String>,
    /// Allow topics matching a regex, e.g. `read:sensors/.*`.
    #[arg(long = "allow-regex")]
    allow_regex: Vec<String>,
    /// Deny an MQTT topic filter (deny rules win).
    #[arg(long = "deny")]
    deny: Vec<String>,
    /// Deny topics matching a regex.
    #[arg(long = "deny-regex")]
    deny_regex: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CredentialArgs {
    /// Credential name (unique).
    #[arg(long)]
    name: String,
    /// Exact certificate identity.
    #[arg(long, group = "kind")]
    identity: Option<String>,
    /// Regex over the certificate identity.
    #[arg(long, group = "kind")]
    identity_regex: Option<String>,
    /// With --identity-regex: the highest priority wins when several regexes match.
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// Only certificates from this issuer DN.
    #[arg(long)]
    issuer: Option<String>,
    /// User name of a password credential (with --hash and/or a SCRAM verifier).
    #[arg(long, group = "kind")]
    username: Option<String>,
    /// argon2id hash of the password (`rampart passwd`): a password credential, matched by
    /// --username, --client-id or both.
    #[arg(long)]
    hash: Option<String>,
    /// With --hash: the only client id it may connect with (alone: the credential of that client id).
    #[arg(long)]
    client_id: Option<String>,
    /// SCRAM-SHA-256 verifier (`rampart passwd --scram sha-256`), for the scram provider; needs --username.
    #[arg(long, requires = "username")]
    scram_sha256: Option<String>,
    /// SCRAM-SHA-512 verifier (`rampart passwd --scram sha-512`), for the scram provider; needs --username.
    #[arg(long, requires = "username")]
    scram_sha512: Option<String>,
    /// Queue limits and persistence of its sessions.
    #[arg(long, value_enum, default_value = "device")]
    client_type: ClientTypeArg,
    /// A role whose rules it gets (repeatable).
    #[arg(long)]
    role: Vec<String>,
    #[command(flatten)]
    rules: RuleArgs,
    /// Create it disabled.
    #[arg(long)]
    disabled: bool,
    /// Fail if a credential of that name exists.
    #[arg(long)]
    create_only: bool,
}

#[derive(Debug, Subcommand)]
pub enum RoleCommand {
    /// Create or replace a role.
    Put {
        /// Role name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Delete a role no credential uses.
    Delete {
        /// Role name.
        name: String,
    },
    /// List roles with their rules.
    List,
}

#[derive(Debug, Subcommand)]
pub enum StateFileCommand {
    /// Print them as the table of a state file that `set` reads back (`--output json`: as JSON,
    /// which `set` reads too).
    Get,
    /// Replace them with the table of that name of a state file (as `get` prints it), or with
    /// the JSON `get --output json` prints.
    Set {
        /// The state file (TOML) or JSON document.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientTypesCommand {
    /// Print them as the `[client_types]` table of a state file that `set FILE` reads back
    /// (`--output json`: as JSON, which `set FILE` reads too).
    Get,
    /// Set them from FILE, or from the options (an option left out, or a limit the file does not
    /// give, keeps the node's configured limit).
    Set {
        /// A state file (TOML) with a `[client_types]` table, or the JSON `get --output json` prints.
        #[arg(conflicts_with_all = ["device_max_queued", "application_max_queued"])]
        file: Option<PathBuf>,
        /// Offline queue limit of DEVICE sessions, in messages.
        #[arg(long)]
        device_max_queued: Option<u64>,
        /// Offline queue limit of APPLICATION sessions, in messages.
        #[arg(long)]
        application_max_queued: Option<u64>,
    },
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// A certificate file (PEM): revokes its issuer and serial.
    #[arg(long)]
    certificate: Vec<PathBuf>,
    /// Issuer DN: with --serial, those certificates; alone, every certificate of that issuer.
    #[arg(long)]
    issuer: Option<String>,
    /// Serials (hex) of certificates of --issuer.
    #[arg(long)]
    serial: Vec<String>,
    /// Every certificate whose identity matches this regex (whole identity).
    #[arg(long)]
    identity_regex: Option<String>,
    /// Every certificate issued before this time (RFC 3339 or seconds since the epoch).
    #[arg(long)]
    issued_before: Option<String>,
    /// RFC 5280 reason: unspecified, keyCompromise, cACompromise, affiliationChanged,
    /// superseded, cessationOfOperation, certificateHold, removeFromCRL, privilegeWithdrawn or
    /// aACompromise.
    #[arg(long, default_value = "unspecified", value_parser = parse_reason)]
    reason: String,
}

fn parse_reason(text: &str) -> Result<String, String> {
    crate::pki::reason::normalize(text).map(str::to_string)
}

/// The client is given by exactly one of --identity (with --issuer and --serial, or
/// --password-user), --certificate, --token (with --identity as its user name, optional) or
/// --anonymous.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("client").required(true).multiple(true).args(["identity", "certificate", "token", "anonymous"])))]
pub struct CheckAccessArgs {
    /// Certificate identity of the client (with --password-user or --token: its user name).
    #[arg(long)]
    identity: Option<String>,
    /// Issuer DN of its certificate (for revocations and issuer-bound credentials).
    #[arg(long, requires = "identity")]
    issuer: Option<String>,
    /// Serial (hex) of its certificate (for revocations).
    #[arg(long, requires = "identity")]
    serial: Option<String>,
    /// The identity is the user name of a password credential.
    #[arg(long, requires = "identity")]
    password_user: bool,
    /// Its certificate (PEM): identity (as the node's mutual-TLS listeners read it), issuer and
    /// serial come from it, so its revocations count.
    #[arg(long, conflicts_with_all = ["identity", "issuer", "serial", "password_user", "token"])]
    certificate: Option<PathBuf>,
    /// A JSON Web Token sent as the password (checked by the jwt provider as the broker would).
    #[arg(long)]
    token: Option<String>,
    /// A client without certificate, user name or password: the anonymous rules.
    #[arg(long, conflicts_with_all = ["identity", "certificate", "token"])]
    anonymous: bool,
    /// Client id of the CONNECT (default: the identity; for --anonymous, one the broker assigns).
    #[arg(long)]
    client_id: Option<String>,
    /// What to check.
    #[arg(long, value_enum)]
    action: ActionArg,
    /// Topic name (publish) or filter (subscribe).
    #[arg(long)]
    topic: Option<String>,
}

/// `check-access` answered that the client is denied: the CLI exits with status 1 once the
/// answer is printed.
#[derive(Debug, thiserror::Error)]
#[error("access denied")]
pub struct Denied;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ActionArg {
    Connect,
    Publish,
    Subscribe,
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Members, leader, and how far each node has applied the log.
    Status,
    /// Add a node: it catches up as a learner, then becomes a voter (unless --learner-only).
    AddNode {
        /// Its `cluster.node_id`.
        #[arg(long)]
        id: u64,
        /// host:port of its cluster port (`cluster.bind` as the others reach it).
        #[arg(long)]
        raft_addr: String,
        /// host:port of its QUIC forwarding port.
        #[arg(long, default_value = "")]
        quic_addr: String,
        /// Keep it a learner: it replicates but does not vote.
        #[arg(long)]
        learner_only: bool,
    },
    /// Remove a node from the membership; it stops serving clients when it learns so.
    RemoveNode {
        /// Its `cluster.node_id`.
        id: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print recorded entries.
    List {
        /// Only entries after this log index.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// At most this many entries.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Print entries as they happen (after the backlog from --after).
    Follow {
        /// Start with the recorded entries after this log index.
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
}

/// Credentials per streamed import message.
const IMPORT_MESSAGE: usize = 1000;

/// Runs one admin command; the error is what the CLI prints (gRPC code and message).
pub async fn run(args: AdminArgs) -> anyhow::Result<()> {
    let (cert, key) = match (&args.cert_file, &args.key_file) {
        (Some(cert), Some(key)) => (Some(cert.as_path()), Some(key.as_path())),
        (None, None) => (None, None),
        _ => anyhow::bail!("--cert-file and --key-file go together"),
    };
    let mut client = connect(&args.endpoint, args.ca_file.as_deref(), cert.zip(key)).await?;
    let options = Some(WriteOptions { wait_all_nodes: args.wait, wait_timeout_ms: 0 });
    let out = args.output;
    match args.command {
        AdminCommand::Credential(c) => match c {
            CredentialCommand::Put(c) => {
                let create_only = c.create_only;
                let credential = Some(credential(*c)?);
                print(out, &client.put_credential(PutCredentialRequest { credential, create_only, options }).await?.into_inner())
            }
            CredentialCommand::Get { name } => print(out, &client.get_credential(NameRequest { name, options: None }).await?.into_inner()),
            CredentialCommand::List { contains, client_type, enabled, role, page_size, page_after } => {
                let client_type = client_type.map_or(0, |t| proto_client_type(t) as i32);
                let request = ListCredentialsRequest { page_size, page_after, contains, client_type, enabled, role };
                print(out, &client.list_credentials(request).await?.into_inner())
            }
            CredentialCommand::Delete { name } => print(out, &client.delete_credential(NameRequest { name, options }).await?.into_inner()),
            CredentialCommand::Enable { name } => {
                print(out, &client.set_credential_enabled(SetCredentialEnabledRequest { name, enabled: true, options }).await?.into_inner())
            }
            CredentialCommand::Disable { name } => print(
                out,
                &client.set_credential_enabled(SetCredentialEnabledRequest { name, enabled: false, options }).await?.into_inner(),
            ),
            CredentialCommand::Import { file } => print(out, &import(&mut client, &file).await?),
        },
        AdminCommand::Role(r) => match r {
            RoleCommand::Put { name, rules } => {
                let role = Some(Role { name, rules: rules.to_proto()? });
                print(out, &client.put_role(PutRoleRequest { role, options }).await?.into_inner())
            }
            RoleCommand::Delete { name } => print(out, &client.delete_role(NameRequest { name, options }).await?.into_inner()),
            RoleCommand::List => print(out, &client.list_roles(ListRolesRequest {}).await?.into_inner()),
        },
        AdminCommand::Defaults(StateFileCommand::Get) => {
            let defaults = convert::defaults_from_pb(client.get_defaults(GetDefaultsRequest {}).await?.into_inner());
            print_document(out, "defaults", &defaults.map_err(anyhow::Error::msg)?)
        }
        AdminCommand::Defaults(StateFileCommand::Set { file }) => {
            let defaults = Some(convert::defaults_to_pb(&read_document(&file, "defaults", |s| s.defaults)?));
            print(out, &client.set_defaults(SetDefaultsRequest { defaults, options }).await?.into_inner())
        }
        AdminCommand::Providers(StateFileCommand::Get) => {
            let document = client.get_providers(GetProvidersRequest {}).await?.into_inner();
            print_document(out, "providers", &serde_json::from_str::<state::Providers>(&document.json)?)
        }
        AdminCommand::Providers(StateFileCommand::Set { file }) => {
            let json = serde_json::to_string(&read_document(&file, "providers", |s| s.providers)?)?;
            print(
                out,
                &client.set_providers(SetProvidersRequest { providers: Some(ProvidersDocument { json }), options }).await?.into_inner(),
            )
        }
        AdminCommand::ClientTypes(ClientTypesCommand::Get) => {
            let client_types = convert::client_types_from_pb(client.get_client_types(GetClientTypesRequest {}).await?.into_inner());
            print_document(out, "client_types", &client_types.map_err(anyhow::Error::msg)?)
        }
        AdminCommand::ClientTypes(ClientTypesCommand::Set { file: Some(file), .. }) => {
            let client_types = Some(convert::client_types_to_pb(&read_document(&file, "client_types", |s| s.client_types)?));
            print(out, &client.set_client_types(SetClientTypesRequest { client_types, options }).await?.into_inner())
        }
        AdminCommand::ClientTypes(ClientTypesCommand::Set { file: None, device_max_queued, application_max_queued }) => {
            let settings = |max| Some(ClientTypeSettings { max_queued_messages: max });
            let client_types = Some(ClientTypes { device: settings(device_max_queued), application: settings(application_max_queued) });
            print(out, &client.set_client_types(SetClientTypesRequest { client_types, options }).await?.into_inner())
        }
        AdminCommand::Revoke(r) => {
            let mut replies = Vec::new();
            for request in revoke_requests(r, options)? {
                replies.push(client.revoke_certificates(request).await?.into_inner());
            }
            replies.iter().try_for_each(|reply| print(out, reply))
        }
        AdminCommand::ImportCrl { file } => {
            let crl = std::fs::read(&file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            print(out, &client.import_crl(ImportCrlRequest { crl, options }).await?.into_inner())
        }
        AdminCommand::Revocations { issuer } => {
            let mut page_after_id = 0;
            let mut all = ListRevocationsReply::default();
            loop {
                let page = client
                    .list_revocations(ListRevocationsRequest { page_size: 1000, page_after_id, issuer: issuer.clone() })
                    .await?
                    .into_inner();
                all.revocations.extend(page.revocations);
                all.total = page.total;
                page_after_id = page.next_page_after_id;
                if page_after_id == 0 {
                    break print(out, &all);
                }
            }
        }
        AdminCommand::Unrevoke { ids } => {
            print(out, &client.unrevoke(UnrevokeRequest { revocation_ids: ids, options }).await?.into_inner())
        }
        AdminCommand::Sessions { node, contains, limit, expiring_within } => {
            let request = ListSessionsRequest { node_id: node, contains, limit, expiring_within_secs: expiring_within.unwrap_or(0) };
            print(out, &client.list_sessions(request).await?.into_inner())
        }
        AdminCommand::Kick { client_id, reason } => {
            let reply = client.kick_client(KickClientRequest { client_id: client_id.clone(), reason }).await?.into_inner();
            match out {
                Output::Json => print(out, &reply),
                Output::Table => {
                    print!("{}", kick_text(&client_id, &reply));
                    Ok(())
                }
            }
        }
        AdminCommand::CheckAccess(c) => {
            let action = match c.action {
                ActionArg::Connect => Action::Connect,
                ActionArg::Publish => Action::Publish,
                ActionArg::Subscribe => Action::Subscribe,
            };
            let certificate = match &c.certificate {
                Some(file) => std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
                None => Vec::new(),
            };
            let request = CheckAccessRequest {
                identity: c.identity.unwrap_or_default(),
                issuer: c.issuer.unwrap_or_default(),
                serial: c.serial.unwrap_or_default(),
                password_user: c.password_user,
                client_id: c.client_id.unwrap_or_default(),
                action: action as i32,
                topic: c.topic.unwrap_or_default(),
                token: c.token.unwrap_or_default(),
                anonymous: c.anonymous,
                certificate,
            };
            let reply = client.check_access(request).await?.into_inner();
            print(out, &reply)?;
            if reply.allowed {
                Ok(())
            } else {
                Err(Denied.into())
            }
        }
        AdminCommand::Cluster(ClusterCommand::Status) => {
            let status = client.cluster_status(ClusterStatusRequest {}).await?.into_inner();
            match out {
                Output::Json => print(out, &status),
                Output::Table => {
                    print!("{}", cluster_status_text(&status));
                    Ok(())
                }
            }
        }
        AdminCommand::Cluster(ClusterCommand::AddNode { id, raft_addr, quic_addr, learner_only }) => {
            print(out, &client.add_node(AddNodeRequest { id, raft_addr, quic_addr, learner_only, options }).await?.into_inner())
        }
        AdminCommand::Cluster(ClusterCommand::RemoveNode { id }) => {
            print(out, &client.remove_node(RemoveNodeRequest { id, options }).await?.into_inner())
        }
        AdminCommand::Audit(AuditCommand::List { after, limit }) => {
            print(out, &client.list_audit(ListAuditRequest { after_index: after, limit }).await?.into_inner())
        }
        AdminCommand::Snapshot(SnapshotCommand::Save { file }) => {
            let backup = save_snapshot(&mut client, &file).await?;
            match out {
                Output::Json => println!("{}", serde_json::to_string_pretty(&backup.header)?),
                Output::Table => println!("saved {}: {}", file.display(), backup.summary()),
            }
            Ok(())
        }
        AdminCommand::Audit(AuditCommand::Follow { after }) => {
            let mut stream = client.stream_audit(StreamAuditRequest { after_index: after }).await?.into_inner();
            while let Some(entry) = stream.message().await? {
                let value = readable(serde_json::to_value(&entry)?);
                match out {
                    Output::Json => println!("{}", serde_json::to_string(&value)?),
                    Output::Table => {
                        let fields = ["time", "log_index", "caller", "action", "detail", "error"];
                        let text: Vec<String> =
                            fields.iter().filter(|f| !value[**f].is_null()).map(|f| field_cell(f, &value[*f])).collect();
                        println!("{}", text.join("  "));
                    }
                }
            }
            Ok(())
        }
    }
}

/// A client of the admin API at `endpoint` (https://host:port), trusting `ca` for its server
/// certificate and presenting the admin certificate `identity` (cert, key).
pub async fn connect(endpoint: &str, ca: Option<&Path>, identity: Option<(&Path, &Path)>) -> anyhow::Result<AdminClient<Channel>> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()));
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    let channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| anyhow::anyhow!("--endpoint {endpoint:?}: {e}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the admin API at {endpoint}: {}", error_chain(&e)))?;
    Ok(AdminClient::new(channel).max_decoding_message_size(crate::cluster::network::MAX_MESSAGE_BYTES))
}

/// What the CLI prints for a failed call: the gRPC code and message. A connection the server
/// closed during the TLS handshake almost always means
/// it rejected the client certificate, so that is said, with what to check.
pub fn describe_error(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tonic::Status>() {
        Some(status) if closed_by_server(status) => format!(
            "the admin API closed the connection ({}): it most likely rejected the client certificate. Check that \
             --cert-file (RAMPART_ADMIN_CERT) is an admin certificate (`rampart pki issue-admin`) issued by the CA in the \
             node's [admin] ca_file, that it has not expired, and that --key-file (RAMPART_ADMIN_KEY) is its key",
            error_chain(status)
        ),
        Some(status) => format!("{:?}: {}", status.code(), status.message()),
        None => format!("{e:#}"),
    }
}

/// The call failed because the server ended the connection: tonic reports that as "Unknown:
/// transport error" or, when the close wins the race with the request, "Cancelled".
fn closed_by_server(status: &tonic::Status) -> bool {
    matches!(status.code(), tonic::Code::Unknown if status.message().contains("transport error")) || status.code() == tonic::Code::Cancelled
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(&format!(": {s}"));
        source = s.source();
    }
    text
}

fn read_state(file: &Path) -> anyhow::Result<AuthState> {
    crate::auth::store::read_state(file)
}

/// The `section` table for a `set`: from a state file (TOML, as `get` prints it; its other tables
/// are ignored), or from the JSON object `get --output json` prints (a file starting with `{`).
fn read_document<T: DeserializeOwned>(file: &Path, section: &str, pick: impl FnOnce(AuthState) -> T) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    if text.trim_start().starts_with('{') {
        return serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(&text))
            .map_err(|e| anyhow::anyhow!("{}: {section}.{}: {}", file.display(), e.path(), e.inner()));
    }
    // A file that is not TOML at all is reported by `read_state`, with the line.
    if let Ok(table) = text.parse::<toml::Table>() {
        anyhow::ensure!(table.contains_key(section), "{}: no [{section}] table (the output of `get` has one)", file.display());
    }
    Ok(pick(read_state(file)?))
}

/// Prints a state document: for people, as the `section` table of a state file; as JSON, the
/// document alone. `set` reads back either.
fn print_document(output: Output, section: &str, document: &impl Serialize) -> anyhow::Result<()> {
    print!("{}", document_text(output, section, document)?);
    Ok(())
}

fn document_text(output: Output, section: &str, document: &impl Serialize) -> anyhow::Result<String> {
    Ok(match output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(document)?),
        Output::Table => toml::to_string(&std::collections::BTreeMap::from([(section, document)]))?,
    })
}

fn proto_client_type(t: ClientTypeArg) -> ClientType {
    match t {
        ClientTypeArg::Device => ClientType::Device,
        ClientTypeArg::Application => ClientType::Application,
    }
}

impl RuleArgs {
    fn to_proto(&self) -> anyhow::Result<Vec<Rule>> {
        let kinds =
            [(&self.allow, false, false), (&self.allow_regex, false, true), (&self.deny, true, false), (&self.deny_regex, true, true)];
        let mut rules = Vec::new();
        for (texts, deny, regex) in kinds {
            for text in texts {
                let (access, topic) = text.split_once(':').ok_or_else(|| anyhow::anyhow!("rule {text:?}: expected ACCESS:TOPIC"))?;
                let access = match access.to_ascii_lowercase().as_str() {
                    "read" => Access::Read,
                    "write" => Access::Write,
                    "readwrite" | "read_write" => Access::ReadWrite,
                    other => anyhow::bail!("rule {text:?}: access {other:?} is not read, write or readwrite"),
                };
                let (topic_regex, pattern) = if regex { (Some(topic.to_string()), None) } else { (None, Some(topic.to_string())) };
                rules.push(Rule { access: access as i32, topic_regex, pattern, deny });
            }
        }
        Ok(rules)
    }
}

fn credential(c: CredentialArgs) -> anyhow::Result<Credential> {
    let x509 = (c.identity.is_some() || c.identity_regex.is_some()).then(|| X509Match {
        identity: c.identity.clone(),
        identity_regex: c.identity_regex.clone(),
        priority: c.priority,
        issuer: c.issuer.clone(),
    });
    let secret = c.hash.is_some() || c.scram_sha256.is_some() || c.scram_sha512.is_some();
    anyhow::ensure!(
        x509.is_none() || !secret,
        "--hash and SCRAM verifiers belong to a password credential, not to --identity or --identity-regex"
    );
    let password = secret.then(|| PasswordMatch {
        username: c.username.unwrap_or_default(),
        client_id: c.client_id,
        hash: c.hash.unwrap_or_default(),
        scram_sha256: c.scram_sha256,
        scram_sha512: c.scram_sha512,
    });
    anyhow::ensure!(
        x509.is_some() || password.is_some(),
        "give --identity, --identity-regex, or --hash (or a SCRAM verifier) with --username and/or --client-id"
    );
    Ok(Credential {
        name: c.name,
        enabled: !c.disabled,
        client_type: proto_client_type(c.client_type) as i32,
        roles: c.role,
        rules: c.rules.to_proto()?,
        x509,
        password,
    })
}

/// One request per issuer for --certificate files, else one for the selectors given.
fn revoke_requests(r: RevokeArgs, options: Option<WriteOptions>) -> anyhow::Result<Vec<RevokeCertificatesRequest>> {
    let issued_before = r.issued_before.as_deref().map(parse_time).transpose()?;
    let base = RevokeCertificatesRequest { reason: r.reason.clone(), options, ..Default::default() };
    if r.certificate.is_empty() {
        return Ok(vec![RevokeCertificatesRequest {
            issuer: r.issuer,
            serials: r.serial,
            identity_regex: r.identity_regex,
            issued_before,
            ..base
        }]);
    }
    anyhow::ensure!(r.serial.is_empty() && r.identity_regex.is_none() && issued_before.is_none(), "--certificate goes alone");
    let mut by_issuer: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for file in &r.certificate {
        let pem = std::fs::read(file).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let der = crate::pki::pem_to_der(&pem).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        by_issuer.entry(cert.issuer().to_string()).or_default().push(crate::auth::serial::format_serial(cert.raw_serial()));
    }
    Ok(by_issuer.into_iter().map(|(issuer, serials)| RevokeCertificatesRequest { issuer: Some(issuer), serials, ..base.clone() }).collect())
}

/// Seconds in `30d`, `12h`, `90m` or `3600s`.
fn parse_duration(text: &str) -> Result<u64, String> {
    let unit = |suffix: char| text.strip_suffix(suffix).and_then(|n| n.parse::<u64>().ok());
    let seconds =
        [('d', 86_400), ('h', 3_600), ('m', 60), ('s', 1)].into_iter().find_map(|(suffix, seconds)| unit(suffix).map(|n| n * seconds));
    seconds.filter(|&s| s > 0).ok_or_else(|| format!("{text:?} is not a positive number of d, h, m or s (e.g. 30d)"))
}

fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(seconds) = text.parse::<i64>() {
        return Ok(seconds);
    }
    let parsed = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| anyhow::anyhow!("--issued-before {text:?}: not RFC 3339 or seconds since the epoch: {e}"))?;
    Ok(parsed.unix_timestamp())
}

/// Streams a state file's credentials, showing progress on stderr.
async fn import(client: &mut AdminClient<Channel>, file: &Path) -> anyhow::Result<ImportCredentialsReply> {
    let credentials: Vec<Credential> = read_state(file)?.credentials.iter().map(convert::credential_to_pb).collect();
    let total = credentials.len();
    let chunks: Vec<Vec<Credential>> = credentials.chunks(IMPORT_MESSAGE).map(<[Credential]>::to_vec).collect();
    let mut sent = 0;
    let messages = tokio_stream::iter(chunks.into_iter().map(move |chunk| {
        sent += chunk.len();
        eprint!("\rsent {sent}/{total} credentials");
        ImportCredentialsRequest { credentials: chunk }
    }));
    let reply = client.import_credentials(messages).await;
    eprintln!();
    Ok(reply?.into_inner())
}

/// Streams a snapshot into `file` (through `file.partial`, renamed once the whole file is
/// checked), with progress on standard error.
async fn save_snapshot(client: &mut AdminClient<Channel>, file: &Path) -> anyhow::Result<Backup> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let partial = file.with_extension(file.extension().map_or("partial".into(), |e| format!("{}.partial", e.to_string_lossy())));
    let mut stream = client.save_snapshot(SaveSnapshotRequest {}).await?.into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.data);
        eprint!("\rreceived {} of {} KiB", bytes.len() / 1024, chunk.total_bytes / 1024);
    }
    eprintln!();
    let backup = Backup::decode(&bytes).map_err(|e| anyhow::anyhow!("the snapshot received is not usable: {e}"))?;
    let write = || -> std::io::Result<()> {
        let mut out = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&partial)?;
        out.write_all(&bytes)?;
        out.sync_all()?;
        std::fs::rename(&partial, file)
    };
    write().map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    Ok(backup)
}

/// Prints a reply as JSON, or for people as [`reply_text`]. A write that `--wait` could not
/// confirm on every reachable node is an error after printing.
fn print(output: Output, reply: &impl Serialize) -> anyhow::Result<()> {
    let value = readable(serde_json::to_value(reply)?);
    let write = if value["write"].is_object() { &value["write"] } else { &value };
    let unconfirmed =
        node_ids(&write["not_applied_on"]).map(|nodes| anyhow::anyhow!("committed, but not yet applied on {nodes} when the wait ended"));
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => print!("{}", reply_text(&value)),
    }
    unconfirmed.map_or(Ok(()), Err)
}

/// A reply for people: a write as a sentence, lists as tables (key columns first, times in RFC
/// 3339), an empty list as a sentence, everything else as `name: value` lines; secrets hidden.
fn reply_text(value: &serde_json::Value) -> String {
    match write_summary(value) {
        Some(sentence) => format!("{sentence}\n"),
        None => fields_text(value),
    }
}

/// "node 3" or "nodes 1, 2", or `None` for an empty (or absent) list of node ids.
fn node_ids(value: &serde_json::Value) -> Option<String> {
    let ids: Vec<String> = value.as_array()?.iter().map(cell).collect();
    match ids.as_slice() {
        [] => None,
        [one] => Some(format!("node {one}")),
        many => Some(format!("nodes {}", many.join(", "))),
    }
}

/// A write reply (or a revocation reply around one) in words: what changed, the log index, and
/// where it is applied.
fn write_summary(value: &serde_json::Value) -> Option<String> {
    let write = if value["write"].is_object() { &value["write"] } else { value };
    let log_index = write["log_index"].as_u64().filter(|_| write.get("applied_on").is_some())?;
    let mut text = write["detail"].as_str().filter(|d| !d.is_empty()).unwrap_or("done").to_string();
    if let Some(ids) = value["revocation_ids"].as_array().filter(|ids| !ids.is_empty()) {
        let ids: Vec<String> = ids.iter().map(cell).collect();
        let label = if ids.len() == 1 { "revocation id" } else { "revocation ids" };
        text.push_str(&format!(" ({label} {}; undo with `rampart admin unrevoke {}`)", ids.join(", "), ids.join(" ")));
    }
    text.push_str(&format!(". Committed at log index {log_index}"));
    if let Some(nodes) = node_ids(&write["applied_on"]) {
        text.push_str(&format!(", applied on {nodes}"));
    }
    if let Some(nodes) = node_ids(&write["not_applied_on"]) {
        text.push_str(&format!(", not yet on {nodes}"));
    }
    if let Some(nodes) = node_ids(&write["unreachable_nodes"]) {
        text.push_str(&format!("; {nodes} did not answer and will catch up when reachable"));
    }
    text.push('.');
    Some(text)
}

/// Fields that hold seconds since the Unix epoch.
const TIME_FIELDS: [&str; 5] = ["time", "revoked_at", "issued_before", "connected_at", "cert_not_after"];
/// Columns shown first, in this order; the others follow alphabetically.
const KEY_COLUMNS: [&str; 9] = ["log_index", "id", "name", "node_id", "client_id", "identity", "time", "caller", "action"];
/// Fields holding a password hash or SCRAM verifier: shown as [`state::REDACTED`] (`--output json`
/// shows them).
const SECRET_FIELDS: [&str; 3] = ["hash", "scram_sha256", "scram_sha512"];
/// Fields of a list reply that hold its rows: an empty one reads as a sentence (a record's own
/// lists, such as a credential's roles, are cells).
const ROW_LISTS: [&str; 6] = ["credentials", "roles", "revocations", "sessions", "entries", "members"];

/// A field name in words: `total_matching` → `total matching`; `entries` → `audit entries`.
fn words(key: &str) -> String {
    match key {
        "entries" => "audit entries".into(),
        key => key.replace('_', " "),
    }
}

fn fields_text(value: &serde_json::Value) -> String {
    use serde_json::Value;
    let Value::Object(fields) = value else { return format!("{}\n", cell(value)) };
    let record = fields.contains_key("name");
    let mut text = String::new();
    for (key, field) in fields {
        match field {
            Value::Null => {}
            Value::Array(rows) if rows.is_empty() && !record && ROW_LISTS.contains(&key.as_str()) => {
                text.push_str(&format!("No {}.\n", words(key)))
            }
            Value::Array(_) if key == "unreachable_nodes" => {
                node_ids(field).into_iter().for_each(|nodes| text.push_str(&format!("{nodes} did not answer.\n")))
            }
            Value::Array(rows) if !rows.is_empty() && rows.iter().all(Value::is_object) && !key.ends_with("rules") => {
                text.push_str(&rows_text(key, rows))
            }
            // A cursor that points nowhere: there is no next page.
            Value::Number(n) if key.starts_with("next_page") && n.as_u64() == Some(0) => {}
            Value::String(s) if key.starts_with("next_page") && s.is_empty() => {}
            Value::Object(nested) => {
                for (name, v) in set_fields(nested) {
                    text.push_str(&format!("{} {}: {}\n", words(key), words(name), field_cell(name, v)));
                }
            }
            other => text.push_str(&format!("{}: {}\n", words(key), field_cell(key, other))),
        }
    }
    text
}

/// Rows (JSON objects) as a table titled `key`, key columns first.
fn rows_text(key: &str, rows: &[serde_json::Value]) -> String {
    let mut columns: Vec<String> = rows[0].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    columns.sort_by_key(|c| (KEY_COLUMNS.iter().position(|k| k == c).unwrap_or(KEY_COLUMNS.len()), c.clone()));
    let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|c| field_cell(c, &r[c])).collect()).collect();
    let headers: Vec<String> = columns.iter().map(|c| words(c)).collect();
    table(&words(key), &headers, &cells)
}

/// `title (N):`, the column names in upper case, then one line per row, columns two spaces apart.
fn table(title: &str, columns: &[String], rows: &[Vec<String>]) -> String {
    let widths: Vec<usize> =
        columns.iter().enumerate().map(|(i, c)| rows.iter().map(|row| row[i].len()).chain([c.len()]).max().unwrap_or(0)).collect();
    let line = |values: &[String]| {
        let padded: Vec<String> = values.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut text = format!("{title} ({}):\n", rows.len());
    text.push_str(&line(&columns.iter().map(|c| c.to_uppercase()).collect::<Vec<_>>()));
    rows.iter().for_each(|row| text.push_str(&line(row)));
    text
}

/// `kick` for people: where the client was disconnected, and which nodes did not answer.
fn kick_text(client_id: &str, reply: &KickClientReply) -> String {
    let nodes = |ids: &[u64]| node_ids(&serde_json::json!(ids));
    let mut text = match nodes(&reply.kicked_on) {
        Some(nodes) => format!("client {client_id:?} disconnected on {nodes}"),
        None => format!("client {client_id:?} is not connected to any node that answered"),
    };
    if let Some(nodes) = nodes(&reply.unreachable_nodes) {
        text.push_str(&format!("; {nodes} did not answer"));
    }
    text + ".\n"
}

/// `cluster status` for people: the answering node's view, then one row per member with the key
/// columns first (node, reachable, the leader it follows, term, lag), then the answering node's
/// link to it (`-` on its own row).
fn cluster_status_text(status: &ClusterStatusReply) -> String {
    let node = |id: u64| if id == 0 { "-".to_string() } else { id.to_string() };
    let address = |addr: &str| cell(&addr.into());
    let columns = [
        "node",
        "reachable",
        "leader",
        "term",
        "lag",
        "link up",
        "link queued",
        "link forwarded",
        "link dropped",
        "link routes",
        "applied index",
        "voter",
        "raft addr",
        "quic addr",
    ];
    let rows: Vec<Vec<String>> = (status.members.iter())
        .map(|m| {
            let own = m.id == status.answered_by;
            let link = |value: String| if own { "-".to_string() } else { value };
            vec![
                m.id.to_string(),
                m.reachable.to_string(),
                node(m.leader_id),
                m.term.to_string(),
                m.lag.to_string(),
                link(m.link_up.to_string()),
                link(m.link_queued.to_string()),
                link(m.link_forwarded.to_string()),
                link(m.link_dropped.to_string()),
                link(m.link_routes.to_string()),
                m.applied_index.to_string(),
                m.voter.to_string(),
                address(&m.raft_addr),
                address(&m.quic_addr),
            ]
        })
        .collect();
    let columns: Vec<String> = columns.iter().map(|c| c.to_string()).collect();
    format!(
        "answered by: node {}\nleader: {}\nterm: {}\ncommitted index: {}\n{}",
        status.answered_by,
        node(status.leader_id),
        status.term,
        status.committed_index,
        table("members", &columns, &rows)
    )
}

/// A field as table text: times in RFC 3339 (UTC), secrets hidden, rules as their flags spell
/// them (`allow readWrite:plants/%u/#`), lists joined with commas, nested objects as
/// `name: value` pairs of their set fields, the rest as [`cell`].
fn field_cell(key: &str, value: &serde_json::Value) -> String {
    use serde_json::Value;
    let time = value.as_i64().filter(|_| TIME_FIELDS.contains(&key)).and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok());
    if let Some(text) = time.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()) {
        return text;
    }
    match value {
        Value::String(s) if SECRET_FIELDS.contains(&key) && !s.is_empty() => state::REDACTED.into(),
        Value::Array(items) if items.is_empty() => "-".into(),
        Value::Array(items) => {
            items.iter().map(|item| if item.is_object() { rule_text(item) } else { cell(item) }).collect::<Vec<_>>().join(", ")
        }
        Value::Object(fields) => {
            set_fields(fields).map(|(name, v)| format!("{}: {}", words(name), field_cell(name, v))).collect::<Vec<_>>().join("; ")
        }
        other => cell(other),
    }
}

/// The fields of a nested object that say something: not null, empty, zero or false.
fn set_fields(fields: &serde_json::Map<String, serde_json::Value>) -> impl Iterator<Item = (&String, &serde_json::Value)> {
    use serde_json::Value;
    fields.iter().filter(|(_, v)| !matches!(v, Value::Null | Value::Bool(false)) && *v != "" && *v != 0)
}

/// A rule as the `--allow`/`--deny`(`-regex`) flag that makes it: `deny-regex read:secrets/.*`.
fn rule_text(rule: &serde_json::Value) -> String {
    let verdict = if rule["deny"] == true { "deny" } else { "allow" };
    let (kind, topic) = match rule["topic_regex"].as_str() {
        Some(regex) => ("-regex", regex),
        None => ("", rule["pattern"].as_str().unwrap_or_default()),
    };
    format!("{verdict}{kind} {}:{topic}", cell(&rule["access"]))
}

/// A scalar as text; nothing (null, an empty string) reads as `-`.
fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) if s.is_empty() => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Replaces enum numbers with the spelling of state files and flags: access `read`, `write`,
/// `readWrite`; client type `DEVICE`, `APPLICATION` (none: null); unknown certificate `reject`,
/// `default_rules`.
fn readable(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    let name = |key: &str, n: i32| -> Option<Value> {
        let spelled = match key {
            "access" => serde_json::to_value(convert::access_from_pb(Access::try_from(n).ok()?)?),
            "client_type" => match ClientType::try_from(n).ok()? {
                ClientType::Unspecified => Ok(Value::Null),
                known => serde_json::to_value(convert::client_type(known as i32)),
            },
            "unknown_certificate" => serde_json::to_value(convert::unknown_certificate(n)),
            _ => return None,
        };
        spelled.ok()
    };
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, v)| {
                    let named = v.as_i64().and_then(|n| name(&key, n as i32));
                    (key, named.unwrap_or_else(|| readable(v)))
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(readable).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every option and argument of `command` and its subcommands, without a description.
    fn undocumented(command: &clap::Command, path: &str) -> Vec<String> {
        let here = command.get_arguments().filter(|a| a.get_help().is_none() && !a.is_hide_set()).map(|a| format!("{path} {}", a.get_id()));
        let below = command.get_subcommands().flat_map(|sub| undocumented(sub, &format!("{path} {}", sub.get_name())));
        here.chain(below).collect()
    }

    #[test]
    fn expiring_within_takes_a_number_and_a_unit() {
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("12h"), Ok(12 * 3_600));
        assert_eq!(parse_duration("90m"), Ok(5_400));
        assert_eq!(parse_duration("3600s"), Ok(3_600));
        for bad in ["30", "0d", "d", "-1d", "1w"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_option_has_a_description() {
        let admin = <AdminArgs as clap::Args>::augment_args(clap::Command::new("admin"));
        assert_eq!(undocumented(&admin, "admin"), Vec::<String>::new());
        let pki = <crate::pki::cli::PkiArgs as clap::Args>::augment_args(clap::Command::new("pki"));
        assert_eq!(undocumented(&pki, "pki"), Vec::<String>::new());
    }

    #[test]
    fn write_replies_read_as_sentences_and_tables_put_keys_and_times_first() {
        let reply = serde_json::json!({
            "write": {"log_index": 7, "applied_on": [1, 2], "not_applied_on": [], "unreachable_nodes": [3], "detail": "2 revocations added"},
            "revocation_ids": [4, 5]
        });
        assert_eq!(
            write_summary(&reply).unwrap(),
            "2 revocations added (revocation ids 4, 5; undo with `rampart admin unrevoke 4 5`). Committed at log index 7, applied on \
             nodes 1, 2; node 3 did not answer and will catch up when reachable."
        );
        let one = serde_json::json!({"write": {"log_index": 8, "applied_on": [1], "detail": "1 revocation added"}, "revocation_ids": [6]});
        assert_eq!(
            write_summary(&one).unwrap(),
            "1 revocation added (revocation id 6; undo with `rampart admin unrevoke 6`). Committed at log index 8, applied on node 1."
        );
        assert_eq!(field_cell("revoked_at", &serde_json::json!(0)), "1970-01-01T00:00:00Z");
        assert_eq!(field_cell("applied_index", &serde_json::json!(0)), "0");
        assert_eq!(node_ids(&serde_json::json!([3])).as_deref(), Some("node 3"));
    }

    /// The providers `get` prints (TOML for people, JSON for scripts) are what `set` reads back.
    #[test]
    fn providers_get_prints_what_set_reads() {
        let providers: state::Providers = toml::from_str(
            r#"
            order = ["x509", "jwt"]
            [jwt]
            hmac_secret = "******"
            public_keys = ["-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"]
            rules = [{ access = "readWrite", pattern = "apps/%u/#" }]
            "#,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        for output in [Output::Table, Output::Json] {
            let text = document_text(output, "providers", &providers).unwrap();
            let file = dir.path().join("p.txt");
            std::fs::write(&file, &text).unwrap();
            assert_eq!(read_document(&file, "providers", |s| s.providers).unwrap(), providers, "{output:?}:\n{text}");
        }
        let table = document_text(Output::Table, "providers", &providers).unwrap();
        assert!(table.starts_with("[providers]\norder = [\"x509\", \"jwt\"]\n"), "{table}");
        assert!(table.contains("access = \"readWrite\""), "{table}");
        // A file without the table is refused rather than read as the defaults.
        let other = dir.path().join("other.toml");
        std::fs::write(&other, "[defaults]\nanonymous = true\n").unwrap();
        let refused = read_document(&other, "providers", |s| s.providers).unwrap_err().to_string();
        assert!(refused.ends_with("no [providers] table (the output of `get` has one)"), "{refused}");
    }

    #[test]
    fn defaults_and_client_types_get_print_what_set_reads() {
        let defaults = state::Defaults {
            unknown_certificate: state::UnknownCertificate::DefaultRules,
            anonymous: true,
            anonymous_rules: vec![state::Rule {
                access: state::Access::Read,
                topic_regex: None,
                pattern: Some("demo/#".into()),
                deny: false,
            }],
            ..Default::default()
        };
        let client_types =
            state::ClientTypes { application: state::ClientTypeSettings { max_queued_messages: Some(5000) }, ..Default::default() };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("d.txt");
        for output in [Output::Table, Output::Json] {
            std::fs::write(&file, document_text(output, "defaults", &defaults).unwrap()).unwrap();
            assert_eq!(read_document(&file, "defaults", |s| s.defaults).unwrap(), defaults);
            std::fs::write(&file, document_text(output, "client_types", &client_types).unwrap()).unwrap();
            assert_eq!(read_document(&file, "client_types", |s| s.client_types).unwrap(), client_types);
        }
        let table = document_text(Output::Table, "defaults", &defaults).unwrap();
        assert!(table.starts_with("[defaults]\nunknown_certificate = \"default_rules\"\n"), "{table}");
    }

    fn check_access(args: &[&str]) -> Result<AdminArgs, clap::Error> {
        let admin = <AdminArgs as clap::Args>::augment_args(clap::Command::new("admin"));
        let matches = admin.try_get_matches_from(["admin", "check-access", "--action", "connect"].iter().chain(args))?;
        <AdminArgs as clap::FromArgMatches>::from_arg_matches(&matches)
    }

    #[test]
    fn check_access_takes_one_client_identity_certificate_token_or_anonymous() {
        for args in [&["--identity", "plc-2"][..], &["--certificate", "plc-2.pem"], &["--token", "t"], &["--anonymous"]] {
            assert!(check_access(args).is_ok(), "{args:?}");
        }
        assert!(check_access(&["--token", "t", "--identity", "user"]).is_ok());
        assert!(check_access(&["--identity", "u", "--password-user"]).is_ok());
        for args in [
            &[][..],
            &["--anonymous", "--identity", "plc-2"],
            &["--certificate", "plc-2.pem", "--identity", "plc-2"],
            &["--certificate", "plc-2.pem", "--serial", "0A"],
            &["--anonymous", "--token", "t"],
        ] {
            assert!(check_access(args).is_err(), "{args:?}");
        }
        let help = check_access(&["--help"]).unwrap_err().to_string();
        assert!(!help.contains("[default: ]"), "{help}");
        let admin = <AdminArgs as clap::Args>::augment_args(clap::Command::new("admin"));
        let about = admin.find_subcommand("check-access").and_then(|c| c.get_about()).map(ToString::to_string).unwrap_or_default();
        assert!(about.contains("Exit status 0 when allowed, 1 when denied"), "{about}");
    }

    #[test]
    fn tables_spell_access_as_flags_do_hide_hashes_and_say_when_a_list_is_empty() {
        let listed = ListCredentialsReply {
            credentials: vec![Credential {
                name: "alice".into(),
                enabled: true,
                client_type: ClientType::Application as i32,
                rules: vec![
                    Rule { access: Access::ReadWrite as i32, pattern: Some("apps/%u/#".into()), topic_regex: None, deny: false },
                    Rule { access: Access::Read as i32, topic_regex: Some("secret/.*".into()), pattern: None, deny: true },
                ],
                password: Some(PasswordMatch { username: "alice".into(), hash: "$argon2id$v=19$secret".into(), ..Default::default() }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = reply_text(&readable(serde_json::to_value(&listed).unwrap()));
        assert!(text.starts_with("credentials (1):\nNAME   CLIENT TYPE  ENABLED  PASSWORD"), "{text}");
        assert!(text.contains("hash: ******; username: alice"), "{text}");
        assert!(text.contains("allow readWrite:apps/%u/#, deny-regex read:secret/.*"), "{text}");
        assert!(text.contains("total matching: 0"), "{text}");
        for raw in ["argon2id", "READ_WRITE", "APPLICATION_", "{", "\""] {
            assert!(!text.contains(raw), "{raw} in {text}");
        }
        let json = readable(serde_json::to_value(&listed).unwrap());
        assert_eq!(json["credentials"][0]["rules"][0]["access"], "readWrite");
        assert_eq!(json["credentials"][0]["password"]["hash"], "$argon2id$v=19$secret", "JSON is the API's reply");

        let empty = reply_text(&readable(serde_json::to_value(ListRevocationsReply::default()).unwrap()));
        assert_eq!(empty, "No revocations.\ntotal: 0\n");
        let sessions = ListSessionsReply { sessions: vec![], unreachable_nodes: vec![3] };
        assert_eq!(reply_text(&readable(serde_json::to_value(&sessions).unwrap())), "No sessions.\nnode 3 did not answer.\n");
        let record = Credential {
            name: "plc-2".into(),
            client_type: ClientType::Device as i32,
            x509: Some(X509Match { identity: Some("plc-2".into()), ..Default::default() }),
            ..Default::default()
        };
        let text = reply_text(&readable(serde_json::to_value(&record).unwrap()));
        assert_eq!(text, "client type: DEVICE\nenabled: false\nname: plc-2\nroles: -\nrules: -\nx509 identity: plc-2\n");
        let kicked = KickClientReply { kicked_on: vec![2], unreachable_nodes: vec![] };
        assert_eq!(kick_text("plc-2", &kicked), "client \"plc-2\" disconnected on node 2.\n");
        let nowhere = KickClientReply { kicked_on: vec![], unreachable_nodes: vec![3] };
        assert_eq!(kick_text("x", &nowhere), "client \"x\" is not connected to any node that answered; node 3 did not answer.\n");
        let denied = CheckAccessReply { allowed: false, decided_by: "CONNECT refused: revoked".into(), ..Default::default() };
        let text = reply_text(&readable(serde_json::to_value(&denied).unwrap()));
        assert_eq!(text, "allowed: false\ncredential: -\ndecided by: CONNECT refused: revoked\n");
    }

    #[test]
    fn cluster_status_puts_node_reachable_leader_term_lag_first_and_no_own_link() {
        let member = |id, link_up| ClusterMember {
            id,
            raft_addr: format!("127.0.0.1:707{id}"),
            reachable: true,
            leader_id: 1,
            term: 3,
            applied_index: 40,
            voter: true,
            link_up,
            link_forwarded: 12,
            ..Default::default()
        };
        let status = ClusterStatusReply {
            leader_id: 1,
            term: 3,
            committed_index: 40,
            answered_by: 1,
            members: vec![member(1, false), member(2, true)],
        };
        let text = cluster_status_text(&status);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[..5], ["answered by: node 1", "leader: 1", "term: 3", "committed index: 40", "members (2):"], "{text}");
        let columns: Vec<&str> = lines[5].split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(columns[..7], ["NODE", "REACHABLE", "LEADER", "TERM", "LAG", "LINK UP", "LINK QUEUED"], "{text}");
        let own: Vec<&str> = lines[6].split_whitespace().collect();
        assert_eq!(own[..10], ["1", "true", "1", "3", "0", "-", "-", "-", "-", "-"], "{text}");
        let peer: Vec<&str> = lines[7].split_whitespace().collect();
        assert_eq!(peer[..10], ["2", "true", "1", "3", "0", "true", "0", "12", "0", "0"], "{text}");
    }
}
