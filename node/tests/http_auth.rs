//! The `http` provider against the real binary and a small HTTP endpoint run by the test: allow
//! with rules, deny, garbage, an error status, a slow and a dead endpoint (deny by default, or
//! the next provider), and the decision cache.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Broker, Raw};
use mqttbytes::v5::{self, ConnectReturnCode, PubAckReason};
use mqttbytes::QoS;
use rampart_node::mqtt::codec::Packet;
use rampart_node::mqtt::codec::ProtocolVersion::V5;

/// Requests seen per user name, and the JSON bodies.
type Seen = Arc<Mutex<HashMap<String, Vec<serde_json::Value>>>>;

/// Answers by the user name in the request; stops with the test process.
fn endpoint() -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let record = record.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; length];
                reader.read_exact(&mut body).unwrap();
                let query: serde_json::Value = serde_json::from_slice(&body).unwrap();
                let user = query["username"].as_str().unwrap_or_default().to_string();
                record.lock().unwrap().entry(user.clone()).or_default().push(query);
                let (status, answer) = match user.as_str() {
                    "allow-user" => ("200 OK", r#"{"result": "allow", "rules": [{"access": "write", "pattern": "http/%u/#"}]}"#),
                    "deny-user" => ("200 OK", r#"{"result": "deny", "reason": "account locked"}"#),
                    "error-user" => ("500 Internal Server Error", "oops"),
                    "slow-user" => {
                        std::thread::sleep(Duration::from_secs(3));
                        ("200 OK", r#"{"result": "allow"}"#)
                    }
                    _ => ("200 OK", "<html>not json</html>"),
                };
                let mut stream = stream;
                let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}", answer.len());
            });
        }
    });
    (port, seen)
}

fn start(state: &str) -> (Broker, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("auth.toml");
    std::fs::write(&state_file, state).unwrap();
    let config = format!("[auth]\nstate_file = {state_file:?}\n[auth.http]\nallowed_hosts = [\"127.0.0.1\"]\n");
    (Broker::start_with(&config, 0), dir)
}

fn login(user: &str, password: &str) -> v5::Connect {
    let mut c = v5::Connect::new(format!("{user}-c"));
    c.set_login(user, password);
    c
}

#[test]
fn the_endpoint_decides_and_every_failure_has_a_clear_code() {
    let (port, seen) = endpoint();
    let state = format!(
        "[providers]\norder = [\"http\"]\n[providers.http]\nurl = \"http://127.0.0.1:{port}/mqtt/auth\"\ntimeout_ms = 500\ncache_ttl_secs = 60\n"
    );
    let (broker, _dir) = start(&state);
    let tcp = broker.tcp.unwrap();
    let code = |user: &str| Raw::socket(tcp, V5).connack_with(login(user, "pw"));

    let mut client = Raw::socket(tcp, V5);
    assert_eq!(client.connack_with(login("allow-user", "pw")), ConnectReturnCode::Success);
    let publish = |client: &mut Raw, topic: &str| {
        let mut p = v5::Publish::new(topic, QoS::AtLeastOnce, "x");
        p.pkid = 1;
        client.send_packet(&Packet::Publish(p));
        match client.recv() {
            Some(Packet::PubAck(ack)) => ack.reason,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    };
    assert_eq!(publish(&mut client, "http/allow-user/t"), PubAckReason::Success, "rules from the answer, %u the principal");
    assert_eq!(publish(&mut client, "http/other/t"), PubAckReason::NotAuthorized);
    let query = seen.lock().unwrap()["allow-user"][0].clone();
    assert_eq!(
        (query["client_id"].as_str(), query["password"].as_str(), query["listener"].as_str()),
        (Some("allow-user-c"), Some("pw"), Some("tcp"))
    );

    // The same request again within the TTL is answered from the cache.
    assert_eq!(code("allow-user"), ConnectReturnCode::Success);
    assert_eq!(seen.lock().unwrap()["allow-user"].len(), 1);

    assert_eq!(code("deny-user"), ConnectReturnCode::BadUserNamePassword);
    broker.wait_for_log("http: denied: account locked", Duration::from_secs(5)).expect("the denial is logged");
    for user in ["garbage-user", "error-user"] {
        assert_eq!(code(user), ConnectReturnCode::ServerUnavailable, "{user}");
    }
    broker.wait_for_log("endpoint unavailable: unreadable answer", Duration::from_secs(5)).expect("garbage is logged");
    broker.wait_for_log("endpoint unavailable: status 500", Duration::from_secs(5)).expect("the status is logged");
    let started = Instant::now();
    assert_eq!(code("slow-user"), ConnectReturnCode::ServerUnavailable);
    assert!(started.elapsed() < Duration::from_secs(2), "the timeout bounds the wait");
    broker.wait_for_log("no answer within 500ms", Duration::from_secs(5)).expect("the timeout is logged");
}

#[test]
fn a_dead_endpoint_can_hand_over_to_the_next_provider() {
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let hash = rampart_node::auth::password::hash("s3cret").unwrap();
    let state = format!(
        "[providers]\norder = [\"http\", \"basic\"]\n[providers.http]\nurl = \"http://127.0.0.1:{dead}/auth\"\non_unavailable = \"next\"\n\n\
         [[credentials]]\nname = \"app\"\npassword = {{ username = \"app\", hash = \"{hash}\" }}\n"
    );
    let (broker, _dir) = start(&state);
    let tcp = broker.tcp.unwrap();
    assert_eq!(Raw::socket(tcp, V5).connack_with(login("app", "s3cret")), ConnectReturnCode::Success, "basic decided");
    assert_eq!(Raw::socket(tcp, V5).connack_with(login("app", "wrong")), ConnectReturnCode::BadUserNamePassword);
}
