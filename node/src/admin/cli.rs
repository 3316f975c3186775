//! `rampart admin …`: every admin API call from the command line, with tables (or
//! `--output json`), endpoint and admin certificate from flags or the environment, a progress
//! line for bulk imports, and a non-zero exit with the gRPC error.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use rampart_proto::admin::admin_client::AdminClient;
use rampart_proto::admin::*;
use serde::Serialize;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::convert;
use crate::auth::state::AuthState;

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
    /// Rules for certificates without a credential and for anonymous clients.
    #[command(subcommand)]
    Defaults(StateFileCommand),
    /// The authentication provider chain: order, enabled providers, JWT settings.
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
    },
    /// Disconnect a client wherever it is connected.
    Kick {
        /// The client id to disconnect.
        client_id: String,
        /// Why, for the log.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Dry run: would this identity be allowed to connect, publish or subscribe?
    CheckAccess(CheckAccessArgs),
    /// Cluster membership and progress.
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// The audit trail of admin changes.
    #[command(subcommand)]
    Audit(AuditCommand),
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
    /// Show them.
    Get,
    /// Replace them with the table of the same name (`[defaults]`, `[providers]`) of a state file.
    Set {
        /// The state file (TOML).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClientTypesCommand {
    /// Show them.
    Get,
    /// Set them (an option left out keeps the node's configured limit).
    Set {
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

#[derive(Debug, Args)]
pub struct CheckAccessArgs {
    /// Certificate identity (or, with --password-user or --token, user name) of the client.
    #[arg(long, default_value = "", required_unless_present = "token")]
    identity: String,
    /// Issuer DN of its certificate (for revocations and issuer-bound credentials).
    #[arg(long, default_value = "")]
    issuer: String,
    /// Serial (hex) of its certificate (for revocations).
    #[arg(long, default_value = "")]
    serial: String,
    /// The identity is the user name of a password credential.
    #[arg(long)]
    password_user: bool,
    /// A JSON Web Token sent as the password (checked by the jwt provider as the broker would).
    #[arg(long)]
    token: Option<String>,
    /// Client id of the CONNECT (default: the identity).
    #[arg(long, default_value = "")]
    client_id: String,
    /// What to check.
    #[arg(long, value_enum)]
    action: ActionArg,
    /// Topic name (publish) or filter (subscribe).
    #[arg(long, default_value = "")]
    topic: String,
}

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
        AdminCommand::Defaults(StateFileCommand::Get) => print(out, &client.get_defaults(GetDefaultsRequest {}).await?.into_inner()),
        AdminCommand::Defaults(StateFileCommand::Set { file }) => {
            let defaults = Some(convert::defaults_to_pb(&read_state(&file)?.defaults));
            print(out, &client.set_defaults(SetDefaultsRequest { defaults, options }).await?.into_inner())
        }
        AdminCommand::Providers(StateFileCommand::Get) => {
            let document = client.get_providers(GetProvidersRequest {}).await?.into_inner();
            print(out, &serde_json::from_str::<serde_json::Value>(&document.json)?)
        }
        AdminCommand::Providers(StateFileCommand::Set { file }) => {
            let providers = Some(ProvidersDocument { json: serde_json::to_string(&read_state(&file)?.providers)? });
            print(out, &client.set_providers(SetProvidersRequest { providers, options }).await?.into_inner())
        }
        AdminCommand::ClientTypes(ClientTypesCommand::Get) => {
            print(out, &client.get_client_types(GetClientTypesRequest {}).await?.into_inner())
        }
        AdminCommand::ClientTypes(ClientTypesCommand::Set { device_max_queued, application_max_queued }) => {
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
        AdminCommand::Sessions { node, contains, limit } => {
            print(out, &client.list_sessions(ListSessionsRequest { node_id: node, contains, limit }).await?.into_inner())
        }
        AdminCommand::Kick { client_id, reason } => {
            print(out, &client.kick_client(KickClientRequest { client_id, reason }).await?.into_inner())
        }
        AdminCommand::CheckAccess(c) => {
            let action = match c.action {
                ActionArg::Connect => Action::Connect,
                ActionArg::Publish => Action::Publish,
                ActionArg::Subscribe => Action::Subscribe,
            };
            let request = CheckAccessRequest {
                identity: c.identity,
                issuer: c.issuer,
                serial: c.serial,
                password_user: c.password_user,
                client_id: c.client_id,
                action: action as i32,
                topic: c.topic,
                token: c.token.unwrap_or_default(),
            };
            print(out, &client.check_access(request).await?.into_inner())
        }
        AdminCommand::Cluster(ClusterCommand::Status) => print(out, &client.cluster_status(ClusterStatusRequest {}).await?.into_inner()),
        AdminCommand::Cluster(ClusterCommand::AddNode { id, raft_addr, quic_addr, learner_only }) => {
            print(out, &client.add_node(AddNodeRequest { id, raft_addr, quic_addr, learner_only, options }).await?.into_inner())
        }
        AdminCommand::Cluster(ClusterCommand::RemoveNode { id }) => {
            print(out, &client.remove_node(RemoveNodeRequest { id, options }).await?.into_inner())
        }
        AdminCommand::Audit(AuditCommand::List { after, limit }) => {
            print(out, &client.list_audit(ListAuditRequest { after_index: after, limit }).await?.into_inner())
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

/// Prints a reply as JSON, or for people: a write as a sentence, lists as tables (key columns
/// first, times in RFC 3339), everything else as `key: value`. A write that `--wait` could not
/// confirm on every reachable node is an error after printing.
fn print(output: Output, reply: &impl Serialize) -> anyhow::Result<()> {
    let value = readable(serde_json::to_value(reply)?);
    let write = if value["write"].is_object() { &value["write"] } else { &value };
    let unconfirmed =
        node_ids(&write["not_applied_on"]).map(|nodes| anyhow::anyhow!("committed, but not yet applied on {nodes} when the wait ended"));
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        Output::Table => match write_summary(&value) {
            Some(sentence) => println!("{sentence}"),
            None => print_value(value),
        },
    }
    unconfirmed.map_or(Ok(()), Err)
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
        text.push_str(&format!(" (revocation ids {}; undo with `rampart admin unrevoke {}`)", ids.join(", "), ids.join(" ")));
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

fn print_value(value: serde_json::Value) {
    let serde_json::Value::Object(fields) = value else {
        println!("{}", cell(&value));
        return;
    };
    for (key, field) in &fields {
        match field {
            serde_json::Value::Array(rows) if rows.iter().all(|r| r.is_object()) && !rows.is_empty() => print_table(key, rows),
            // A cursor that points nowhere: there is no next page.
            serde_json::Value::Number(n) if key.starts_with("next_page") && n.as_u64() == Some(0) => {}
            serde_json::Value::String(s) if key.starts_with("next_page") && s.is_empty() => {}
            other => println!("{key}: {}", field_cell(key, other)),
        }
    }
}

fn print_table(title: &str, rows: &[serde_json::Value]) {
    let mut columns: Vec<String> = rows[0].as_object().map(|o| o.keys().cloned().collect()).unwrap_or_default();
    columns.sort_by_key(|c| (KEY_COLUMNS.iter().position(|k| k == c).unwrap_or(KEY_COLUMNS.len()), c.clone()));
    let cells: Vec<Vec<String>> = rows.iter().map(|r| columns.iter().map(|c| field_cell(c, &r[c])).collect()).collect();
    let widths: Vec<usize> =
        columns.iter().enumerate().map(|(i, c)| cells.iter().map(|row| row[i].len()).chain([c.len()]).max().unwrap_or(0)).collect();
    println!("{title} ({}):", rows.len());
    let line = |values: Vec<&str>| {
        values.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    println!(
        "{}",
        line(columns.iter().map(String::as_str).map(str::to_uppercase).collect::<Vec<_>>().iter().map(String::as_str).collect())
    );
    for row in &cells {
        println!("{}", line(row.iter().map(String::as_str).collect()));
    }
}

/// A field as table text: times in RFC 3339 (UTC), the rest as [`cell`].
fn field_cell(key: &str, value: &serde_json::Value) -> String {
    let time = value.as_i64().filter(|_| TIME_FIELDS.contains(&key)).and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok());
    match time.and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok()) {
        Some(text) => text,
        None => cell(value),
    }
}

fn cell(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) if s.is_empty() => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Replaces enum numbers with their names.
fn readable(value: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .into_iter()
                .map(|(key, v)| {
                    let named = match (key.as_str(), &v) {
                        ("client_type", Value::Number(n)) => {
                            n.as_i64().and_then(|n| ClientType::try_from(n as i32).ok()).map(|t| t.as_str_name())
                        }
                        ("access", Value::Number(n)) => n.as_i64().and_then(|n| Access::try_from(n as i32).ok()).map(|a| a.as_str_name()),
                        ("unknown_certificate", Value::Number(n)) => {
                            n.as_i64().and_then(|n| UnknownCertificate::try_from(n as i32).ok()).map(|u| u.as_str_name())
                        }
                        _ => None,
                    };
                    (key, named.map_or_else(|| readable(v), |name| Value::String(name.to_string())))
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
        assert_eq!(field_cell("revoked_at", &serde_json::json!(0)), "1970-01-01T00:00:00Z");
        assert_eq!(field_cell("applied_index", &serde_json::json!(0)), "0");
        assert_eq!(node_ids(&serde_json::json!([3])).as_deref(), Some("node 3"));
    }
}
