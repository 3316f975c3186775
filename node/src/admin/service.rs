//! The admin gRPC service (`rampart.admin.v1.Admin`): every call checks the caller's admin
//! certificate; writes become Raft proposals (forwarded to the leader by any node), reads come
//! from this node's applied state, and session calls fan out to every member.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use rampart_proto::admin::admin_server::Admin;
use rampart_proto::admin::*;
use rampart_proto::cluster::node_client::NodeClient;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::convert;
use crate::auth::acl::AclAction;
use crate::auth::chain::{self, Presented};
use crate::auth::identity::{IdentityRule, PeerCertificate};
use crate::auth::index::{compile_revocation, validate_credential, AuthIndex, Grant, PasswordCheck};
use crate::auth::policy::{AuthPolicy, PeerAuth};
use crate::auth::state::{AuthState, Revocation as StateRevocation};
use crate::auth::store::AuthStore;
use crate::auth::Refusal;
use crate::broker::clients::ConnectedClients;
use crate::cluster::command::{AuthCmd, AuthResp, Op, Refused};
use crate::cluster::service::{local_kick, local_sessions};
use crate::cluster::{Cluster, Proposal, ProposeError};
use crate::forward::Forwarder;
use crate::mqtt::codec::ProtocolVersion;

/// Credentials per Raft entry in a bulk import.
pub const IMPORT_BATCH: usize = 2000;
const PEER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct AdminService {
    cluster: Arc<Cluster>,
    auth: Arc<AuthStore>,
    clients: Arc<ConnectedClients>,
    /// DER certificates of the CAs whose CRLs may be imported.
    trusted_cas: Vec<Vec<u8>>,
    /// The CONNECT policy this node's listeners apply, for dry runs.
    policy: AuthPolicy,
    /// This node's forwarding links, for the cluster status.
    forwarder: Arc<Forwarder>,
    /// How `check-access --certificate` reads an identity (see [`certificate_identity`]).
    certificate_identity: Result<IdentityRule, String>,
}

fn invalid(e: String) -> Status {
    Status::invalid_argument(e)
}

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::Invalid(reason) => Status::invalid_argument(reason),
        other => Status::unavailable(other.to_string()),
    }
}

fn refused_status(kind: Refused, reason: &str) -> Status {
    match kind {
        Refused::Invalid => Status::invalid_argument(reason),
        Refused::NotFound => Status::not_found(reason),
        Refused::AlreadyExists => Status::already_exists(reason),
        Refused::InUse => Status::failed_precondition(reason),
    }
}

type AuditStream = Pin<Box<dyn Stream<Item = Result<AuditEntry, Status>> + Send>>;
type SnapshotStream = Pin<Box<dyn Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

/// Bytes per chunk of a saved snapshot.
const SNAPSHOT_CHUNK: usize = 256 * 1024;

impl AdminService {
    pub fn new(
        cluster: Arc<Cluster>,
        auth: Arc<AuthStore>,
        clients: Arc<ConnectedClients>,
        trusted_cas: Vec<Vec<u8>>,
        policy: AuthPolicy,
        forwarder: Arc<Forwarder>,
        certificate_identity: Result<IdentityRule, String>,
    ) -> AdminService {
        AdminService { cluster, auth, clients, trusted_cas, policy, forwarder, certificate_identity }
    }

    fn caller<T>(&self, request: &Request<T>) -> Result<String, Status> {
        crate::tls::caller::authorize(request, crate::pki::ADMIN_OU, &self.auth)
    }

    /// The state this node has applied.
    fn state(&self) -> Arc<AuthIndex> {
        self.auth.current()
    }

    fn with_state<R>(&self, read: impl FnOnce(&AuthState) -> R) -> R {
        let index = self.state();
        read(index.state().unwrap_or(&AuthState::default()))
    }

    /// Commits `op` and, when asked, waits for every node to apply it.
    async fn write(&self, caller: String, op: Op, options: Option<WriteOptions>) -> Result<(WriteReply, AuthResp), Status> {
        let committed = self.cluster.propose(Proposal::Auth(Box::new(AuthCmd::new(caller, op)))).await.map_err(propose_status)?;
        if let Some((kind, reason)) = &committed.resp.error {
            return Err(refused_status(*kind, reason));
        }
        let reply = self.settle(committed.log_index, committed.resp.detail.clone(), options).await;
        Ok((reply, committed.resp))
    }

