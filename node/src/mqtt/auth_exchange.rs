//! The AUTH packet exchange of MQTT 5 enhanced authentication, free of IO: at CONNECT (driven by
//! the [`Handshake`](super::connect::Handshake)) and for re-authentication during a session
//! (driven by the [`Session`](super::session::Session)). It checks what the packets say —
//! reason, method, sequence — and hands their data to the method's server side
//! ([`sasl::Exchange`]); the method decides who the client is.

use mqttbytes::v5::ConnectReturnCode;

use super::codec::{Auth, AuthReason};
use crate::auth::sasl::{self, Step};
use crate::auth::Refusal;

/// One exchange in progress.
pub struct AuthExchange {
    method: String,
    server: Box<dyn sasl::Exchange>,
}

impl std::fmt::Debug for AuthExchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthExchange").field("method", &self.method).finish_non_exhaustive()
    }
}

/// What the exchange does after a client message.
#[derive(Debug, PartialEq)]
pub enum Exchanged {
    /// Send this AUTH (continue authentication) and wait for the client's answer.
    Continue(Auth),
    /// The client proved it is `user`; `data` goes to it with the success (CONNACK or AUTH 0x00).
    Verified { user: String, data: Vec<u8> },
}

impl AuthExchange {
    /// Starts an exchange of `method` with the client's first data.
    pub fn start(method: &str, server: Box<dyn sasl::Exchange>, first: &[u8]) -> Result<(AuthExchange, Exchanged), Refusal> {
        let mut exchange = AuthExchange { method: method.to_string(), server };
        let step = exchange.step(first)?;
        Ok((exchange, step))
    }

    /// Takes the client's AUTH in the middle of the exchange: continue authentication, with the
    /// exchange's method.
    pub fn on_auth(&mut self, auth: Auth) -> Result<Exchanged, Refusal> {
        if auth.reason != AuthReason::ContinueAuthentication || auth.method.as_deref() != Some(self.method.as_str()) {
            return Err(Refusal {
                code: ConnectReturnCode::ProtocolError,
                reason: format!("expected AUTH (continue authentication) with method {:?}", self.method),
            });
        }
        self.step(&auth.data.unwrap_or_default())
    }

    fn step(&mut self, data: &[u8]) -> Result<Exchanged, Refusal> {
        Ok(match self.server.step(data)? {
            Step::Challenge(challenge) => Exchanged::Continue(auth_packet(AuthReason::ContinueAuthentication, &self.method, challenge)),
            Step::Verified { user, data } => Exchanged::Verified { user, data },
        })
    }
}

/// An AUTH packet of `method` carrying `data`.
pub fn auth_packet(reason: AuthReason, method: &str, data: Vec<u8>) -> Auth {
    Auth { reason, method: Some(method.to_string()), data: Some(data.into()), reason_string: None, user_properties: Vec::new() }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use super::*;

    /// A stand-in method: "user:secret" is challenged with "prove", answered with "secret" and
    /// verified as "user"; anything else is refused.
    pub(crate) struct Knock {
        user: Option<String>,
    }

    impl sasl::Exchange for Knock {
        fn step(&mut self, client: &[u8]) -> Result<Step, Refusal> {
            let refused = || Refusal { code: ConnectReturnCode::BadUserNamePassword, reason: "wrong knock".into() };
            let client = std::str::from_utf8(client).map_err(|_| refused())?;
            match self.user.take() {
                None => {
                    let (user, _) = client.split_once(':').ok_or_else(refused)?;
                    self.user = Some(user.to_string());
                    Ok(Step::Challenge(b"prove".to_vec()))
                }
                Some(user) if client == "secret" => Ok(Step::Verified { user, data: b"welcome".to_vec() }),
                Some(_) => Err(refused()),
            }
        }
    }

    /// The KNOCK method only.
    pub(crate) struct KnockMethods;

    impl sasl::Methods for KnockMethods {
        fn start(&self, method: &str) -> Result<Box<dyn sasl::Exchange>, Refusal> {
            match method {
                "KNOCK" => Ok(Box::new(Knock { user: None })),
                other => Err(Refusal { code: ConnectReturnCode::BadAuthenticationMethod, reason: format!("{other:?} is not enabled") }),
            }
        }
    }

    pub(crate) fn knock_methods() -> Arc<dyn sasl::Methods> {
        Arc::new(KnockMethods)
    }

    fn auth(reason: AuthReason, method: &str, data: &str) -> Auth {
        auth_packet(reason, method, data.as_bytes().to_vec())
    }

    #[test]
    fn an_exchange_challenges_then_verifies() {
        let server = KnockMethods.start_boxed("KNOCK");
        let (mut exchange, first) = AuthExchange::start("KNOCK", server, b"dev:1").unwrap();
        assert_eq!(first, Exchanged::Continue(auth(AuthReason::ContinueAuthentication, "KNOCK", "prove")));
        let done = exchange.on_auth(auth(AuthReason::ContinueAuthentication, "KNOCK", "secret")).unwrap();
        assert_eq!(done, Exchanged::Verified { user: "dev".into(), data: b"welcome".to_vec() });
    }

    #[test]
    fn another_method_or_reason_mid_exchange_is_a_protocol_error_and_a_wrong_answer_is_refused() {
        let start = || AuthExchange::start("KNOCK", KnockMethods.start_boxed("KNOCK"), b"dev:1").unwrap().0;
        let other_method = start().on_auth(auth(AuthReason::ContinueAuthentication, "SCRAM-SHA-256", "secret")).unwrap_err();
        assert_eq!(other_method.code, ConnectReturnCode::ProtocolError);
        let restart = start().on_auth(auth(AuthReason::ReAuthenticate, "KNOCK", "secret")).unwrap_err();
        assert_eq!(restart.code, ConnectReturnCode::ProtocolError);
        let wrong = start().on_auth(auth(AuthReason::ContinueAuthentication, "KNOCK", "guess")).unwrap_err();
        assert_eq!(wrong.code, ConnectReturnCode::BadUserNamePassword);
    }

    impl KnockMethods {
        fn start_boxed(&self, method: &str) -> Box<dyn sasl::Exchange> {
            sasl::Methods::start(self, method).unwrap()
        }
    }
}
