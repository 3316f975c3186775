//! Challenge-response authentication as MQTT 5 enhanced authentication carries it: the contract
//! between a method's server side ([`Exchange`], one step per client message) and the AUTH
//! packet exchange in `mqtt`, which only carries the messages; and the `scram` provider's
//! methods behind it ([`ScramMethods`]), which look verifiers up in the credentials in force.

use std::sync::Arc;

use mqttbytes::v5::ConnectReturnCode;

use super::index::AuthIndex;
use super::scram::{self, Pending};
use super::state::ProviderKind;
use super::store::AuthStore;
use super::Refusal;

/// What the server answers to one client message.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// The exchange goes on: this challenge goes to the client, which answers it.
    Challenge(Vec<u8>),
    /// The client proved it is `user`; `data` (SCRAM's server-final-message) goes to the client
    /// with the success.
    Verified { user: String, data: Vec<u8> },
}

/// The server side of one exchange.
pub trait Exchange: Send {
    /// Takes the client's next message (the first comes with CONNECT or AUTH 0x19).
    fn step(&mut self, client: &[u8]) -> Result<Step, Refusal>;
}

/// The authentication methods a server answers to.
pub trait Methods: Send + Sync {
    /// A new exchange of `method`; refused with "bad authentication method" when it is not one
    /// of them.
    fn start(&self, method: &str) -> Result<Box<dyn Exchange>, Refusal>;
}

/// SCRAM-SHA-256 and SCRAM-SHA-512 while the `scram` provider is in the provider order.
pub struct ScramMethods {
    store: Arc<AuthStore>,
}

impl ScramMethods {
    pub fn new(store: Arc<AuthStore>) -> ScramMethods {
        ScramMethods { store }
    }
}

impl Methods for ScramMethods {
    fn start(&self, method: &str) -> Result<Box<dyn Exchange>, Refusal> {
        let index = self.store.current();
        let mechanism = scram::Mechanism::from_method(method)
            .filter(|_| index.provider_order().contains(&ProviderKind::Scram))
            .ok_or_else(|| Refusal {
                code: ConnectReturnCode::BadAuthenticationMethod,
                reason: format!("authentication method {method:?} is not enabled"),
            })?;
        Ok(Box::new(ScramExchange::First { mechanism, index }))
    }
}

/// One SCRAM exchange: client-first → server-first, client-final → server-final.
enum ScramExchange {
    First { mechanism: scram::Mechanism, index: Arc<AuthIndex> },
    Final(Box<Pending>),
    Done,
}

impl Exchange for ScramExchange {
    fn step(&mut self, client: &[u8]) -> Result<Step, Refusal> {
        match std::mem::replace(self, ScramExchange::Done) {
            ScramExchange::First { mechanism, index } => {
                let (server_first, pending) = scram::start(mechanism, client, |user| index.scram_verifier(user, mechanism))?;
                *self = ScramExchange::Final(Box::new(pending));
                Ok(Step::Challenge(server_first))
            }
            ScramExchange::Final(pending) => {
                let (user, data) = pending.finish(client)?;
                Ok(Step::Verified { user, data })
            }
            ScramExchange::Done => {
                Err(Refusal { code: ConnectReturnCode::ProtocolError, reason: "SCRAM: the exchange is already over".into() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn methods(order: &str) -> ScramMethods {
        let verifier = scram::Verifier::generate(scram::Mechanism::Sha256, "pencil", 4096).unwrap();
        let text = format!(
            "[providers]\norder = [{order}]\n[[credentials]]\nname = \"app\"\npassword = {{ username = \"user\", scram_sha256 = \"{verifier}\" }}\n"
        );
        let store = AuthStore::replicated();
        store.install(AuthIndex::build(toml::from_str(&text).unwrap()).unwrap());
        ScramMethods::new(Arc::new(store))
    }

    #[test]
    fn a_scram_exchange_verifies_the_user_in_two_steps_and_then_is_over() {
        let mut exchange = methods("\"scram\"").start("SCRAM-SHA-256").unwrap();
        let bare = "n=user,r=clientnonce";
        let Step::Challenge(server_first) = exchange.step(format!("n,,{bare}").as_bytes()).unwrap() else { panic!("a challenge first") };
        let server_first = String::from_utf8(server_first).unwrap();
        let client_final = scram::tests::client_final("pencil", bare, &server_first, scram::Mechanism::Sha256);
        let Step::Verified { user, data } = exchange.step(client_final.as_bytes()).unwrap() else { panic!("verified") };
        assert_eq!(user, "user");
        assert!(data.starts_with(b"v="), "the server-final-message");
        assert_eq!(exchange.step(b"more").unwrap_err().code, ConnectReturnCode::ProtocolError);
    }

    #[test]
    fn methods_answer_only_while_the_scram_provider_is_on() {
        let off = methods("\"basic\"").start("SCRAM-SHA-256").err().unwrap();
        assert_eq!(off.code, ConnectReturnCode::BadAuthenticationMethod);
        let unknown = methods("\"scram\"").start("PLAIN").err().unwrap();
        assert_eq!(unknown.code, ConnectReturnCode::BadAuthenticationMethod);
    }
}
