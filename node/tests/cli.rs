//! The `rampart` command itself: configuration errors, development mode, health endpoints and a
//! clean shutdown on SIGTERM.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Broker, Raw};
use mqttbytes::v5::DisconnectReasonCode;
use rampart_node::mqtt::codec::{Packet, ProtocolVersion};

/// The variables README.md and docs/cluster.md tell an operator to export for `rampart admin`
/// and `rampart pki`; a shell set up that way must still start a node.
const README_ENVIRONMENT: [(&str, &str); 5] = [
    ("RAMPART_ADMIN_ENDPOINT", "https://localhost:9443"),
    ("RAMPART_ADMIN_CA", "rampart-dev/ca.pem"),
    ("RAMPART_ADMIN_CERT", "rampart-dev/admins/admin.pem"),
    ("RAMPART_ADMIN_KEY", "rampart-dev/admins/admin.key"),
    ("RAMPART_PKI_DIR", "rampart-pki"),
];

#[test]
fn bad_configuration_names_the_file_and_key_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[limits]\nmax_conections = 5\n", "limits.max_conections"),
        ("[limits]\nmax_packet_size = \"big\"\n", "limits.max_packet_size"),
        ("[limits]\npassword_checks_concurrent = 0\n", "limits.password_checks_concurrent"),
        ("[listeners.tls]\ncert_file = \"nope.pem\"\nkey_file = \"nope.key\"\n", "listeners.tls.cert_file"),
        ("[listeners\n", "(syntax)"),
    ];
    for (text, key) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).unwrap();
        let out = common::rampart().args(["serve", "--config"]).arg(&path).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(&path.display().to_string()) && stderr.contains(key), "{key}: {stderr}");
    }
    let out = common::rampart().arg("serve").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--dev"));
}

/// Issue 28: `serve --check-config` reports every problem of a config at once, each naming the
/// file and key, and exits 2; a good config gets one OK line and exit 0. Nothing is started.
#[test]
fn check_config_reports_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    let text = "[limits]\nmax_conections = 5\nmax_packet_size = \"big\"\npassword_checks_concurrent = 0\n\
                [listeners.tls]\ncert_file = \"nope.pem\"\nkey_file = \"nope.key\"\n";
    std::fs::write(&path, text).unwrap();
    let out = common::rampart().args(["serve", "--check-config", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = path.display().to_string();
    let keys = [
        "limits.max_conections: unknown field",
        "limits.max_packet_size: invalid type",
        "limits.password_checks_concurrent: must be at least 1",
        "listeners.tls.cert_file: ",
        "listeners.tls.key_file: ",
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), keys.len(), "{stderr}");
    for (line, key) in lines.iter().zip(keys) {
        assert!(line.starts_with(&format!("rampart: {file}: {key}")), "{key}: {stderr}");
    }
    assert!(out.stdout.is_empty());

    std::fs::write(&path, "[listeners.tcp]\nbind = \"127.0.0.1:0\"\n[http]\nenabled = false\n").unwrap();
    let out = common::rampart().args(["serve", "--check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{file}: OK (tcp on 127.0.0.1:0; standalone)\n"));
}