    async fn settle(&self, log_index: u64, detail: String, options: Option<WriteOptions>) -> WriteReply {
        let options = options.unwrap_or_default();
        if !options.wait_all_nodes {
            let here = (*self.cluster.replica.applied().borrow() >= log_index).then_some(self.cluster.id);
            return WriteReply { log_index, applied_on: here.into_iter().collect(), detail, ..Default::default() };
        }
        let timeout = Duration::from_millis(if options.wait_timeout_ms == 0 { 5000 } else { options.wait_timeout_ms.into() });
        let applied = self.cluster.wait_applied(log_index, timeout).await;
        WriteReply { log_index, applied_on: applied.done, not_applied_on: applied.pending, detail, unreachable_nodes: applied.unreachable }
    }

    /// Records a committed membership change in the audit trail (caller and time). The change
    /// stands even if recording fails; the reply then says so.
    async fn membership_changed(&self, caller: String, log_index: u64, change: String, options: Option<WriteOptions>) -> WriteReply {
        let recorded =
            self.cluster.propose(Proposal::Auth(Box::new(AuthCmd::new(caller, Op::RecordMembership { change: change.clone() })))).await;
        let detail = match recorded {
            Ok(_) => change,
            Err(e) => format!("{change} (not recorded in the audit: {e})"),
        };
        self.settle(log_index, detail, options).await
    }

    /// Asks every member (`only`: one of them, 0 = all): this node through `local`, the others
    /// over the cluster port through `remote`, each within a timeout. Returns the answers and
    /// the members that did not answer.
    async fn ask_members<R, F, Fut>(&self, only: u64, local: impl Fn() -> R, remote: F) -> (Vec<R>, Vec<u64>)
    where
        F: Fn(NodeClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let members = self.cluster.members().into_iter().filter(|(id, _, _)| only == 0 || only == *id);
        let asks = members.map(|(id, node, _)| {
            let (local, remote) = (&local, &remote);
            async move {
                if id == self.cluster.id {
                    return (id, Some(local()));
                }
                let ask = async { remote(self.cluster.node_client(&node).ok()?).await.ok().map(Response::into_inner) };
                (id, tokio::time::timeout(PEER_TIMEOUT, ask).await.ok().flatten())
            }
        });
        let mut answers = Vec::new();
        let mut unreachable = Vec::new();
        for (id, answer) in futures_util::future::join_all(asks).await {
            match answer {
                Some(answer) => answers.push(answer),
                None => unreachable.push(id),
            }
        }
        (answers, unreachable)
    }

    /// Checks a credential before proposing it, so a malformed one is refused without a Raft
    /// round (uniqueness is checked at apply).
    fn checked_credential(&self, credential: Option<Credential>) -> Result<crate::auth::state::Credential, Status> {
        let credential = convert::credential_from_pb(credential.ok_or_else(|| invalid("credential: required".into()))?).map_err(invalid)?;
        self.with_state(|state| validate_credential(&credential, |role| state.roles.iter().any(|r| r.name == role)))
            .map_err(|e| invalid(format!("credential {:?}: {e}", credential.name)))?;
        Ok(credential)
    }

    /// Decides a CONNECT as the listeners do: the node's CONNECT policy (user name, client id
    /// policy) and the provider chain, then CRL revocations and the applied state. A password
    /// user is taken as having given the right password; a token is verified; the HTTP endpoint,
    /// when enabled, is asked (without a password). Blocking: runs on a blocking thread.
    async fn dry_run_connect(
        &self,
        r: CheckAccessRequest,
        certificate: Option<PeerCertificate>,
        client_id: String,
    ) -> Result<Result<Grant, Refusal>, Status> {
        let (auth, policy, runtime) = (self.auth.clone(), self.policy, tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || dry_run_connect(&auth, policy, &runtime, &r, certificate, client_id))
            .await
            .map_err(|e| Status::internal(format!("check-access: {e}")))?
    }

