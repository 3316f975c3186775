//! `rampart pki` end to end: the certificates it writes verify with `openssl verify`, a revoked
//! one fails against the CRL it writes, the CA is never overwritten, keys are private.

mod common;

use std::path::Path;
use std::process::{Command, Output};

fn pki(dir: &Path, args: &[&str]) -> Output {
    common::rampart().arg("pki").arg("--dir").arg(dir).args(args).output().expect("run rampart pki")
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn openssl_verify(dir: &Path, cert: &str, crl: bool) -> bool {
    let mut command = Command::new("openssl");
    command.arg("verify").arg("-CAfile").arg(dir.join("ca.pem"));
    if crl {
        command.arg("-crl_check").arg("-CRLfile").arg(dir.join("crl.pem"));
    }
    command.arg(dir.join(cert)).output().expect("openssl is installed (bash scripts/test installs it)").status.success()
}

#[test]
fn issued_certificates_verify_with_openssl_and_revocation_reaches_the_crl() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let out = ok(pki(&dir, &["init-ca", "--name", "Test Fleet CA"]));
    assert!(out.contains("SHA-256") && out.contains("expires"), "{out}");
    let again = pki(&dir, &["init-ca"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to overwrite"));

    ok(pki(&dir, &["issue-server", "--name", "broker", "--san", "localhost", "--san", "127.0.0.1"]));
    ok(pki(&dir, &["issue-node", "--id", "node-1"]));
    ok(pki(&dir, &["issue-admin", "--name", "alice"]));
    ok(pki(&dir, &["issue-device", "plc-7"]));
    for cert in ["servers/broker.pem", "nodes/node-1.pem", "admins/alice.pem", "devices/plc-7.pem"] {
        assert!(openssl_verify(&dir, cert, false), "{cert} does not verify");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for key in ["ca.key", "devices/plc-7.key"] {
            assert_eq!(std::fs::metadata(dir.join(key)).unwrap().permissions().mode() & 0o777, 0o600, "{key}");
        }
    }

    let rotated = pki(&dir, &["issue-device", "plc-7"]);
    assert!(String::from_utf8_lossy(&rotated.stderr).contains("replaces an earlier certificate"));

    let out = ok(pki(&dir, &["revoke", dir.join("devices/plc-7.pem").to_str().unwrap(), "--reason", "keyCompromise"]));
    assert!(out.contains("revoked serial"), "{out}");
    ok(pki(&dir, &["crl"]));
    assert!(!openssl_verify(&dir, "devices/plc-7.pem", true), "revoked certificate still verifies against the CRL");
    assert!(openssl_verify(&dir, "admins/alice.pem", true));

    let bad = pki(&dir, &["issue-device", "plant/+/#"]);
    assert!(!bad.status.success(), "an identity with MQTT wildcards must be refused");
    let bad_reason = pki(&dir, &["revoke", dir.join("admins/alice.pem").to_str().unwrap(), "--reason", "bored"]);
    assert!(!bad_reason.status.success());

    let out = ok(pki(&dir, &["ensure", "--devices", "plc-7,plc-8", "--admins", "alice"]));
    assert!(out.contains("kept") && out.contains("plc-8"), "{out}");
}

#[test]
fn a_foreign_certificate_cannot_be_revoked() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    ok(pki(&a, &["init-ca"]));
    ok(pki(&b, &["init-ca"]));
    ok(pki(&b, &["issue-device", "stranger"]));
    let out = pki(&a, &["revoke", b.join("devices/stranger.pem").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not signed by this CA"));
}

#[test]
fn an_rsa_ca_issues_certificates_that_verify() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rsa");
    assert!(!pki(&dir, &["init-ca", "--rsa", "1024"]).status.success(), "weak RSA keys are refused");
    ok(pki(&dir, &["init-ca", "--rsa", "2048"]));
    ok(pki(&dir, &["issue-device", "plc-rsa"]));
    assert!(openssl_verify(&dir, "devices/plc-rsa.pem", false));
    let text = Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(dir.join("ca.pem")).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("rsaEncryption") && text.contains("2048 bit"), "{text}");
}

/// The node id a node certificate is bound to, as `openssl x509 -text` shows it.
fn node_uri_of(dir: &Path, cert: &str) -> Option<String> {
    let out = Command::new("openssl").args(["x509", "-noout", "-ext", "subjectAltName", "-in"]).arg(dir.join(cert)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split(", ").find_map(|name| name.trim().strip_prefix("URI:").map(str::to_string))
}

#[test]
fn node_certificates_are_bound_to_their_node_id() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    ok(pki(&dir, &["init-ca"]));
    ok(pki(&dir, &["issue-node", "--id", "node-3"]));
    assert_eq!(node_uri_of(&dir, "nodes/node-3.pem").as_deref(), Some("urn:rampart:node:3"));
    ok(pki(&dir, &["issue-node", "--id", "rampart-0", "--node-id", "1", "--san", "rampart-0.rampart-headless"]));
    assert_eq!(node_uri_of(&dir, "nodes/rampart-0.pem").as_deref(), Some("urn:rampart:node:1"));
    assert!(openssl_verify(&dir, "nodes/rampart-0.pem", false));
    for (args, error) in [
        (vec!["issue-node", "--id", "gateway"], "give its node id (--node-id N, or NAME=N)"),
        (vec!["issue-node", "--id", "rampart-0"], "give its node id"),
        (vec!["issue-node", "--id", "gw", "--node-id", "0"], "node ids start at 1"),
        (vec!["ensure", "--nodes", "gw=x"], "\"x\" is not a node id"),
    ] {
        let out = pki(&dir, &args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(error), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // `ensure` keeps a node certificate bound to the right id and reissues one bound to another.
    let ensured = ok(pki(&dir, &["ensure", "--nodes", "node-3,rampart-0=2"]));
    assert!(ensured.contains("kept") && ensured.contains("nodes/node-3.pem"), "{ensured}");
    assert!(ensured.contains("issued node certificate") && ensured.contains("nodes/rampart-0.pem"), "{ensured}");
    assert_eq!(node_uri_of(&dir, "nodes/rampart-0.pem").as_deref(), Some("urn:rampart:node:2"));
}

/// Issue 28, 1: `--days 0` wrote a certificate that expired an hour before it was issued. Zero
/// validity is refused, naming the option; a new certificate starts only minutes before now.
#[test]
fn zero_days_of_validity_are_refused_and_new_certificates_start_minutes_ago() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    ok(pki(&dir, &["init-ca"]));
    for args in [&["issue-device", "plc-0", "--days", "0"][..], &["crl", "--days", "0"], &["issue-admin", "--name", "a", "--days", "0"]] {
        let out = pki(&dir, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("--days"), "{args:?}: {stderr}");
    }
    assert!(!dir.join("devices/plc-0.pem").exists(), "nothing was written");
    ok(pki(&dir, &["issue-device", "plc-1", "--days", "1"]));
    let dates = Command::new("openssl")
        .args(["x509", "-noout", "-startdate", "-enddate", "-in"])
        .arg(dir.join("devices/plc-1.pem"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dates.stdout).to_string();
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().to_string();
    let parse = |date: String| {
        let out = Command::new("date").args(["-u", "-d", &date, "+%s"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<i64>().unwrap()
    };
    let (start, end) = (parse(field("notBefore=")), parse(field("notAfter=")));
    assert_eq!(end - start, 86_400 + 300, "{text}");
}

/// Issue 28, the compose cluster: `ensure --bundles DIR` gives each node a folder with its own
/// node key, the server certificate and the CA certificate — never the CA key or another
/// node's key — and the copies verify like the originals.
#[test]
fn node_bundles_hold_only_what_that_node_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, bundles) = (tmp.path().join("pki"), tmp.path().join("bundles"));
    let args = ["ensure", "--server", "localhost", "--nodes", "node1,node2", "--bundles"];
    let out = ok(pki(&dir, &[&args[..], &[bundles.to_str().unwrap()]].concat()));
    assert!(out.contains(&format!("wrote {}", bundles.join("node2").display())), "{out}");
    for node in ["node1", "node2"] {
        let folder = bundles.join(node);
        let mut files: Vec<String> = std::fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        files.sort();
        assert_eq!(files, ["ca.pem", "node.key", "node.pem", "server.key", "server.pem"], "{node}");
        assert_eq!(std::fs::read(folder.join("node.key")).unwrap(), std::fs::read(dir.join(format!("nodes/{node}.key"))).unwrap());
        assert_eq!(std::fs::read(folder.join("server.pem")).unwrap(), std::fs::read(dir.join("servers/localhost.pem")).unwrap());
        for key in ["node.key", "server.key"] {
            let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(folder.join(key)).unwrap().permissions());
            assert_eq!(mode & 0o777, 0o600, "{node}/{key}");
        }
        assert!(openssl_verify(&folder, "node.pem", false) && openssl_verify(&folder, "server.pem", false), "{node}");
    }
}