#[test]
fn dev_mode_with_the_readme_environment_creates_its_pki_and_prints_how_to_connect() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = common::rampart()
        .args(["serve", "--dev"])
        .current_dir(dir.path())
        .envs(README_ENVIRONMENT)
        .env("RAMPART__LISTENERS__TCP__BIND", "127.0.0.1:0")
        .env("RAMPART__LISTENERS__TLS__BIND", "127.0.0.1:0")
        .env("RAMPART__HTTP__BIND", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut text = String::new();
        let mut buf = [0u8; 1024];
        while !text.contains("Stop with Ctrl-C") {
            match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        text
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !reader.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = reader.join().unwrap();
    assert!(text.contains("mosquitto_pub") && text.contains("--cert") && text.contains("devices/device-1/hello"), "{text}");
    for file in
        ["ca.pem", "ca.key", "servers/localhost.pem", "devices/device-1.pem", "devices/device-2.key", "admins/admin.pem", "auth.toml"]
    {
        assert!(dir.path().join("rampart-dev").join(file).is_file(), "{file} missing");
    }
}

#[test]
fn health_and_metrics_endpoints() {
    let broker = Broker::start(common::Options::default());
    assert!(broker.http_get("/healthz").starts_with("HTTP/1.1 200"));
    assert!(broker.http_get("/readyz").starts_with("HTTP/1.1 200"));
    assert!(broker.http_get("/nope").starts_with("HTTP/1.1 404"));
    let _client = Raw::connect(broker.tcp.unwrap(), ProtocolVersion::V5, "counted");
    assert_eq!(broker.metric("rampart_connections"), 1);
    let text = broker.http_get("/metrics");
    for series in
        ["rampart_messages_received_total{qos=\"1\"}", "rampart_messages_dropped_total{reason=\"queue_full\"}", "rampart_queued_messages"]
    {
        assert!(text.contains(series), "{series} missing");
    }
}

#[test]
fn sigterm_disconnects_mqtt5_clients_with_server_shutting_down() {
    let mut broker = Broker::start(common::Options::default());
    let mut client = Raw::connect(broker.tcp.unwrap(), ProtocolVersion::V5, "until-shutdown");
    let status = Command::new("kill").args(["-TERM", &broker.pid().to_string()]).status().unwrap();
    assert!(status.success());
    match client.recv() {
        Some(Packet::Disconnect(d)) => assert_eq!(d.reason_code, DisconnectReasonCode::ServerShuttingDown),
        other => panic!("expected DISCONNECT 0x8B, got {other:?}"),
    }
    assert!(broker.wait_for_exit(Duration::from_secs(10)).is_some_and(|s| s.success()));
}

#[test]
fn passwd_prints_an_argon2id_hash_or_a_scram_verifier_and_refuses_an_empty_password() {
    use std::io::Write;
    let run_with = |input: &str, args: &[&str]| {
        let mut child =
            common::rampart().arg("passwd").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let run = |input: &str| run_with(input, &[]);
    let out = run("s3cret\n");
    assert!(out.status.success());
    let hash = String::from_utf8(out.stdout).unwrap();
    assert!(hash.trim().starts_with("$argon2id$"), "{hash}");
    assert!(rampart_node::auth::password::verify("s3cret", hash.trim()));
    assert!(!run("\n").status.success());
    // A SCRAM verifier instead: salted keys only, at the iteration count asked for.
    let out = run_with("s3cret\n", &["--scram", "sha-512", "--iterations", "5000"]);
    let verifier = String::from_utf8(out.stdout).unwrap();
    assert!(verifier.starts_with("SCRAM-SHA-512$5000:") && !verifier.contains("s3cret"), "{verifier}");
    assert!(rampart_node::auth::scram::Verifier::parse(verifier.trim()).is_ok());
    let too_few = run_with("s3cret\n", &["--scram", "sha-256", "--iterations", "100"]);
    assert!(!too_few.status.success() && String::from_utf8_lossy(&too_few.stderr).contains("at least 4096"));
}

#[test]
fn a_dev_cluster_whose_nodes_fail_exits_non_zero_with_the_first_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let dev_dir = dir.path().join("rampart-dev");
    std::fs::create_dir_all(&dev_dir).unwrap();
    // Every node reads the same state file at start; a bad one stops them all at once.
    std::fs::write(dev_dir.join("auth.toml"), "[[credentials]]\nnmae = \"typo\"\n").unwrap();
    let child = common::rampart()
        .args(["serve", "--dev", "--cluster", "2"])
        .current_dir(dir.path())
        .envs(README_ENVIRONMENT)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    let deadline = Instant::now() + Duration::from_secs(25);
    while !waiter.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !waiter.is_finished() {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        panic!("serve --dev --cluster 2 still running 25 s after its nodes failed");
    }
    let out = waiter.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("exited") && stderr.contains("auth.toml") && stderr.contains("nmae"), "{stderr}");
}