    /// The identity, serial, issuer and validity of a client certificate (PEM or DER), read as
    /// this node's mutual-TLS listeners read them.
    fn peer_certificate(&self, bytes: &[u8]) -> Result<PeerCertificate, Status> {
        let rule = self.certificate_identity.as_ref().map_err(|e| invalid(e.clone()))?;
        let der = crate::pki::pem_to_der(bytes).unwrap_or_else(|_| bytes.to_vec());
        rule.extract(&der).map_err(|e| invalid(format!("certificate: {e}")))
    }

    /// Verifies a CRL's signature against a trusted CA and turns its entries into revocations.
    fn crl_revocations(&self, bytes: &[u8]) -> Result<(String, Vec<StateRevocation>), Status> {
        let der = match rustls_pki_types::pem::PemObject::from_pem_slice(bytes) {
            Ok(crl) => rustls_pki_types::CertificateRevocationListDer::as_ref(&crl).to_vec(),
            Err(_) => bytes.to_vec(),
        };
        let (_, crl) = x509_parser::parse_x509_crl(&der).map_err(|e| invalid(format!("crl: not a PEM or DER CRL: {e}")))?;
        let signed_by_trusted = self.trusted_cas.iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca)
                .is_ok_and(|(_, ca)| ca.subject().as_raw() == crl.issuer().as_raw() && crl.verify_signature(ca.public_key()).is_ok())
        });
        if !signed_by_trusted {
            return Err(invalid(format!("crl: issued by {} but not signed by a CA this node trusts for clients", crl.issuer())));
        }
        let issuer = crl.issuer().to_string();
        let revocations = crl
            .iter_revoked_certificates()
            .map(|entry| StateRevocation {
                issuer: Some(issuer.clone()),
                serial: Some(crate::auth::serial::format_serial(entry.raw_serial())),
                reason: entry.reason_code().and_then(|(_, code)| crate::pki::reason::name_of_code(code.0)).unwrap_or("unspecified").into(),
                ..Default::default()
            })
            .collect();
        Ok((issuer, revocations))
    }
}

