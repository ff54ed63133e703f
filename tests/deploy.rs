//! The deployment artifacts as a platform reads them: the Kubernetes
//! manifests in deploy/k8s (parsed, and checked for what running replicas
//! needs: probes on the gRPC health service, the store URL from a Secret, a
//! PodDisruptionBudget, resource requests, labels that match) and the
//! Dockerfile. No Docker engine or Kubernetes runs here: the image is not
//! built and nothing is applied.

use std::path::PathBuf;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_fedrec");

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The one document of a manifest.
fn manifest(name: &str) -> Yaml {
    let path = root().join("deploy/k8s").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut docs = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    assert_eq!(docs.len(), 1, "{path:?}: one document");
    docs.remove(0)
}

/// The value at a path of keys (and list indices).
fn at<'a>(doc: &'a Yaml, path: &[&str]) -> &'a Yaml {
    path.iter()
        .fold(doc, |node, key| match key.parse::<usize>() {
            Ok(i) => &node[i],
            Err(_) => &node[*key],
        })
}

fn text<'a>(doc: &'a Yaml, path: &[&str]) -> &'a str {
    at(doc, path)
        .as_str()
        .unwrap_or_else(|| panic!("no string at {path:?} in {doc:?}"))
}

/// A mapping's entries as (key, value) strings.
fn labels(doc: &Yaml) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = doc
        .as_hash()
        .expect("a mapping of labels")
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().unwrap().to_owned(),
                v.as_str().unwrap().to_owned(),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

/// The flags `fedrec serve --help` lists.
fn serve_flags() -> Vec<String> {
    let help = Command::new(BIN)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&help.stdout)
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| w.starts_with("--"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_kubernetes_manifests_run_replicas_on_the_store() {
    let deployment = manifest("deployment.yaml");
    assert_eq!(text(&deployment, &["kind"]), "Deployment");
    assert!(at(&deployment, &["spec", "replicas"]).as_i64().unwrap() >= 2);
    let pod = at(&deployment, &["spec", "template"]);
    let pod_labels = labels(at(pod, &["metadata", "labels"]));
    assert_eq!(
        labels(at(&deployment, &["spec", "selector", "matchLabels"])),
        pod_labels
    );
    let containers = at(pod, &["spec", "containers"]).as_vec().unwrap();
    assert_eq!(containers.len(), 1);
    let c = &containers[0];

    // Probes on the gRPC health service, at the port the coordinator serves.
    let args: Vec<&str> = c["args"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let listen = args[args.iter().position(|a| *a == "--listen").unwrap() + 1];
    let port: i64 = listen.rsplit(':').next().unwrap().parse().unwrap();
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(
            at(c, &[probe, "grpc", "port"]).as_i64(),
            Some(port),
            "{probe}"
        );
    }
    let ports: Vec<i64> = c["ports"]
        .as_vec()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert!(ports.contains(&port), "{ports:?}");

    // The store's URL from the Secret, into FEDREC_STORE (never in args).
    let env = c["env"].as_vec().unwrap();
    let store = env
        .iter()
        .find(|e| e["name"].as_str() == Some("FEDREC_STORE"))
        .expect("FEDREC_STORE in the environment");
    let secret = manifest("secret.example.yaml");
    assert_eq!(text(&secret, &["kind"]), "Secret");
    let name = text(store, &["valueFrom", "secretKeyRef", "name"]);
    let key = text(store, &["valueFrom", "secretKeyRef", "key"]);
    assert_eq!(name, text(&secret, &["metadata", "name"]));
    assert!(text(&secret, &["stringData", key]).starts_with("postgres://"));
    assert!(!args.iter().any(|a| a.starts_with("postgres")), "{args:?}");
    // Every variable the args use is in the environment.
    for arg in &args {
        if let Some(var) = arg.split("$(").nth(1).and_then(|v| v.split(')').next()) {
            assert!(
                env.iter().any(|e| e["name"].as_str() == Some(var)),
                "$({var}) in the args"
            );
        }
    }

    // Resource requests, a non-root user.
    for resource in ["cpu", "memory"] {
        assert!(
            !at(c, &["resources", "requests", resource]).is_badvalue(),
            "a {resource} request"
        );
    }
    assert_eq!(
        at(pod, &["spec", "securityContext", "runAsNonRoot"]).as_bool(),
        Some(true)
    );

    // The config the replicas mount is a valid coordinator.toml of a replica.
    let config = manifest("configmap.yaml");
    let volumes = at(pod, &["spec", "volumes"]).as_vec().unwrap();
    assert!(volumes.iter().any(|v| {
        v["configMap"]["name"].as_str() == Some(text(&config, &["metadata", "name"]))
    }));
    let toml = text(&config, &["data", "coordinator.toml"]);
    fedrec_coordinator::CoordinatorConfig::from_toml_str(toml)
        .expect("the ConfigMap's coordinator.toml validates");

    // The PodDisruptionBudget and the Service select the replicas.
    let pdb = manifest("pdb.yaml");
    assert_eq!(text(&pdb, &["kind"]), "PodDisruptionBudget");
    assert_eq!(
        labels(at(&pdb, &["spec", "selector", "matchLabels"])),
        pod_labels
    );
    let replicas = at(&deployment, &["spec", "replicas"]).as_i64().unwrap();
    let unavailable = at(&pdb, &["spec", "maxUnavailable"]).as_i64().unwrap();
    assert!(
        (1..replicas).contains(&unavailable),
        "a budget that lets a node drain and keeps a replica"
    );
    let service = manifest("service.yaml");
    assert_eq!(labels(at(&service, &["spec", "selector"])), pod_labels);
    let grpc = at(&service, &["spec", "ports"])
        .as_vec()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("grpc"))
        .expect("a grpc port");
    assert_eq!(grpc["targetPort"].as_str(), Some("grpc"));

    // The kustomization applies exactly the manifests here (not the Secret).
    let kustomization = manifest("kustomization.yaml");
    for resource in at(&kustomization, &["resources"]).as_vec().unwrap() {
        let file = resource.as_str().unwrap();
        assert!(root().join("deploy/k8s").join(file).exists(), "{file}");
        assert_ne!(file, "secret.example.yaml");
    }

    // Every flag the replicas are started with is one `fedrec serve` takes.
    let flags = serve_flags();
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            flags.iter().any(|f| f == flag),
            "fedrec serve has no {flag}"
        );
    }
}

#[test]
fn the_dockerfile_builds_in_one_stage_and_runs_as_a_user_in_another() {
    let text = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let stages: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(stages.len(), 2, "{stages:?}");
    assert!(stages[0].contains(" AS build"), "{stages:?}");
    let runtime = lines
        .iter()
        .skip_while(|l| **l != *stages[1])
        .collect::<Vec<_>>();
    assert!(
        runtime.iter().any(|l| l.starts_with("COPY --from=build")),
        "the runtime stage takes the binary from the build"
    );
    let user = runtime
        .iter()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER in the runtime stage");
    assert!(
        !user.starts_with('0') && !user.starts_with("root"),
        "{user}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("EXPOSE") && l.contains("50051"))
    );
    // The default command's flags are `fedrec serve`'s.
    let cmd = lines
        .iter()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a default command");
    let cmd: Vec<String> = serde_json::from_str(cmd).expect("CMD in exec form");
    assert_eq!(cmd[0], "serve");
    let flags = serve_flags();
    for flag in cmd.iter().filter(|a| a.starts_with("--")) {
        assert!(flags.contains(flag), "fedrec serve has no {flag}");
    }
    // The build context leaves the build output out.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    assert!(ignore.lines().any(|l| l.trim() == "target/"));
}
