//! The deployment assets stay true to the broker. `deploy/rampart-production.toml` and the
//! config of the Kubernetes ConfigMap load with the broker's own config loader (a misspelt key or
//! a file the pod does not mount fails here); the manifests in `deploy/k8s/` keep their invariants
//! (three replicas, probes on the config's HTTP port, a PodDisruptionBudget, a volume claim for
//! `node.data_dir`, Service and container ports equal to the config's ports, node ids from pod
//! ordinals); `deploy/systemd/rampart.service` keeps its hardening and starts the installed config;
//! the compose nodes of `deploy/docker-compose.yml` load their configs from their own certificate
//! bundle, without the CA key; the README's `deploy/rampart.toml` checks OK and keeps its data out
//! of the checkout.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use rampart_node::config::{ClientCertificate, Config, ConfigErrors, ListenerKind};
use yaml_rust2::{Yaml, YamlLoader};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(repo_path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// `path` inside `root`: the deployment's absolute paths are recreated under a temporary folder.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// Moves every absolute path of a config value under `root`.
fn rebase(value: &mut toml::Value, root: &Path) {
    match value {
        toml::Value::String(s) if s.starts_with('/') => *s = under(root, s).display().to_string(),
        toml::Value::Array(items) => items.iter_mut().for_each(|v| rebase(v, root)),
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| rebase(v, root)),
        _ => {}
    }
}

/// Loads config text with the broker's loader as a node on host `hostname` with environment
/// `env` would, its absolute paths (in the text and in `RAMPART__` variables) moved under `root`.
fn load_under(text: &str, root: &Path, env: &[(String, String)], hostname: &str) -> Result<Config, ConfigErrors> {
    let mut config: toml::Table = text.parse().expect("the config is TOML");
    config.iter_mut().for_each(|(_, v)| rebase(v, root));
    let env = env.iter().map(|(k, v)| (k.clone(), if v.starts_with('/') { under(root, v).display().to_string() } else { v.clone() }));
    let hostname = hostname.to_string();
    Config::parse_with_env_and_hostname(&config.to_string(), "deploy config", root, env, move || Ok(hostname))
}