/// The revocations a `RevokeCertificates` request asks for: one per serial, or one rule.
fn requested_revocations(r: &RevokeCertificatesRequest) -> Result<Vec<StateRevocation>, Status> {
    let reason = crate::pki::reason::normalize(&r.reason).map_err(|e| invalid(format!("reason: {e}")))?;
    let base = StateRevocation { issuer: r.issuer.clone(), reason: reason.into(), ..Default::default() };
    let revocations = if !r.serials.is_empty() {
        if r.issuer.is_none() || r.identity_regex.is_some() || r.issued_before.is_some() {
            return Err(invalid("serials: give them with issuer only (serials are unique per issuer)".into()));
        }
        let serials = r.serials.iter().map(|s| crate::auth::serial::normalize_serial(s).map_err(|e| invalid(format!("serials: {e}"))));
        serials.map(|serial| Ok(StateRevocation { serial: Some(serial?), ..base.clone() })).collect::<Result<Vec<_>, Status>>()?
    } else {
        vec![StateRevocation { identity_regex: r.identity_regex.clone(), issued_before: r.issued_before, ..base }]
    };
    for revocation in &revocations {
        compile_revocation(revocation).map_err(|e| invalid(if e.starts_with("a revocation") { format!("selector: {e}") } else { e }))?;
    }
    Ok(revocations)
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn put_credential(&self, request: Request<PutCredentialRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let credential = self.checked_credential(r.credential)?;
        let (reply, _) = self.write(caller, Op::PutCredential { credential, create_only: r.create_only }, r.options).await?;
        Ok(Response::new(reply))
    }

    async fn get_credential(&self, request: Request<NameRequest>) -> Result<Response<Credential>, Status> {
        self.caller(&request)?;
        let name = request.into_inner().name;
        self.with_state(|s| s.credentials.get(&name).map(convert::credential_to_pb))
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no credential {name:?}")))
    }

    async fn list_credentials(&self, request: Request<ListCredentialsRequest>) -> Result<Response<ListCredentialsReply>, Status> {
        self.caller(&request)?;
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => return Err(invalid(format!("page_size: {n} is above 1000"))),
        };
        let client_type = convert::client_type_filter(r.client_type);
        let reply = self.with_state(|state| {
            let mut matching: Vec<_> = (state.credentials.iter())
                .filter(|c| {
                    let identity = c.x509.as_ref().and_then(|x| x.identity.as_ref().or(x.identity_regex.as_ref()));
                    let username = c.password.as_ref().and_then(|p| p.username.as_ref());
                    (r.contains.is_empty() || [Some(&c.name), identity, username].into_iter().flatten().any(|t| t.contains(&r.contains)))
                        && client_type.is_none_or(|t| t == c.client_type)
                        && r.enabled.is_none_or(|e| e == c.enabled)
                        && r.role.as_ref().is_none_or(|role| c.roles.contains(role))
                })
                .collect();
            matching.sort_by(|a, b| a.name.cmp(&b.name));
            let total_matching = matching.len() as u64;
            let page: Vec<_> = matching.into_iter().filter(|c| c.name > r.page_after).take(page_size + 1).collect();
            let next = if page.len() > page_size { page[page_size - 1].name.clone() } else { String::new() };
            let credentials = page.iter().take(page_size).map(|c| convert::credential_to_pb(c)).collect();
            ListCredentialsReply { credentials, next_page_after: next, total_matching }
        });
        Ok(Response::new(reply))
    }

    async fn delete_credential(&self, request: Request<NameRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(self.write(caller, Op::DeleteCredential { name: r.name }, r.options).await?.0))
    }

    async fn set_credential_enabled(&self, request: Request<SetCredentialEnabledRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(self.write(caller, Op::SetCredentialEnabled { name: r.name, enabled: r.enabled }, r.options).await?.0))
    }

    async fn import_credentials(
        &self,
        request: Request<Streaming<ImportCredentialsRequest>>,
    ) -> Result<Response<ImportCredentialsReply>, Status> {
        let caller = self.caller(&request)?;
        let mut stream = request.into_inner();
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        let mut reply = ImportCredentialsReply::default();
        let mut received = 0usize;
        loop {
            let message = stream.next().await.transpose()?;
            let done = message.is_none();
            for credential in message.into_iter().flat_map(|m| m.credentials) {
                let converted = convert::credential_from_pb(credential).map_err(|e| invalid(format!("credentials[{received}]: {e}")))?;
                received += 1;
                batch.push(converted);
            }
            while batch.len() >= IMPORT_BATCH || (done && !batch.is_empty()) {
                let chunk: Vec<_> = batch.drain(..batch.len().min(IMPORT_BATCH)).collect();
                let first = reply.imported;
                let count = chunk.len() as u64;
                let (written, _) = self.write(caller.clone(), Op::ImportCredentials(chunk), None).await.map_err(|s| {
                    Status::new(s.code(), format!("credentials {first}..{}: {} ({first} imported before)", first + count, s.message()))
                })?;
                reply.imported += count;
                reply.batches += 1;
                reply.last_log_index = written.log_index;
            }
            if done {
                return Ok(Response::new(reply));
            }
        }
    }

    async fn put_role(&self, request: Request<PutRoleRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let role = convert::role_from_pb(r.role.ok_or_else(|| invalid("role: required".into()))?).map_err(invalid)?;
        Ok(Response::new(self.write(caller, Op::PutRole(role), r.options).await?.0))
    }

    async fn delete_role(&self, request: Request<NameRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        Ok(Response::new(self.write(caller, Op::DeleteRole { name: r.name }, r.options).await?.0))
    }

    async fn list_roles(&self, request: Request<ListRolesRequest>) -> Result<Response<ListRolesReply>, Status> {
        self.caller(&request)?;
        Ok(Response::new(ListRolesReply { roles: self.with_state(|s| s.roles.iter().map(convert::role_to_pb).collect()) }))
    }

    async fn get_defaults(&self, request: Request<GetDefaultsRequest>) -> Result<Response<Defaults>, Status> {
        self.caller(&request)?;
        Ok(Response::new(self.with_state(|s| convert::defaults_to_pb(&s.defaults))))
    }

    async fn set_defaults(&self, request: Request<SetDefaultsRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let defaults = convert::defaults_from_pb(r.defaults.ok_or_else(|| invalid("defaults: required".into()))?).map_err(invalid)?;
        Ok(Response::new(self.write(caller, Op::SetDefaults(defaults), r.options).await?.0))
    }

    async fn get_providers(&self, request: Request<GetProvidersRequest>) -> Result<Response<ProvidersDocument>, Status> {
        self.caller(&request)?;
        let json = self.with_state(|s| serde_json::to_string(&s.providers.redacted())).map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ProvidersDocument { json }))
    }

    async fn set_providers(&self, request: Request<SetProvidersRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let json = r.providers.ok_or_else(|| invalid("providers: required".into()))?.json;
        let providers: crate::auth::state::Providers = serde_json::from_str(&json).map_err(|e| invalid(format!("providers: {e}")))?;
        let providers = providers.keeping_secrets_of(&self.with_state(|s| s.providers.clone())).map_err(invalid)?;
        // Refused here without a Raft round; checked again at apply.
        crate::auth::index::compile_providers(&providers).map_err(invalid)?;
        Ok(Response::new(self.write(caller, Op::SetProviders(providers), r.options).await?.0))
    }

    async fn get_client_types(&self, request: Request<GetClientTypesRequest>) -> Result<Response<ClientTypes>, Status> {
        self.caller(&request)?;
        Ok(Response::new(self.with_state(|s| convert::client_types_to_pb(&s.client_types))))
    }

    async fn set_client_types(&self, request: Request<SetClientTypesRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let types =
            convert::client_types_from_pb(r.client_types.ok_or_else(|| invalid("client_types: required".into()))?).map_err(invalid)?;
        Ok(Response::new(self.write(caller, Op::SetClientTypes(types), r.options).await?.0))
    }

    async fn revoke_certificates(&self, request: Request<RevokeCertificatesRequest>) -> Result<Response<RevokeReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let revocations = requested_revocations(&r)?;
        let (write, resp) = self.write(caller, Op::Revoke(revocations), r.options).await?;
        Ok(Response::new(RevokeReply { write: Some(write), revocation_ids: resp.revocation_ids }))
    }

    async fn import_crl(&self, request: Request<ImportCrlRequest>) -> Result<Response<RevokeReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        let (issuer, revocations) = self.crl_revocations(&r.crl)?;
        let (write, resp) = self.write(caller, Op::ImportCrl { issuer, revocations }, r.options).await?;
        Ok(Response::new(RevokeReply { write: Some(write), revocation_ids: resp.revocation_ids }))
    }

    async fn list_revocations(&self, request: Request<ListRevocationsRequest>) -> Result<Response<ListRevocationsReply>, Status> {
        self.caller(&request)?;
        let r = request.into_inner();
        let page_size = if r.page_size == 0 { 100 } else { (r.page_size as usize).min(1000) };
        let reply = self.with_state(|state| {
            let mut matching: Vec<_> =
                state.revocations.iter().filter(|rev| r.issuer.as_ref().is_none_or(|i| rev.issuer.as_ref() == Some(i))).collect();
            matching.sort_by_key(|rev| rev.id);
            let total = matching.len() as u64;
            let page: Vec<_> = matching.into_iter().filter(|rev| rev.id > r.page_after_id).take(page_size + 1).collect();
            let next = if page.len() > page_size { page[page_size - 1].id } else { 0 };
            ListRevocationsReply {
                revocations: page.iter().take(page_size).map(|rev| convert::revocation_to_pb(rev)).collect(),
                next_page_after_id: next,
                total,
            }
        });
        Ok(Response::new(reply))
    }

    async fn unrevoke(&self, request: Request<UnrevokeRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        if r.revocation_ids.is_empty() {
            return Err(invalid("revocation_ids: give at least one".into()));
        }
        Ok(Response::new(self.write(caller, Op::Unrevoke { ids: r.revocation_ids }, r.options).await?.0))
    }

    async fn list_sessions(&self, request: Request<ListSessionsRequest>) -> Result<Response<ListSessionsReply>, Status> {
        self.caller(&request)?;
        let r = request.into_inner();
        let local = || local_sessions(self.cluster.id, &self.clients, &r);
        let (answers, unreachable_nodes) = self
            .ask_members(r.node_id, local, |mut node| {
                let r = r.clone();
                async move { node.sessions(r).await }
            })
            .await;
        let mut sessions: Vec<_> = answers.into_iter().flat_map(|a| a.sessions).collect();
        sessions.sort_by(|a, b| (&a.client_id, a.node_id).cmp(&(&b.client_id, b.node_id)));
        if r.limit > 0 {
            sessions.truncate(r.limit as usize);
        }
        Ok(Response::new(ListSessionsReply { sessions, unreachable_nodes }))
    }

    async fn kick_client(&self, request: Request<KickClientRequest>) -> Result<Response<KickClientReply>, Status> {
        self.caller(&request)?;
        let r = request.into_inner();
        if r.client_id.is_empty() {
            return Err(invalid("client_id: required".into()));
        }
        let local = || local_kick(self.cluster.id, &self.clients, &r);
        let (answers, unreachable_nodes) = self
            .ask_members(0, local, |mut node| {
                let r = r.clone();
                async move { node.kick(r).await }
            })
            .await;
        Ok(Response::new(KickClientReply { kicked_on: answers.into_iter().flat_map(|a| a.kicked_on).collect(), unreachable_nodes }))
    }

    async fn check_access(&self, request: Request<CheckAccessRequest>) -> Result<Response<CheckAccessReply>, Status> {
        self.caller(&request)?;
        let r = request.into_inner();
        let typed = !r.identity.is_empty() || !r.issuer.is_empty() || !r.serial.is_empty() || r.password_user;
        if r.anonymous && (typed || !r.token.is_empty() || !r.certificate.is_empty()) {
            return Err(invalid("anonymous: give no identity, issuer, serial, password_user, token or certificate with it".into()));
        }
        if !r.certificate.is_empty() && (typed || !r.token.is_empty()) {
            return Err(invalid("certificate: give no identity, issuer, serial, password_user or token with it".into()));
        }
        if !r.anonymous && r.certificate.is_empty() && r.identity.is_empty() && r.token.is_empty() {
            return Err(invalid("identity: required (or a token, a certificate, or anonymous)".into()));
        }
        let action = Action::try_from(r.action).unwrap_or(Action::Unspecified);
        if action == Action::Unspecified {
            return Err(invalid("action: must be CONNECT, PUBLISH or SUBSCRIBE".into()));
        }
        if action != Action::Connect && r.topic.is_empty() {
            return Err(invalid("topic: required for PUBLISH and SUBSCRIBE".into()));
        }
        let certificate = (!r.certificate.is_empty()).then(|| self.peer_certificate(&r.certificate)).transpose()?;
        let identity = certificate.as_ref().map_or(&r.identity, |c| &c.identity);
        let client_id = if r.client_id.is_empty() { identity.clone() } else { r.client_id.clone() };
        let topic = r.topic.clone();
        let reply = match self.dry_run_connect(r, certificate, client_id).await? {
            Err(refusal) => {
                CheckAccessReply { allowed: false, decided_by: format!("CONNECT refused: {}", refusal.reason), ..Default::default() }
            }
            Ok(grant) => {
                let credential = grant.source.credential().unwrap_or_default().to_string();
                let (allowed, decided_by) = match action {
                    Action::Publish => grant.acl.explain(&topic, AclAction::Publish),
                    Action::Subscribe => grant.acl.explain(&topic, AclAction::Subscribe),
                    _ => (true, "CONNECT allowed".into()),
                };
                let client_type = pb_client_type(grant.client_type);
                CheckAccessReply { allowed, decided_by: format!("{}: {decided_by}", grant.source), credential, client_type }
            }
        };
        Ok(Response::new(reply))
    }

    async fn cluster_status(&self, request: Request<ClusterStatusRequest>) -> Result<Response<ClusterStatusReply>, Status> {
        self.caller(&request)?;
        let progress = self.cluster.progress_of_all(PEER_TIMEOUT).await;
        let here = self.cluster.progress();
        let highest = progress.iter().filter_map(|(_, _, _, p)| p.as_ref().map(|p| p.applied_index)).max().unwrap_or_default();
        let links = self.forwarder.link_gauges();
        let members = progress
            .into_iter()
            .map(|(id, node, voter, reply)| {
                let reply = reply.unwrap_or_default();
                let link = links.iter().find(|l| l.peer == id).cloned().unwrap_or_default();
                ClusterMember {
                    id,
                    raft_addr: node.raft_addr,
                    quic_addr: node.quic_addr,
                    voter,
                    reachable: reply.node_id == id,
                    applied_index: reply.applied_index,
                    lag: highest.saturating_sub(reply.applied_index),
                    term: reply.term,
                    leader_id: reply.leader_id,
                    link_up: link.up,
                    link_queued: link.queued as u64,
                    link_forwarded: link.forwarded,
                    link_dropped: link.dropped,
                    link_routes: link.routes as u64,
                }
            })
            .collect();
        Ok(Response::new(ClusterStatusReply {
            leader_id: here.leader_id,
            term: here.term,
            committed_index: highest,
            answered_by: self.cluster.id,
            members,
        }))
    }

    async fn add_node(&self, request: Request<AddNodeRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let r = request.into_inner();
        if r.id == 0 || r.raft_addr.rsplit_once(':').is_none() {
            return Err(invalid("id and raft_addr (host:port) are required".into()));
        }
        let change = format!("node {} ({}) added as a {}", r.id, r.raft_addr, if r.learner_only { "learner" } else { "voter" });
        let node = crate::cluster::NodeInfo { raft_addr: r.raft_addr, quic_addr: r.quic_addr };
        let committed =
            self.cluster.propose(Proposal::AddNode { id: r.id, node, learner_only: r.learner_only }).await.map_err(propose_status)?;
        Ok(Response::new(self.membership_changed(caller, committed.log_index, change, r.options).await))
    }

    async fn remove_node(&self, request: Request<RemoveNodeRequest>) -> Result<Response<WriteReply>, Status> {
        let caller = self.caller(&request)?;
        let RemoveNodeRequest { id, options } = request.into_inner();
        if !self.cluster.members().iter().any(|(member, _, _)| *member == id) {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        let committed = self.cluster.propose(Proposal::RemoveNode { id }).await.map_err(propose_status)?;
        Ok(Response::new(self.membership_changed(caller, committed.log_index, format!("node {id} removed"), options).await))
    }

    async fn list_audit(&self, request: Request<ListAuditRequest>) -> Result<Response<ListAuditReply>, Status> {
        self.caller(&request)?;
        let r = request.into_inner();
        let limit = if r.limit == 0 { 100 } else { (r.limit as usize).min(10_000) };
        let entries = self.cluster.replica.audit_after(r.after_index, limit).iter().map(convert::audit_to_pb).collect();
        Ok(Response::new(ListAuditReply { entries }))
    }

    type StreamAuditStream = AuditStream;

    async fn stream_audit(&self, request: Request<StreamAuditRequest>) -> Result<Response<AuditStream>, Status> {
        self.caller(&request)?;
        let after = request.into_inner().after_index;
        // Subscribe before reading the backlog, so nothing falls between the two.
        let feed = self.cluster.replica.audit_feed();
        let backlog = self.cluster.replica.audit_after(after, usize::MAX);
        let last = backlog.last().map_or(after, |entry| entry.log_index);
        let backlog = tokio_stream::iter(backlog.into_iter().map(|entry| Ok(convert::audit_to_pb(&entry))));
        let live = tokio_stream::wrappers::BroadcastStream::new(feed).filter_map(move |item| match item {
            Ok(entry) if entry.log_index > last => Some(Ok(convert::audit_to_pb(&entry))),
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                Some(Err(Status::data_loss(format!("the audit stream fell {n} entries behind; list the audit to catch up"))))
            }
        });
        Ok(Response::new(Box::pin(backlog.chain(live))))
    }

    type SaveSnapshotStream = SnapshotStream;

    async fn save_snapshot(&self, request: Request<SaveSnapshotRequest>) -> Result<Response<SnapshotStream>, Status> {
        let caller = self.caller(&request)?;
        let (log_index, state) = self.cluster.replica.export();
        let file = crate::cluster::backup::encode(log_index, self.cluster.id, crate::clock::unix_now(), &state);
        tracing::info!(%caller, log_index, bytes = file.len(), "snapshot saved through the admin API");
        let total_bytes = file.len() as u64;
        let chunks: Vec<Result<SnapshotChunk, Status>> =
            file.chunks(SNAPSHOT_CHUNK).map(|data| Ok(SnapshotChunk { data: data.to_vec(), total_bytes })).collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// How `check-access --certificate` reads an identity: as this node's listeners that ask for
/// client certificates do (`rules`, one per listener), when they agree.
pub fn certificate_identity(rules: impl IntoIterator<Item = IdentityRule>) -> Result<IdentityRule, String> {
    let mut rules = rules.into_iter();
    let first = rules.next().ok_or("certificate: this node has no listener that asks for client certificates")?;
    let reading = |rule: &IdentityRule| (rule.source, rule.pattern.as_ref().map(|p| p.as_str().to_string()));
    if rules.any(|rule| reading(&rule) != reading(&first)) {
        return Err("certificate: this node's listeners read identities differently; give identity, issuer and serial instead".into());
    }
    Ok(first)
}

/// The blocking part of [`AdminService::dry_run_connect`].
fn dry_run_connect(
    auth: &AuthStore,
    policy: AuthPolicy,
    runtime: &tokio::runtime::Handle,
    r: &CheckAccessRequest,
    certificate: Option<PeerCertificate>,
    client_id: String,
) -> Result<Result<Grant, Refusal>, Status> {
    let mut connect = mqttbytes::v5::Connect::new(client_id);
    let token = Some(r.token.clone()).filter(|t| !t.is_empty());
    let peer = if r.password_user || token.is_some() {
        connect.set_login(&r.identity, &token.clone().unwrap_or_default());
        PeerAuth::Anonymous
    } else if r.anonymous {
        PeerAuth::Anonymous
    } else if let Some(certificate) = certificate {
        PeerAuth::Certificate(certificate)
    } else {
        let serial = if r.serial.is_empty() {
            String::new()
        } else {
            crate::auth::serial::normalize_serial(&r.serial).map_err(|e| invalid(format!("serial: {e}")))?
        };
        let now = crate::clock::unix_now();
        PeerAuth::Certificate(PeerCertificate {
            identity: r.identity.clone(),
            serial,
            issuer: r.issuer.clone(),
            not_before: now,
            not_after: now,
        })
    };
    let limits = crate::mqtt::connect::SessionLimits::default();
    let index = auth.current();
    let decision =
        crate::mqtt::connect::validate(ProtocolVersion::V5, connect, &limits, || "check-access".into()).and_then(|mut request| {
            let password = request.password.clone();
            let presented = Presented {
                password: password.as_deref().filter(|_| !r.password_user),
                now: crate::clock::unix_now(),
                password_check: PasswordCheck::Assume(r.password_user),
                listener: "check-access",
                peer: None,
                http: auth.http().map(|delegate| (delegate, runtime)),
            };
            let principal = chain::authenticate(&index, &peer, request.claimed_identity(), &policy, presented)?;
            auth.authorize(&principal, &request.client_id)
        });
    Ok(decision)
}

fn pb_client_type(t: crate::auth::state::ClientType) -> i32 {
    ClientType::from(t) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::identity::IdentitySource;

    #[test]
    fn a_certificate_is_read_as_the_listeners_read_it_when_they_agree() {
        let rule = |source, pattern| IdentityRule::new(source, pattern).unwrap();
        let cn = certificate_identity([rule(IdentitySource::Cn, None), rule(IdentitySource::Cn, None)]).unwrap();
        assert_eq!((cn.source, cn.pattern.is_none()), (IdentitySource::Cn, true));
        let none = certificate_identity([]).unwrap_err();
        assert!(none.contains("no listener that asks for client certificates"), "{none}");
        let differ = [rule(IdentitySource::Cn, None), rule(IdentitySource::SanUri, Some("^spiffe://f/(?P<id>.+)$"))];
        assert!(certificate_identity(differ).unwrap_err().contains("read identities differently"));
    }
}
