//! Decides who a connecting client is and what it may do: the one call a connection makes after
//! its CONNECT phase. Runs the provider chain (certificate, password, token, HTTP, in the
//! configured order) or takes the user an AUTH exchange verified, confines the client id, and
//! looks up the grant. Owns the pacing of costly checks: unless a certificate decides first, a
//! CONNECT with a user name or password is checked on a blocking thread behind the password gate
//! (argon2id is slow by design, signatures cost too), and so is any CONNECT while the `http`
//! provider is enabled (its call blocks); an AUTH exchange is paced by the gate's per-source rate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mqttbytes::v5::ConnectReturnCode;

use super::chain::{self, Presented};
use super::index::{AuthIndex, Grant, PasswordCheck};
use super::password_gate::PasswordGate;
use super::policy::{AuthPolicy, ClaimedIdentity, PeerAuth, Principal, Verified};
use super::sasl::{self, Methods, ScramMethods};
use super::store::AuthStore;
use super::Refusal;

/// Where a CONNECT came from.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub peer: SocketAddr,
    /// The listener's name (`tcp`, `tls`, …), for providers that decide by it.
    pub listener: &'static str,
    /// What the TLS handshake established about the client's certificate.
    pub peer_auth: &'a PeerAuth,
}

/// What a CONNECT proves besides its certificate.
#[derive(Debug, Clone, Copy)]
pub enum Proof<'a> {
    /// The CONNECT's password field (a password or a token), if any.
    Password(Option<&'a str>),
    /// The user an AUTH exchange verified.
    Exchanged(&'a str),
}

/// A client let in: who it is and what it may do.
#[derive(Debug)]
pub struct Authenticated {
    pub principal: Principal,
    pub grant: Grant,
}

pub struct Authenticator {
    policy: AuthPolicy,
    store: Arc<AuthStore>,
    password_gate: PasswordGate,
    scram: Arc<ScramMethods>,
    /// The longest a CONNECT waits for a password check slot.
    slot_wait: Duration,
}

impl Authenticator {
    pub fn new(policy: AuthPolicy, store: Arc<AuthStore>, password_gate: PasswordGate, slot_wait: Duration) -> Authenticator {
        let scram = Arc::new(ScramMethods::new(store.clone()));
        Authenticator { policy, store, password_gate, scram, slot_wait }
    }

    /// The server side of the AUTH exchange a CONNECT from `peer` starts with `method`, if the
    /// method is enabled and the source is within its rate.
    pub fn start_exchange(&self, method: &str, peer: SocketAddr) -> Result<Box<dyn sasl::Exchange>, Refusal> {
        let exchange = self.scram.start(method)?;
        self.password_gate
            .admit(peer.ip(), Instant::now())
            .map_err(|e| refusal(ConnectReturnCode::ConnectionRateExceeded, e.to_string()))?;
        Ok(exchange)
    }

    /// The methods a session that authenticated with an AUTH exchange re-authenticates with.
    pub fn reauthentication(&self) -> Arc<dyn Methods> {
        self.scram.clone()
    }

    /// Authenticates and authorizes a validated CONNECT; the policy may rewrite its user name
    /// and an assigned client id in `claim`.
    pub async fn authenticate(
        &self,
        mut claim: ClaimedIdentity<'_>,
        proof: Proof<'_>,
        origin: Origin<'_>,
    ) -> Result<Authenticated, Refusal> {
        let principal = match proof {
            Proof::Exchanged(user) => {
                let principal = Principal {
                    identity: None,
                    username: Some(user.to_string()),
                    certificate: None,
                    verified: Some(Verified::Scram(user.to_string())),
                };
                chain::bind_client_id(principal, &self.policy, &mut claim)?
            }
            Proof::Password(password) => self.run_chain(&mut claim, password, origin).await?,
        };
        let grant = self.store.authorize(&principal, claim.client_id)?;
        Ok(Authenticated { principal, grant })
    }

    async fn run_chain(&self, claim: &mut ClaimedIdentity<'_>, password: Option<&str>, origin: Origin<'_>) -> Result<Principal, Refusal> {
        let index = self.store.current();
        if let Some(principal) = chain::certificate_first(&index, origin.peer_auth, claim.reborrow(), &self.policy) {
            return Ok(principal);
        }
        let costly = chain::is_costly(claim.username.as_deref(), password);
        let from = (origin.peer, origin.listener);
        // The HTTP provider blocks on the network: the chain then runs on a blocking thread too.
        if index.state().is_none() || !(costly || chain::calls_out(&index)) {
            return run(&self.store, &self.policy, &index, claim.reborrow(), password, from, origin.peer_auth);
        }
        let permit = if costly {
            self.password_gate
                .admit(origin.peer.ip(), Instant::now())
                .map_err(|e| refusal(ConnectReturnCode::ConnectionRateExceeded, e.to_string()))?;
            let permit = tokio::time::timeout(self.slot_wait, self.password_gate.permit())
                .await
                .map_err(|_| refusal(ConnectReturnCode::ServerBusy, "no free password check slot".into()))?;
            Some(permit)
        } else {
            None
        };
        let (store, policy, peer_auth) = (self.store.clone(), self.policy, origin.peer_auth.clone());
        let (mut client_id, mut username) = (claim.client_id.clone(), claim.username.clone());
        let (assigned_client_id, password) = (claim.assigned_client_id, password.map(str::to_string));
        // The permit moves into the check, so the slot stays taken until argon2 is done even if
        // this connection goes away first.
        let check = move || {
            let _permit = permit;
            let claim = ClaimedIdentity { client_id: &mut client_id, assigned_client_id, username: &mut username };
            let principal = run(&store, &policy, &index, claim, password.as_deref(), from, &peer_auth);
            (client_id, username, principal)
        };
        let (client_id, username, principal) = tokio::task::spawn_blocking(check)
            .await
            .map_err(|e| refusal(ConnectReturnCode::ServerUnavailable, format!("credential check failed: {e}")))?;
        (*claim.client_id, *claim.username) = (client_id, username);
        principal
    }
}

/// Runs the provider chain on what a CONNECT presented.
fn run(
    store: &AuthStore,
    policy: &AuthPolicy,
    index: &AuthIndex,
    claim: ClaimedIdentity<'_>,
    password: Option<&str>,
    (peer, listener): (SocketAddr, &'static str),
    peer_auth: &PeerAuth,
) -> Result<Principal, Refusal> {
    let runtime = tokio::runtime::Handle::current();
    let presented = Presented {
        password,
        now: crate::clock::unix_now(),
        password_check: PasswordCheck::Verify,
        listener,
        peer: Some(peer.ip()),
        http: store.http().map(|delegate| (delegate, &runtime)),
    };
    chain::authenticate(index, peer_auth, claim, policy, presented)
}

fn refusal(code: ConnectReturnCode, reason: String) -> Refusal {
    Refusal { code, reason }
}