fn create_file(path: &Path, content: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

fn port_of(addr: std::net::SocketAddr) -> i64 {
    i64::from(addr.port())
}

// ---------------------------------------------------------------- Kubernetes

/// The documents of every manifest `deploy/k8s/kustomization.yaml` lists, which must be every
/// other YAML file of the folder.
fn k8s_documents() -> Vec<Yaml> {
    let kustomization = &YamlLoader::load_from_str(&read("deploy/k8s/kustomization.yaml")).unwrap()[0];
    let listed: BTreeSet<String> =
        kustomization["resources"].as_vec().expect("resources").iter().map(|r| r.as_str().unwrap().to_string()).collect();
    let present: BTreeSet<String> = std::fs::read_dir(repo_path("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") && name != "kustomization.yaml")
        .collect();
    assert_eq!(listed, present, "kustomization.yaml must list every manifest of deploy/k8s");
    listed
        .iter()
        .flat_map(|file| YamlLoader::load_from_str(&read(&format!("deploy/k8s/{file}"))).unwrap_or_else(|e| panic!("{file}: {e}")))
        .collect()
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> Vec<&'a Yaml> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn named<'a>(items: &'a Yaml, name: &str) -> &'a Yaml {
    items.as_vec().into_iter().flatten().find(|i| i["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("no entry named {name}"))
}

/// `$(VAR)` references replaced from the container's `env` values (the downward API ones by `pod`).
fn expand(text: &str, pod: &str) -> String {
    text.replace("$(POD_NAME)", pod)
}

/// The files and folders a pod's container sees: each volume mount of the StatefulSet, with the
/// keys its volume declares (ConfigMap content from the ConfigMap document; Secret keys as empty
/// files). Returns the mounts' paths by volume name too.
fn mount_pod_files(sts: &Yaml, config_maps: &[&Yaml], pod: &str, root: &Path) -> HashMap<String, Vec<String>> {
    let spec = &sts["spec"]["template"]["spec"];
    let container = &spec["containers"][0];
    let claims: Vec<&str> =
        sts["spec"]["volumeClaimTemplates"].as_vec().unwrap().iter().map(|c| c["metadata"]["name"].as_str().unwrap()).collect();
    let mut mounts: HashMap<String, Vec<String>> = HashMap::new();
    for mount in container["volumeMounts"].as_vec().expect("volumeMounts") {
        let name = mount["name"].as_str().unwrap();
        let path = mount["mountPath"].as_str().unwrap();
        mounts.entry(name.to_string()).or_default().push(path.to_string());
        if claims.contains(&name) {
            std::fs::create_dir_all(under(root, path)).unwrap();
            continue;
        }
        let volume = named(&spec["volumes"], name);
        if let Some(sub_path) = mount["subPathExpr"].as_str().or(mount["subPath"].as_str()) {
            assert!(volume["secret"].is_hash(), "volume {name}: only Secret keys are mounted by sub path");
            assert!(expand(sub_path, pod).contains(pod), "volume {name}: the sub path must select this pod's own key");
            create_file(&under(root, path), "");
            continue;
        }
        let (source, items) = if volume["configMap"].is_hash() {
            let cm_name = volume["configMap"]["name"].as_str().unwrap();
            let cm = config_maps.iter().find(|c| c["metadata"]["name"].as_str() == Some(cm_name)).expect("the ConfigMap is a manifest");
            (Some(&cm["data"]), &volume["configMap"]["items"])
        } else {
            (None, &volume["secret"]["items"])
        };
        let items = items.as_vec().unwrap_or_else(|| panic!("volume {name}: list its keys as items"));
        for item in items {
            let key = item["key"].as_str().unwrap();
            let content = source.map(|data| data[key].as_str().unwrap_or_else(|| panic!("ConfigMap has no key {key}")).to_string());
            create_file(&under(root, &format!("{path}/{}", item["path"].as_str().unwrap())), &content.unwrap_or_default());
        }
    }
    mounts
}

/// A container port by name or number: (number, protocol).
fn container_port(container: &Yaml, port: &Yaml) -> (i64, String) {
    let found = container["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| {
            (port.as_str().is_some() && p["name"].as_str() == port.as_str())
                || (port.as_i64().is_some() && p["containerPort"].as_i64() == port.as_i64())
        })
        .unwrap_or_else(|| panic!("no container port {port:?}"));
    (found["containerPort"].as_i64().unwrap(), found["protocol"].as_str().unwrap_or("TCP").to_string())
}

fn assert_selects(selector: &Yaml, labels: &Yaml, what: &str) {
    let selector = selector.as_hash().unwrap_or_else(|| panic!("{what}: no selector"));
    assert!(!selector.is_empty(), "{what}: empty selector");
    for (key, value) in selector {
        assert_eq!(&labels[key.as_str().unwrap()], value, "{what}: selector {key:?} does not match the pod labels");
    }
}

#[test]
fn kubernetes_manifests_match_the_config_they_ship() {
    let docs = k8s_documents();
    let [sts] = of_kind(&docs, "StatefulSet")[..] else { panic!("one StatefulSet") };
    let config_maps = of_kind(&docs, "ConfigMap");
    let services = of_kind(&docs, "Service");
    let [pdb] = of_kind(&docs, "PodDisruptionBudget")[..] else { panic!("one PodDisruptionBudget") };
    let sts_name = sts["metadata"]["name"].as_str().unwrap();
    let replicas = sts["spec"]["replicas"].as_i64().unwrap();
    assert_eq!(replicas, 3);
    assert_eq!(sts["spec"]["podManagementPolicy"].as_str(), Some("Parallel"), "members must start together to form the cluster");
    let pod = &sts["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert_selects(&sts["spec"]["selector"]["matchLabels"], labels, "StatefulSet");
    let [container] = &pod["spec"]["containers"].as_vec().unwrap()[..] else { panic!("one container") };

    // The image has no shell: the broker itself is started, with the mounted config.
    assert!(container["command"].is_badvalue(), "keep the image's entrypoint (rampart); it has no shell");
    let args: Vec<&str> = container["args"].as_vec().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let [_, _, config_path] = args[..] else { panic!("args: serve --config FILE") };
    assert_eq!(args[..2], ["serve", "--config"]);

    let env: Vec<(String, String)> = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    let mut configs = Vec::new();
    let mut node_cert_paths = BTreeSet::new();
    for ordinal in 0..replicas {
        let pod_name = format!("{sts_name}-{ordinal}");
        let root = tempfile::tempdir().unwrap();
        let mounts = mount_pod_files(sts, &config_maps, &pod_name, root.path());
        let text = std::fs::read_to_string(under(root.path(), config_path)).expect("args name a file the ConfigMap mounts");
        let env: Vec<_> = env.iter().map(|(k, v)| (k.clone(), expand(v, &pod_name))).collect();
        let config = load_under(&text, root.path(), &env, &pod_name).unwrap_or_else(|e| panic!("{pod_name}: {e}"));
        let cluster = config.cluster.as_ref().expect("[cluster]");
        assert_eq!(cluster.node_id, ordinal as u64 + 1, "{pod_name} is node {}", ordinal + 1);
        // node.data_dir is on the pod's persistent volume.
        let claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"].as_str().expect("a volumeClaimTemplate");
        assert_eq!(config.node.data_dir, under(root.path(), &mounts[claim][0]), "node.data_dir must be the claim's mount");
        for mount in &pod["spec"]["containers"][0]["volumeMounts"].as_vec().unwrap()[..] {
            if let Some(sub_path) = mount["subPathExpr"].as_str() {
                node_cert_paths.insert(expand(sub_path, &pod_name));
            }
        }
        configs.push(config);
    }
    assert_eq!(node_cert_paths.len() as i64, 2 * replicas, "every pod mounts its own node certificate and key");
    let config = &configs[0];

    // TLS only, client certificates required.
    let kinds: Vec<ListenerKind> = config.listener_specs().iter().map(|s| s.kind).collect();
    assert_eq!(kinds, [ListenerKind::Tls], "MQTT over mutual TLS only");
    assert_eq!(config.listeners.tls.as_ref().unwrap().client_certificate, ClientCertificate::Required);
    assert!(!config.http.bind.ip().is_loopback(), "the kubelet probes the pod IP");

    let tls_port = port_of(config.listener_specs()[0].bind);
    let admin_port = port_of(config.admin.as_ref().expect("[admin]").bind);
    let http_port = port_of(config.http.bind);
    let cluster = config.cluster.as_ref().unwrap();
    let (raft_port, quic_port) = (port_of(cluster.bind), port_of(cluster.quic_bind));
    let declared: BTreeSet<(i64, String)> =
        container["ports"].as_vec().unwrap().iter().map(|p| container_port(container, &p["name"])).collect();
    let wanted: BTreeSet<(i64, String)> =
        [(tls_port, "TCP"), (admin_port, "TCP"), (http_port, "TCP"), (raft_port, "TCP"), (quic_port, "UDP")]
            .into_iter()
            .map(|(p, proto)| (p, proto.to_string()))
            .collect();
    assert_eq!(declared, wanted, "container ports must be the config's ports");

    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe}");
        assert_eq!(container_port(container, &get["port"]).0, http_port, "{probe} must use http.bind's port");
    }

    // Services: a headless one for the members' names, a client one for MQTT, admin and metrics.
    let service =
        |name: &str| *services.iter().find(|s| s["metadata"]["name"].as_str() == Some(name)).unwrap_or_else(|| panic!("Service {name}"));
    let headless_name = sts["spec"]["serviceName"].as_str().unwrap();
    let headless = service(headless_name);
    assert_eq!(headless["spec"]["clusterIP"].as_str(), Some("None"));
    assert_eq!(headless["spec"]["publishNotReadyAddresses"].as_bool(), Some(true), "members must resolve before they are ready");
    let service_ports = |svc: &Yaml| -> BTreeSet<(i64, String)> {
        assert_selects(&svc["spec"]["selector"], labels, "Service");
        svc["spec"]["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .map(|p| {
                let protocol = p["protocol"].as_str().unwrap_or("TCP").to_string();
                let target = container_port(container, &p["targetPort"]);
                assert_eq!(
                    target,
                    (p["port"].as_i64().unwrap(), protocol.clone()),
                    "Service port {:?} must reach the same container port",
                    p["name"]
                );
                target
            })
            .collect()
    };
    let tcp = |p: i64| (p, "TCP".to_string());
    assert_eq!(service_ports(headless), BTreeSet::from([tcp(raft_port), (quic_port, "UDP".to_string())]));
    let client = services.iter().find(|s| s["metadata"]["name"].as_str() != Some(headless_name)).expect("a client Service");
    assert_eq!(service_ports(client), BTreeSet::from([tcp(tls_port), tcp(admin_port), tcp(http_port)]));

    // Members: pod N of the headless Service is node N + 1, on the config's ports.
    assert_eq!(cluster.members.len() as i64, replicas);
    for (ordinal, member) in cluster.members.iter().enumerate() {
        let host = format!("{sts_name}-{ordinal}.{headless_name}");
        assert_eq!(member.id, ordinal as u64 + 1);
        assert_eq!(member.raft_addr, format!("{host}:{raft_port}"));
        assert_eq!(member.quic_addr, format!("{host}:{quic_port}"));
    }

    assert_eq!(pdb["spec"]["maxUnavailable"].as_i64(), Some(1));
    assert_selects(&pdb["spec"]["selector"]["matchLabels"], labels, "PodDisruptionBudget");

    // Non-root, read-only root file system, no privileges; resources bounded.
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"].as_bool(), Some(true));
    assert!(pod["spec"]["securityContext"]["runAsUser"].as_i64().is_some_and(|uid| uid > 0));
    let security = &container["securityContext"];
    assert_eq!(security["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(security["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(security["capabilities"]["drop"][0].as_str(), Some("ALL"));
    for (kind, resource) in [("requests", "cpu"), ("requests", "memory"), ("limits", "memory")] {
        assert!(!container["resources"][kind][resource].is_badvalue(), "resources.{kind}.{resource}");
    }
}

// ---------------------------------------------------------------- systemd

/// A unit file's `Key=value` lines as (section, key) → values, in order.
fn parse_unit(text: &str) -> HashMap<(String, String), Vec<String>> {
    let mut section = String::new();
    let mut keys: HashMap<(String, String), Vec<String>> = HashMap::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with(['#', ';'])) {
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
        } else {
            let (key, value) = line.split_once('=').unwrap_or_else(|| panic!("not Key=value: {line}"));
            keys.entry((section.clone(), key.trim().to_string())).or_default().push(value.trim().to_string());
        }
    }
    keys
}

/// Every path a config names under a `*_file` or `*_files` key.
fn config_files(value: &toml::Value, key: &str, out: &mut Vec<String>) {
    match value {
        toml::Value::String(s) if key.ends_with("_file") || key.ends_with("_files") => out.push(s.clone()),
        toml::Value::Array(items) => items.iter().for_each(|v| config_files(v, key, out)),
        toml::Value::Table(table) => table.iter().for_each(|(k, v)| config_files(v, k, out)),
        _ => {}
    }
}

#[test]
fn systemd_unit_is_hardened_and_runs_the_production_config() {
    let unit = parse_unit(&read("deploy/systemd/rampart.service"));
    let one = |key: &str| -> &str {
        match unit.get(&("Service".to_string(), key.to_string())).map(Vec::as_slice) {
            Some([value]) => value,
            other => panic!("[Service] {key}= must be set once, found {other:?}"),
        }
    };
    for (key, value) in [
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("SystemCallFilter", "@system-service"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"),
        ("StateDirectory", "rampart"),
    ] {
        assert_eq!(one(key), value, "[Service] {key}");
    }
    let user = unit.get(&("Service".into(), "User".into()));
    assert!(user.is_some_and(|u| u[0] != "root") || one("DynamicUser") == "yes", "runs as its own user");
    let families: Vec<&str> = one("RestrictAddressFamilies").split_whitespace().collect();
    assert!(families.contains(&"AF_INET") && families.contains(&"AF_INET6"), "{families:?}");
    assert!(one("LimitNOFILE").parse::<u64>().is_ok_and(|n| n >= 65_536), "LimitNOFILE");
    assert_eq!(unit.get(&("Install".into(), "WantedBy".into())).map(|v| v[0].as_str()), Some("multi-user.target"));

    let exec: Vec<&str> = one("ExecStart").split_whitespace().collect();
    let [binary, "serve", "--config", config_path] = exec[..] else { panic!("ExecStart: BINARY serve --config FILE, got {exec:?}") };
    assert!(binary.starts_with('/'));
    // docs/operations.md installs deploy/rampart-production.toml where ExecStart reads it.
    let install = format!("deploy/rampart-production.toml {config_path}");
    assert!(read("docs/operations.md").contains(&install), "docs/operations.md must install `{install}`");

    let text = read("deploy/rampart-production.toml");
    let mut files = Vec::new();
    config_files(&toml::Value::Table(text.parse().unwrap()), "", &mut files);
    let root = tempfile::tempdir().unwrap();
    for file in &files {
        assert!(file.starts_with("/etc/rampart/"), "{file}: keep the node's files in /etc/rampart (read-only under ProtectSystem=strict)");
        create_file(&under(root.path(), file), "");
    }
    let config = load_under(&text, root.path(), &[], "unused").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.node.data_dir,
        under(root.path(), &format!("/var/lib/{}", one("StateDirectory"))),
        "node.data_dir is the StateDirectory"
    );
    let specs = config.listener_specs();
    assert!(!specs.is_empty() && specs.iter().all(|s| matches!(s.kind, ListenerKind::Tls | ListenerKind::Wss)), "TLS listeners only");
    for listener in [&config.listeners.tls, &config.listeners.wss].into_iter().flatten().filter(|l| l.enabled) {
        assert_eq!(listener.client_certificate, ClientCertificate::Required, "mutual TLS on every listener");
    }
    assert!(config.http.bind.ip().is_loopback(), "metrics and health on loopback only");
    assert!(config.admin.is_some(), "the admin API (always mutual TLS)");
    let cluster = config.cluster.as_ref().expect("[cluster]");
    assert_eq!(cluster.members.len(), 3);
    assert!(cluster.members.iter().any(|m| m.id == cluster.node_id), "the node is one of the members");
}

// ---------------------------------------------------------------- Docker Compose

/// The mounts (`source:target[:ro]`) of one service of `deploy/docker-compose.yml`: target → source.
fn compose_mounts(service: &Yaml) -> HashMap<String, String> {
    let volumes = service["volumes"].as_vec().expect("volumes");
    volumes
        .iter()
        .map(|v| {
            let parts: Vec<&str> = v.as_str().expect("short volume syntax").split(':').collect();
            (parts[1].to_string(), parts[0].to_string())
        })
        .collect()
}

/// Issue 28: no node container mounts the CA key. The `pki` service alone mounts the `pki`
/// volume; each node mounts its own bundle volume at /pki, which `pki ensure --bundles` fills,
/// and its config (`deploy/cluster/nodeN.toml`) loads with only the bundle's files, its
/// `auth.toml` and its data volume.
#[test]
fn compose_nodes_see_their_own_bundle_and_not_the_ca_key() {
    let compose = &YamlLoader::load_from_str(&read("deploy/docker-compose.yml")).unwrap()[0];
    let services = &compose["services"];
    let pki = compose_mounts(&services["pki"]);
    assert_eq!(pki.get("/pki").map(String::as_str), Some("pki"), "the pki service keeps the CA in the pki volume");
    let command: Vec<&str> = services["pki"]["command"].as_vec().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    let after = |flag: &str| command.iter().position(|c| *c == flag).map(|i| command[i + 1]).unwrap_or_else(|| panic!("pki {flag}"));
    let bundles = after("--bundles");
    for (n, node) in after("--nodes").split(',').enumerate() {
        let mounts = compose_mounts(&services[node]);
        assert!(!mounts.values().any(|source| source == "pki"), "{node} must not mount the pki volume (it holds ca.key)");
        let bundle = &mounts["/pki"];
        assert_eq!(pki.get(&format!("{bundles}/{node}")), Some(bundle), "{node}'s /pki is the bundle pki ensure writes for it");
        let config_source = mounts["/etc/rampart/rampart.toml"].trim_start_matches("./");
        let text = read(&format!("deploy/{config_source}"));
        let root = tempfile::tempdir().unwrap();
        for file in ["ca.pem", "node.pem", "node.key", "server.pem", "server.key"] {
            create_file(&under(root.path(), &format!("/pki/{file}")), "");
        }
        create_file(&under(root.path(), "/etc/rampart/auth.toml"), "");
        let config = load_under(&text, root.path(), &[], node).unwrap_or_else(|e| panic!("{node}: {e}"));
        assert_eq!(config.cluster.as_ref().map(|c| c.node_id), Some(n as u64 + 1), "{node}");
        assert_eq!(config.node.data_dir, under(root.path(), "/data"));
        assert!(mounts.contains_key("/data"), "{node}: a volume for node.data_dir");
    }
}

/// Issue 28: the README's example config passes `--check-config` and keeps its data out of the
/// source tree.
#[test]
fn the_example_config_checks_ok_and_writes_nothing_into_the_checkout() {
    let path = repo_path("deploy/rampart.toml");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rampart"))
        .args(["serve", "--check-config", "--config"])
        .arg(&path)
        .env_remove("RAMPART_CONFIG")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": OK ("), "{}", String::from_utf8_lossy(&out.stdout));
    let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let checkout = std::fs::canonicalize(repo_path("")).unwrap();
    assert!(config.node.data_dir.is_absolute() && !config.node.data_dir.starts_with(&checkout), "{}", config.node.data_dir.display());
}
