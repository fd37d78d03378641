//! The deployment files in `deploy/` against each other and against the binary, without Docker
//! or a cluster: every manifest under `deploy/k8s` parses; the `gpt2 serve` Deployment's probes,
//! drain timing, resources, KV budget and weights volume agree with the flags it passes; the
//! Service, the HPA (with its prometheus-adapter rule) and the KEDA ScaledObject point at it, run
//! one policy, and never sit in one directory; the InferencePool fits its CRD's schema
//! (`deploy/k8s/crds/`), selects the Deployment's pods on the container port, and names an
//! endpoint picker that serves it; the HTTPRoute sends both completion routes to the pool through
//! the Gateway; every metric the autoscalers and the picker read, and every route the HTTPRoute
//! sends, is in the server's source; every flag given to `gpt2 serve` (in the Deployment, the
//! Dockerfile and `deploy/local-cluster.sh` when present) is one `gpt2 serve --help` lists; the
//! Dockerfile is multi-stage, non-root, with a HEALTHCHECK on the port.

mod common;
#[path = "deploy_manifests/schema.rs"]
mod schema;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const K8S: &str = "deploy/k8s";
/// CustomResourceDefinitions copied from upstream: schemas to check against, not manifests of ours.
const CRDS: &str = "deploy/k8s/crds";
const INFERENCE_POOL_CRD: &str = "deploy/k8s/crds/inference.networking.k8s.io_inferencepools.yaml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const LOCAL_CLUSTER: &str = "deploy/local-cluster.sh";
/// The server's source: a metric it exports or a route it serves appears there as a string.
const SERVER_SOURCE: &str = "tools/serve/src";
/// The routes the OpenAI clients and the endpoint picker use.
const COMPLETION_ROUTES: [&str; 2] = ["/v1/completions", "/v1/chat/completions"];

fn repo() -> &'static Path {
    common::repo_root()
}

fn read(rel: &str) -> String {
    fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// One YAML document and the file it came from.
struct Doc {
    file: String,
    yaml: Yaml,
}

impl Doc {
    fn name(&self) -> String {
        text_at(&self.file, &self.yaml, "metadata.name")
    }

    /// The directory of its file: `kubectl apply -f DIR` applies it with its neighbours.
    fn dir(&self) -> &str {
        self.file.rsplit_once('/').map_or("", |(dir, _)| dir)
    }
}

/// The `*.yaml` files under `rel`, recursively, paths relative to the repository, in name order,
/// leaving out `skip`.
fn yaml_files(rel: &str, skip: &str) -> Vec<String> {
    files_under(rel, skip, &[".yaml", ".yml"])
}

/// The files under `rel` whose names end in one of `extensions`, recursively, paths relative to
/// the repository, in name order, leaving out `skip`.
fn files_under(rel: &str, skip: &str, extensions: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    let dir = repo().join(rel);
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display())) {
        let entry = entry.expect("a directory entry");
        let path = format!("{rel}/{}", entry.file_name().to_string_lossy());
        if path == skip {
            continue;
        }
        if entry.file_type().expect("a file type").is_dir() {
            out.extend(files_under(&path, skip, extensions));
        } else if extensions.iter().any(|e| path.ends_with(e)) {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// Every document of every `*.yaml` under `deploy/k8s` but `crds/`; a file that does not parse
/// fails with its name and the parser's message.
fn manifests() -> Vec<Doc> {
    let files = yaml_files(K8S, CRDS);
    assert!(!files.is_empty(), "no *.yaml in {K8S}");
    let mut docs = Vec::new();
    for file in files {
        for yaml in parse(&file) {
            assert!(!yaml["kind"].is_badvalue(), "{file}: a document without `kind`");
            text_at(&file, &yaml, "metadata.name");
            docs.push(Doc {
                file: file.clone(),
                yaml,
            });
        }
    }
    docs
}

/// The documents of one YAML file; an empty document (a trailing `---`) is no object.
fn parse(file: &str) -> Vec<Yaml> {
    let parsed =
        YamlLoader::load_from_str(&read(file)).unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
    parsed.into_iter().filter(|y| !y.is_null()).collect()
}

/// The one document of `kind` in the manifests.
fn one<'a>(docs: &'a [Doc], kind: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.yaml["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want exactly one {kind} in deploy/k8s, found {}",
        found.len()
    );
    found[0]
}

/// The document of `kind` named `name` in the manifests.
fn named<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| {
            d.yaml["kind"].as_str() == Some(kind) && d.yaml["metadata"]["name"].as_str() == Some(name)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want exactly one {kind} named {name} in {K8S}, found {}",
        found.len()
    );
    found[0]
}

/// The one Deployment whose container runs `gpt2 serve` (the endpoint picker's is another).
fn server_deployment(docs: &[Doc]) -> &Doc {
    let found: Vec<&Doc> = docs
        .iter()
        .filter(|d| d.yaml["kind"].as_str() == Some("Deployment"))
        .filter(|d| {
            let containers = d.yaml["spec"]["template"]["spec"]["containers"].as_vec();
            containers.into_iter().flatten().any(|c| {
                let mut argv = Vec::new();
                for field in ["command", "args"] {
                    argv.extend(c[field].as_vec().into_iter().flatten().filter_map(scalar));
                }
                argv.windows(2).any(|w| w[0].ends_with("gpt2") && w[1] == "serve")
            })
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "want exactly one Deployment running `gpt2 serve` in {K8S}, found {}",
        found.len()
    );
    found[0]
}

/// The files of the server's source that hold `text` as a string literal (empty if none).
fn in_server_source(text: &str) -> Vec<String> {
    let literal = format!("\"{text}\"");
    let mut files = files_under(SERVER_SOURCE, "", &[".rs"]);
    files.retain(|path| read(path).contains(&literal));
    files
}

/// The metric a PromQL selector (`name{label="v",...}`, or inside an expression) reads, and its
/// equality matchers.
fn promql_selector(query: &str) -> (String, Vec<(String, String)>) {
    let open = query.find('{').unwrap_or(query.len());
    let head = &query[..open];
    let start = head
        .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .map_or(0, |i| i + 1);
    let name = head[start..].to_string();
    let mut matchers = Vec::new();
    if let Some(inner) = query[open..]
        .strip_prefix('{')
        .and_then(|rest| rest.split_once('}'))
        .map(|(inner, _)| inner)
    {
        for matcher in inner.split(',').filter(|m| !m.trim().is_empty()) {
            if let Some((key, value)) = matcher.split_once('=') {
                // `!=`, `=~`, `!~` are not equalities.
                if !key.ends_with('!') && !value.starts_with('~') {
                    matchers.push((key.trim().to_string(), value.trim().trim_matches('"').to_string()));
                }
            }
        }
    }
    (name, matchers)
}

/// The node at `path` (keys, or indices written as numbers) below `y`; a missing one fails,
/// naming the file and the path.
fn at<'a>(file: &str, y: &'a Yaml, path: &str) -> &'a Yaml {
    let mut node = y;
    for key in path.split('.') {
        node = match key.parse::<usize>() {
            Ok(i) => &node[i],
            Err(_) => &node[key],
        };
        assert!(!node.is_badvalue(), "{file}: no `{path}` (missing at `{key}`)");
    }
    node
}

/// A scalar as text: YAML reads `8080` as a number and `"8080"` as a string; Kubernetes takes both
/// in most places.
fn scalar(y: &Yaml) -> Option<String> {
    match y {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

fn text_at(file: &str, y: &Yaml, path: &str) -> String {
    scalar(at(file, y, path)).unwrap_or_else(|| panic!("{file}: `{path}` is not a scalar"))
}

fn int_at(file: &str, y: &Yaml, path: &str) -> i64 {
    at(file, y, path)
        .as_i64()
        .unwrap_or_else(|| panic!("{file}: `{path}` is not an integer"))
}

/// A list of scalars as strings (a container's `command` or `args`).
fn strings(file: &str, y: &Yaml, path: &str) -> Vec<String> {
    at(file, y, path)
        .as_vec()
        .unwrap_or_else(|| panic!("{file}: `{path}` is not a list"))
        .iter()
        .map(|v| scalar(v).unwrap_or_else(|| panic!("{file}: `{path}` holds a non-scalar")))
        .collect()
}

/// A Kubernetes quantity without suffix or with `m` (CPU, a metric's averageValue), in thousandths.
fn milli(file: &str, field: &str, q: &str) -> i64 {
    let parsed = match q.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok(),
        None => q.parse::<f64>().ok().map(|v| v * 1000.0),
    };
    let v = parsed.unwrap_or_else(|| panic!("{file}: `{field}` = {q:?} is not a plain or milli quantity"));
    v.round() as i64
}

/// The `--flag`s of a command line and the value after each, if any (`--flag=value` too).
fn flags(args: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        let Some(rest) = arg.strip_prefix("--") else {
            continue;
        };
        match rest.split_once('=') {
            Some((name, value)) => out.push((format!("--{name}"), Some(value.to_string()))),
            None => {
                let value = args.get(i + 1).filter(|next| !next.starts_with('-')).cloned();
                out.push((arg.clone(), value));
            }
        }
    }
    out
}

/// The value of `flag` in a command line; absent or without value fails, naming `file`.
fn flag_value(file: &str, args: &[String], flag: &str) -> String {
    let found: Vec<Option<String>> = flags(args)
        .into_iter()
        .filter(|(name, _)| name == flag)
        .map(|(_, value)| value)
        .collect();
    match found.as_slice() {
        [Some(value)] => value.clone(),
        [] => panic!("{file}: no {flag} given"),
        _ => panic!("{file}: {flag} given without a value or more than once"),
    }
}

fn flag_number(file: &str, args: &[String], flag: &str) -> f64 {
    let value = flag_value(file, args, flag);
    value
        .parse()
        .unwrap_or_else(|_| panic!("{file}: {flag} {value:?} is not a number"))
}

/// The Deployment's one container and its command line (`command` then `args`).
struct Container<'a> {
    file: &'a str,
    pod: &'a Yaml,
    yaml: &'a Yaml,
    argv: Vec<String>,
}

impl<'a> Container<'a> {
    fn of(deployment: &'a Doc) -> Self {
        let file = deployment.file.as_str();
        let pod = at(file, &deployment.yaml, "spec.template.spec");
        let containers = at(file, pod, "containers")
            .as_vec()
            .expect("containers is a list");
        assert_eq!(containers.len(), 1, "{file}: these checks expect one container");
        let yaml = &containers[0];
        let mut argv = Vec::new();
        for field in ["command", "args"] {
            if !yaml[field].is_badvalue() {
                argv.extend(strings(file, yaml, field));
            }
        }
        assert!(
            argv.windows(2).any(|w| w[0].ends_with("gpt2") && w[1] == "serve"),
            "{file}: the container does not run `gpt2 serve`: {argv:?}"
        );
        Container {
            file,
            pod,
            yaml,
            argv,
        }
    }

    fn port(&self) -> i64 {
        let value = flag_value(self.file, &self.argv, "--port");
        value
            .parse()
            .unwrap_or_else(|_| panic!("{}: --port {value:?} is not a number", self.file))
    }

    /// Whether `port` (a number or a port name, as in probes and a Service's targetPort) is the
    /// container's `--port`, declared among its `ports`.
    fn is_serving_port(&self, port: &Yaml) -> bool {
        let want = self.port();
        let declared = at(self.file, self.yaml, "ports")
            .as_vec()
            .expect("ports is a list");
        let Some(decl) = declared
            .iter()
            .find(|p| p["containerPort"].as_i64() == Some(want))
        else {
            panic!("{}: --port {want} is not among the container's ports", self.file)
        };
        match port {
            Yaml::Integer(n) => *n == want,
            Yaml::String(name) => decl["name"].as_str() == Some(name.as_str()),
            _ => false,
        }
    }
}

/// Seconds the preStop hook waits: `sleep: {seconds: N}`, or `sleep N` in an exec command.
fn pre_stop_sleep(file: &str, container: &Yaml) -> f64 {
    let pre_stop = at(file, container, "lifecycle.preStop");
    if !pre_stop["sleep"].is_badvalue() {
        return int_at(file, pre_stop, "sleep.seconds") as f64;
    }
    let command = strings(file, pre_stop, "exec.command").join(" ");
    let words: Vec<&str> = command.split_whitespace().collect();
    let seconds = words
        .windows(2)
        .find(|w| w[0] == "sleep")
        .and_then(|w| w[1].parse().ok());
    seconds.unwrap_or_else(|| panic!("{file}: preStop `{command}` has no `sleep N`"))
}

/// Every `--flag` in `gpt2 serve --help`.
fn serve_help_flags() -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_gpt2"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "gpt2 serve --help failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: BTreeSet<String> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_string)
        .collect();
    assert!(
        found.contains("--port"),
        "gpt2 serve --help lists no --port:\n{help}"
    );
    found
}

/// A Dockerfile's instructions: continuation lines joined, comments dropped, each split into
/// its upper-cased keyword and the rest.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                let (keyword, rest) = current.split_once(char::is_whitespace).unwrap_or((&current, ""));
                out.push((keyword.to_ascii_uppercase(), rest.trim().to_string()));
                current.clear();
            }
        }
    }
    out
}

/// The last `keyword` instruction's exec-form (JSON array) arguments.
fn dockerfile_exec_form(instructions: &[(String, String)], keyword: &str) -> Vec<String> {
    let (_, rest) = instructions
        .iter()
        .rev()
        .find(|(k, _)| k == keyword)
        .unwrap_or_else(|| panic!("{DOCKERFILE}: no {keyword}"));
    serde_json::from_str(rest)
        .unwrap_or_else(|e| panic!("{DOCKERFILE}: {keyword} is not in exec form (a JSON array): {e}"))
}

/// The `gpt2 serve` flags in a shell script, by a heuristic: the `--` words after a `serve` word
/// up to the end of its command (continuations joined), and list items `- --flag` of a manifest
/// written inline. Flags of other programs on other lines (kubectl, docker) are not collected.
fn script_serve_flags(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.replace("\\\n", " ").lines() {
        let line = line.split(" #").next().unwrap_or("").trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some(item) = line
            .strip_prefix("- ")
            .map(|w| w.trim().trim_matches(|c| c == '"' || c == '\''))
            .filter(|w| w.starts_with("--"))
        {
            out.push(item.to_string());
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(start) = words.iter().position(|w| *w == "serve") {
            // The command ends at a shell separator; what follows is another program's.
            let args: Vec<String> = words[start + 1..]
                .iter()
                .take_while(|w| !matches!(**w, ";" | "&" | "&&" | "||" | "|" | ")"))
                .map(|w| w.trim_matches(|c| c == '"' || c == '\'' || c == ';').into())
                .collect();
            out.extend(flags(&args).into_iter().map(|(name, _)| name));
        }
    }
    out
}

#[test]
fn every_manifest_parses_and_names_its_kind() {
    let docs = manifests();
    server_deployment(&docs);
    for kind in [
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "InferencePool",
        "HTTPRoute",
        "Gateway",
    ] {
        one(&docs, kind);
    }
    let crds = yaml_files(CRDS, "");
    assert!(!crds.is_empty(), "no CRD in {CRDS}");
    for file in crds {
        for crd in parse(&file) {
            assert_eq!(
                crd["kind"].as_str(),
                Some("CustomResourceDefinition"),
                "{file}: kind"
            );
        }
    }
}

#[test]
fn deployment_probes_drain_resources_and_weights_agree_with_its_flags() {
    let docs = manifests();
    let deployment = server_deployment(&docs);
    let c = Container::of(deployment);
    let file = c.file;

    let readiness = at(file, c.yaml, "readinessProbe.httpGet");
    assert_eq!(
        text_at(file, readiness, "path"),
        "/health",
        "{file}: readinessProbe.httpGet.path"
    );
    assert!(
        c.is_serving_port(at(file, readiness, "port")),
        "{file}: readinessProbe.httpGet.port is not the container's --port {}",
        c.port()
    );
    assert!(!c.yaml["livenessProbe"].is_badvalue(), "{file}: no livenessProbe");
    assert_ne!(
        c.yaml["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/health"),
        "{file}: livenessProbe on /health would restart a draining pod (503)"
    );

    let sleep = pre_stop_sleep(file, c.yaml);
    let drain = flag_number(file, &c.argv, "--drain-seconds");
    let grace = flag_number(file, &c.argv, "--grace-seconds");
    let period = int_at(file, c.pod, "terminationGracePeriodSeconds") as f64;
    assert!(
        period >= sleep + drain + grace,
        "{file}: terminationGracePeriodSeconds {period} < preStop sleep {sleep} + --drain-seconds {drain} \
         + --grace-seconds {grace}"
    );

    let threads = flag_number(file, &c.argv, "--threads");
    let cpu_request = milli(
        file,
        "requests.cpu",
        &text_at(file, c.yaml, "resources.requests.cpu"),
    );
    let cpu_limit = milli(file, "limits.cpu", &text_at(file, c.yaml, "resources.limits.cpu"));
    assert_eq!(
        cpu_request, cpu_limit,
        "{file}: resources.requests.cpu != resources.limits.cpu"
    );
    assert_eq!(
        cpu_request,
        (threads * 1000.0) as i64,
        "{file}: resources cpu (in millicores) != --threads {threads}"
    );
    for field in ["resources.requests.memory", "resources.limits.memory"] {
        text_at(file, c.yaml, field);
    }

    let weights = flag_value(file, &c.argv, "--weights");
    let mounts = at(file, c.yaml, "volumeMounts")
        .as_vec()
        .expect("volumeMounts is a list");
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"].as_str() == Some(weights.as_str()))
        .unwrap_or_else(|| panic!("{file}: no volumeMount at --weights {weights}"));
    assert_eq!(
        mount["readOnly"].as_bool(),
        Some(true),
        "{file}: the mount at {weights} is not readOnly"
    );
    let volume_name = text_at(file, mount, "name");
    let volumes = at(file, c.pod, "volumes").as_vec().expect("volumes is a list");
    assert!(
        volumes
            .iter()
            .any(|v| v["name"].as_str() == Some(volume_name.as_str())),
        "{file}: volumeMount {volume_name} names no volume in spec.template.spec.volumes"
    );

    // The container's securityContext overrides the pod's, field by field.
    let (pod_sc, container_sc) = (&c.pod["securityContext"], &c.yaml["securityContext"]);
    let non_root = container_sc["runAsNonRoot"]
        .as_bool()
        .or(pod_sc["runAsNonRoot"].as_bool());
    assert_eq!(
        non_root,
        Some(true),
        "{file}: runAsNonRoot (the container's, else the pod's) is not true"
    );
    for sc in [pod_sc, container_sc] {
        assert_ne!(sc["runAsUser"].as_i64(), Some(0), "{file}: runAsUser 0");
    }

    let labels = at(file, &deployment.yaml, "spec.template.metadata.labels");
    assert_selects(
        file,
        at(file, &deployment.yaml, "spec.selector.matchLabels"),
        labels,
        "spec.selector",
    );
}

/// Every key of `selector` has the same value in `labels`.
fn assert_selects(file: &str, selector: &Yaml, labels: &Yaml, what: &str) {
    let selector = selector
        .as_hash()
        .unwrap_or_else(|| panic!("{file}: {what} is not a map"));
    assert!(!selector.is_empty(), "{file}: {what} is empty");
    for (key, value) in selector {
        let key = key.as_str().unwrap_or_default();
        assert_eq!(
            &labels[key], value,
            "{file}: {what} {key}={value:?} does not match the Deployment's pod labels"
        );
    }
}

#[test]
fn service_selects_the_pods_on_the_container_port() {
    let docs = manifests();
    let deployment = server_deployment(&docs);
    let c = Container::of(deployment);
    let service = named(&docs, "Service", &deployment.name());
    let file = service.file.as_str();
    let labels = at(c.file, &deployment.yaml, "spec.template.metadata.labels");
    assert_selects(
        file,
        at(file, &service.yaml, "spec.selector"),
        labels,
        "spec.selector",
    );
    let ports = at(file, &service.yaml, "spec.ports")
        .as_vec()
        .expect("spec.ports is a list");
    assert!(!ports.is_empty(), "{file}: spec.ports is empty");
    for port in ports {
        let target = at(file, port, "targetPort");
        assert!(
            c.is_serving_port(target),
            "{file}: targetPort {} is not the container's port",
            scalar(target).unwrap_or_default()
        );
    }
}

/// The KV budget (`--kv-cache-mib`) is given, and is `--max-batch` + `--max-queue` full contexts of
/// the 124M model: the default (half the node's MemAvailable) means nothing in a container, and a
/// smaller budget would answer 429 where the queue has room, hiding the waiting requests the
/// autoscalers read; vllm:kv_cache_usage_perc reaches 1 when every slot holds a full context.
#[test]
fn kv_budget_admits_every_queue_slot_at_full_context() {
    let docs = manifests();
    let c = Container::of(server_deployment(&docs));
    let config = gpt2::synth::Preset::Gpt2_124M.config(0);
    let full = gpt2::KvCache::resident_bytes(&config, gpt2::KvDtype::F32, config.n_positions);
    assert_eq!(
        full % (1 << 20),
        0,
        "one full context is {full} bytes, not whole MiB"
    );
    let slots = flag_number(c.file, &c.argv, "--max-batch") + flag_number(c.file, &c.argv, "--max-queue");
    let budget = flag_number(c.file, &c.argv, "--kv-cache-mib");
    let want = slots * (full >> 20) as f64;
    assert_eq!(
        budget,
        want,
        "{}: --kv-cache-mib {budget} != (--max-batch + --max-queue) {slots} x {} MiB",
        c.file,
        full >> 20
    );
}

/// The HPA (option A): scales the server Deployment on a per-pod metric that a prometheus-adapter
/// rule serves, under a name the rule gives the series it reads; its target is above 0 and at
/// most `--max-batch` requests waiting.
#[test]
fn hpa_scales_the_deployment_on_an_adapter_metric_within_max_batch() {
    let docs = manifests();
    let deployment = server_deployment(&docs);
    let c = Container::of(deployment);
    let hpa = one(&docs, "HorizontalPodAutoscaler");
    let file = hpa.file.as_str();
    assert_eq!(
        text_at(file, &hpa.yaml, "apiVersion"),
        "autoscaling/v2",
        "{file}: apiVersion"
    );
    let target = at(file, &hpa.yaml, "spec.scaleTargetRef");
    assert_eq!(
        text_at(file, target, "kind"),
        "Deployment",
        "{file}: scaleTargetRef.kind"
    );
    assert_eq!(
        text_at(file, target, "name"),
        deployment.name(),
        "{file}: scaleTargetRef.name is not the Deployment's name"
    );
    let (min, max) = (
        int_at(file, &hpa.yaml, "spec.minReplicas"),
        int_at(file, &hpa.yaml, "spec.maxReplicas"),
    );
    assert!(
        1 <= min && min <= max,
        "{file}: minReplicas {min}, maxReplicas {max}"
    );

    let (name, average) = hpa_pods_metric(hpa);
    let max_batch = flag_number(c.file, &c.argv, "--max-batch");
    assert!(
        0 < average && average <= (max_batch * 1000.0) as i64,
        "{file}: averageValue {average}m is not within (0, --max-batch {max_batch}]"
    );
    let series = adapter_series_for(&docs, &name);
    println!("{file}: scales on {name}, the adapter's name for {series}");
}

/// The HPA's Pods metric: its name and its AverageValue target in thousandths.
fn hpa_pods_metric(hpa: &Doc) -> (String, i64) {
    let file = hpa.file.as_str();
    let metrics = at(file, &hpa.yaml, "spec.metrics")
        .as_vec()
        .expect("spec.metrics is a list");
    let pods = metrics
        .iter()
        .find(|m| m["type"].as_str() == Some("Pods"))
        .unwrap_or_else(|| panic!("{file}: no metric of type Pods"));
    assert_eq!(
        text_at(file, pods, "pods.target.type"),
        "AverageValue",
        "{file}: pods.target.type"
    );
    let average = milli(
        file,
        "averageValue",
        &text_at(file, pods, "pods.target.averageValue"),
    );
    (text_at(file, pods, "pods.metric.name"), average)
}

/// The Prometheus series that a prometheus-adapter rule in the manifests (a ConfigMap's
/// `config.yaml`) serves as `metric` per pod: the rule's `name.as` is `metric` and its
/// `name.matches` is exactly its seriesQuery's series, which maps `namespace` and `pod`.
fn adapter_series_for(docs: &[Doc], metric: &str) -> String {
    let mut seen = Vec::new();
    for doc in docs
        .iter()
        .filter(|d| d.yaml["kind"].as_str() == Some("ConfigMap"))
    {
        let Some(config) = doc.yaml["data"]["config.yaml"].as_str() else {
            continue;
        };
        let file = doc.file.as_str();
        let parsed = YamlLoader::load_from_str(config)
            .unwrap_or_else(|e| panic!("{file}: data.config.yaml is not valid YAML: {e}"));
        for rule in parsed.iter().filter_map(|c| c["rules"].as_vec()).flatten() {
            let as_name = rule["name"]["as"].as_str().unwrap_or_default();
            seen.push(as_name.to_string());
            if as_name != metric {
                continue;
            }
            let (series, _) = promql_selector(&text_at(file, rule, "seriesQuery"));
            assert_eq!(
                text_at(file, rule, "name.matches"),
                format!("^{series}$"),
                "{file}: the rule serving {metric} does not match exactly its series {series}"
            );
            for label in ["namespace", "pod"] {
                assert_eq!(
                    rule["resources"]["overrides"][label]["resource"].as_str(),
                    Some(label),
                    "{file}: the rule serving {metric} does not map the `{label}` label to its resource"
                );
            }
            return series;
        }
    }
    panic!("no prometheus-adapter rule in {K8S} serves {metric} (rules serve {seen:?})")
}

/// The KEDA ScaledObject (option B): scales the server Deployment on the sum of the same series
/// over its pods (selected by their labels as the scrape job maps them), with the HPA's policy:
/// threshold, replica bounds and behaviour.
#[test]
fn keda_scales_the_deployment_on_the_hpa_policy() {
    let docs = manifests();
    let deployment = server_deployment(&docs);
    let hpa = one(&docs, "HorizontalPodAutoscaler");
    let keda = one(&docs, "ScaledObject");
    let file = keda.file.as_str();
    assert_eq!(
        text_at(file, &keda.yaml, "apiVersion"),
        "keda.sh/v1alpha1",
        "{file}: apiVersion"
    );
    let target = at(file, &keda.yaml, "spec.scaleTargetRef");
    assert_eq!(
        text_at(file, target, "name"),
        deployment.name(),
        "{file}: scaleTargetRef.name is not the Deployment's name"
    );
    if !target["kind"].is_badvalue() {
        assert_eq!(
            text_at(file, target, "kind"),
            "Deployment",
            "{file}: scaleTargetRef.kind"
        );
    }
    let min = int_at(file, &keda.yaml, "spec.minReplicaCount");
    assert!(
        min >= 1,
        "{file}: minReplicaCount {min}: with no pod no request waits, so 0 never wakes"
    );
    for (ours, theirs) in [
        ("minReplicaCount", "minReplicas"),
        ("maxReplicaCount", "maxReplicas"),
    ] {
        assert_eq!(
            int_at(file, &keda.yaml, &format!("spec.{ours}")),
            int_at(&hpa.file, &hpa.yaml, &format!("spec.{theirs}")),
            "{file}: {ours} is not {}'s {theirs}",
            hpa.file
        );
    }
    assert_eq!(
        at(
            file,
            &keda.yaml,
            "spec.advanced.horizontalPodAutoscalerConfig.behavior"
        ),
        at(&hpa.file, &hpa.yaml, "spec.behavior"),
        "{file}: behavior differs from {}'s",
        hpa.file
    );

    let triggers = at(file, &keda.yaml, "spec.triggers")
        .as_vec()
        .expect("spec.triggers is a list");
    assert_eq!(triggers.len(), 1, "{file}: want one trigger");
    let trigger = &triggers[0];
    assert_eq!(
        text_at(file, trigger, "type"),
        "prometheus",
        "{file}: trigger type"
    );
    if !trigger["metricType"].is_badvalue() {
        assert_eq!(
            text_at(file, trigger, "metricType"),
            "AverageValue",
            "{file}: metricType"
        );
    }
    let (_, hpa_average) = hpa_pods_metric(hpa);
    let threshold = milli(file, "threshold", &text_at(file, trigger, "metadata.threshold"));
    assert_eq!(
        threshold, hpa_average,
        "{file}: threshold is not {}'s averageValue",
        hpa.file
    );

    let query = text_at(file, trigger, "metadata.query");
    assert!(
        query.starts_with("sum("),
        "{file}: the query {query} is not a sum over the pods"
    );
    let (series, matchers) = promql_selector(&query);
    let (hpa_metric, _) = hpa_pods_metric(hpa);
    assert_eq!(
        series,
        adapter_series_for(&docs, &hpa_metric),
        "{file}: the query reads another series than the HPA"
    );
    // The scrape job's labelmap turns each pod label into a series label, `.` and `/` as `_`.
    let labels = at(
        &deployment.file,
        &deployment.yaml,
        "spec.template.metadata.labels",
    );
    let mut selecting = 0;
    for (key, value) in labels.as_hash().expect("pod labels are a map") {
        let key = key.as_str().unwrap_or_default();
        let mapped: String = key
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        if let Some((_, want)) = matchers.iter().find(|(k, _)| *k == mapped) {
            assert_eq!(
                Some(want.as_str()),
                value.as_str(),
                "{file}: {mapped} is not the pod label {key}"
            );
            selecting += 1;
        }
    }
    assert!(
        selecting > 0,
        "{file}: the query {query} selects no pod label of the Deployment, so it sums other pods too"
    );
}

/// The two autoscalers are alternatives: no directory holds both for one Deployment, so no
/// `kubectl apply -f DIR` starts them together.
#[test]
fn hpa_and_keda_are_never_applied_together() {
    let docs = manifests();
    let target = |d: &Doc| text_at(&d.file, &d.yaml, "spec.scaleTargetRef.name");
    for hpa in docs
        .iter()
        .filter(|d| d.yaml["kind"].as_str() == Some("HorizontalPodAutoscaler"))
    {
        for keda in docs
            .iter()
            .filter(|d| d.yaml["kind"].as_str() == Some("ScaledObject"))
        {
            assert!(
                hpa.dir() != keda.dir() || target(hpa) != target(keda),
                "{} and {} both scale {} from one directory",
                hpa.file,
                keda.file,
                target(hpa)
            );
        }
    }
}

/// Every metric the HPA (through its adapter rule), the ScaledObject and the endpoint picker read
/// is a string in the server's source. The vllm:* gauges come with the server work of issue 33;
/// until it is merged this fails, naming them.
#[test]
fn autoscalers_and_picker_read_metrics_the_server_exports() {
    let docs = manifests();
    let hpa = one(&docs, "HorizontalPodAutoscaler");
    let (hpa_metric, _) = hpa_pods_metric(hpa);
    let mut read = vec![(hpa.file.clone(), adapter_series_for(&docs, &hpa_metric))];
    let keda = one(&docs, "ScaledObject");
    for trigger in at(&keda.file, &keda.yaml, "spec.triggers")
        .as_vec()
        .into_iter()
        .flatten()
    {
        let (series, _) = promql_selector(&text_at(&keda.file, trigger, "metadata.query"));
        read.push((keda.file.clone(), series));
    }
    let picker = Picker::of(&docs);
    for spec in picker.metric_specs() {
        read.push((picker.config_file.clone(), promql_selector(&spec).0));
    }
    let missing: Vec<String> = read
        .iter()
        .filter(|(_, metric)| in_server_source(metric).is_empty())
        .map(|(file, metric)| format!("{file}: {metric}"))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics read but not found in {SERVER_SOURCE}: {missing:?}"
    );
}

/// The InferencePool fits the schema of the upstream CRD in `deploy/k8s/crds/`: required fields
/// there, no unknown field, types and bounds right; and, by hand, the CEL rule that a Service
/// picker names its port. It also names a picker: the v1.6 schema makes that optional, v1.5's
/// required it, and without one the Gateway picks pods blind to their load.
#[test]
fn inference_pool_fits_its_crd_schema() {
    let docs = manifests();
    let pool = one(&docs, "InferencePool");
    let file = pool.file.as_str();
    let crd = parse(INFERENCE_POOL_CRD)
        .into_iter()
        .next()
        .expect("a CRD document");
    let schema = schema::version_schema(&crd, &pool.yaml)
        .unwrap_or_else(|e| panic!("{file}: {e} ({INFERENCE_POOL_CRD})"));
    let errors = schema::errors(schema, &pool.yaml);
    assert!(
        errors.is_empty(),
        "{file} against {INFERENCE_POOL_CRD}: {errors:#?}"
    );
    let picker = at(file, &pool.yaml, "spec.endpointPickerRef");
    if picker["kind"].as_str().unwrap_or("Service") == "Service" {
        int_at(file, picker, "port.number");
    }
}

/// The schema check bites: a pool in the v1alpha2 shape (`targetPortNumber`, `extensionRef`, a
/// bare label map as selector) fails the v1 schema on each of those.
#[test]
fn schema_check_rejects_an_alpha2_shaped_pool() {
    let crd = parse(INFERENCE_POOL_CRD)
        .into_iter()
        .next()
        .expect("a CRD document");
    let alpha2 = &YamlLoader::load_from_str(
        "apiVersion: inference.networking.k8s.io/v1\n\
         kind: InferencePool\n\
         metadata: {name: p}\n\
         spec:\n  selector: {app: p}\n  targetPortNumber: 8080\n  extensionRef: {name: p-epp}\n",
    )
    .expect("valid YAML")[0];
    let schema = schema::version_schema(&crd, alpha2).expect("a served version");
    let errors = schema::errors(schema, alpha2).join("\n");
    for want in [
        ".spec.targetPortNumber: unknown field",
        ".spec.extensionRef: unknown field",
        ".spec: required field `targetPorts` is missing",
        ".spec.selector: required field `matchLabels` is missing",
        ".spec.selector.app: unknown field",
    ] {
        assert!(errors.contains(want), "want `{want}` among:\n{errors}");
    }
    let old_group = YamlLoader::load_from_str(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferencePool\n",
    )
    .expect("valid YAML");
    assert!(schema::version_schema(&crd, &old_group[0]).is_err());
}

/// The pool's members are the server Deployment's pods, on the container's port.
#[test]
fn inference_pool_selects_the_server_pods_on_the_container_port() {
    let docs = manifests();
    let deployment = server_deployment(&docs);
    let c = Container::of(deployment);
    let pool = one(&docs, "InferencePool");
    let file = pool.file.as_str();
    let labels = at(c.file, &deployment.yaml, "spec.template.metadata.labels");
    assert_selects(
        file,
        at(file, &pool.yaml, "spec.selector.matchLabels"),
        labels,
        "spec.selector.matchLabels",
    );
    let ports = at(file, &pool.yaml, "spec.targetPorts")
        .as_vec()
        .expect("targetPorts is a list");
    assert!(!ports.is_empty(), "{file}: no targetPorts");
    for port in ports {
        let number = at(file, port, "number");
        assert!(
            c.is_serving_port(number),
            "{file}: targetPorts number {} is not the container's --port {}",
            scalar(number).unwrap_or_default(),
            c.port()
        );
    }
}

/// The endpoint picker a pool names, found through the manifests: its Service, Deployment,
/// container command line and configuration.
struct Picker<'a> {
    pool: &'a Doc,
    service: &'a Doc,
    deployment: &'a Doc,
    /// Where the configuration is: file, ConfigMap and key.
    config_file: String,
    config: Yaml,
}

impl<'a> Picker<'a> {
    /// Follows the InferencePool's endpointPickerRef to a Service, on a port it serves, whose
    /// selector picks a Deployment's pods; that Deployment's container serves the pool (by name
    /// and group) on the Service's target port with a configuration from a mounted ConfigMap.
    fn of(docs: &'a [Doc]) -> Self {
        let pool = one(docs, "InferencePool");
        let file = pool.file.as_str();
        let pick = at(file, &pool.yaml, "spec.endpointPickerRef");
        assert_eq!(
            pick["kind"].as_str().unwrap_or("Service"),
            "Service",
            "{file}: endpointPickerRef.kind"
        );
        let service = named(docs, "Service", &text_at(file, pick, "name"));
        let port = int_at(file, pick, "port.number");
        let sfile = service.file.as_str();
        let service_ports = at(sfile, &service.yaml, "spec.ports")
            .as_vec()
            .expect("spec.ports is a list");
        let service_port = service_ports
            .iter()
            .find(|p| p["port"].as_i64() == Some(port))
            .unwrap_or_else(|| panic!("{sfile}: no port {port}, the pool's endpointPickerRef.port.number"));
        let target = if service_port["targetPort"].is_badvalue() {
            &service_port["port"]
        } else {
            &service_port["targetPort"]
        };

        let selector = at(sfile, &service.yaml, "spec.selector");
        let selected: Vec<&Doc> = docs
            .iter()
            .filter(|d| d.yaml["kind"].as_str() == Some("Deployment"))
            .filter(|d| {
                let labels = &d.yaml["spec"]["template"]["metadata"]["labels"];
                selector.as_hash().is_some_and(|sel| {
                    sel.iter()
                        .all(|(k, v)| labels[k.as_str().unwrap_or_default()] == *v)
                })
            })
            .collect();
        assert_eq!(
            selected.len(),
            1,
            "{sfile}: the selector picks {} Deployments' pods, want 1",
            selected.len()
        );
        let deployment = selected[0];
        let dfile = deployment.file.as_str();
        let pod = at(dfile, &deployment.yaml, "spec.template.spec");
        let containers = at(dfile, pod, "containers")
            .as_vec()
            .expect("containers is a list");
        assert_eq!(
            containers.len(),
            1,
            "{dfile}: these checks expect one container in the picker"
        );
        let container = &containers[0];
        let args = strings(dfile, container, "args");
        assert_eq!(
            flag_value(dfile, &args, "--pool-name"),
            pool.name(),
            "{dfile}: --pool-name is not the pool's name"
        );
        let group = text_at(file, &pool.yaml, "apiVersion");
        let group = group.split('/').next().unwrap_or_default();
        if flags(&args).iter().any(|(f, _)| f == "--pool-group") {
            assert_eq!(
                flag_value(dfile, &args, "--pool-group"),
                group,
                "{dfile}: --pool-group"
            );
        }
        // The ext-proc port: --grpc-port, 9002 when not given.
        let grpc = if flags(&args).iter().any(|(f, _)| f == "--grpc-port") {
            flag_number(dfile, &args, "--grpc-port") as i64
        } else {
            9002
        };
        let declared = at(dfile, container, "ports").as_vec().expect("ports is a list");
        let decl = declared
            .iter()
            .find(|p| p["containerPort"].as_i64() == Some(grpc))
            .unwrap_or_else(|| {
                panic!("{dfile}: the ext-proc port {grpc} is not among the container's ports")
            });
        let reaches = match target {
            Yaml::Integer(n) => *n == grpc,
            Yaml::String(name) => decl["name"].as_str() == Some(name.as_str()),
            _ => false,
        };
        assert!(
            reaches,
            "{sfile}: port {port} does not reach the picker's ext-proc port {grpc}"
        );

        let config_path = flag_value(dfile, &args, "--config-file");
        let (dir, key) = config_path
            .rsplit_once('/')
            .unwrap_or_else(|| panic!("{dfile}: --config-file {config_path} is not DIR/FILE"));
        let mounts = at(dfile, container, "volumeMounts")
            .as_vec()
            .expect("volumeMounts is a list");
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"].as_str().map(|p| p.trim_end_matches('/')) == Some(dir))
            .unwrap_or_else(|| panic!("{dfile}: nothing mounted at {dir}, where --config-file is"));
        let volume_name = text_at(dfile, mount, "name");
        let volumes = at(dfile, pod, "volumes").as_vec().expect("volumes is a list");
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(volume_name.as_str()))
            .unwrap_or_else(|| panic!("{dfile}: no volume {volume_name}"));
        let map = named(docs, "ConfigMap", &text_at(dfile, volume, "configMap.name"));
        // Not `at`: the key has a dot.
        let text = scalar(&map.yaml["data"][key])
            .unwrap_or_else(|| panic!("{}: no `{key}` in data, where --config-file is", map.file));
        let config_file = format!("{} (ConfigMap {}, {key})", map.file, map.name());
        let config = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{config_file} is not valid YAML: {e}"))
            .into_iter()
            .next()
            .unwrap_or_else(|| panic!("{config_file} is empty"));
        assert_eq!(
            config["kind"].as_str(),
            Some("EndpointPickerConfig"),
            "{config_file}: kind"
        );
        Picker {
            pool,
            service,
            deployment,
            config_file,
            config,
        }
    }

    /// The plugin of `ty` in the configuration.
    fn plugin(&self, ty: &str) -> &Yaml {
        let plugins = at(&self.config_file, &self.config, "plugins")
            .as_vec()
            .expect("plugins is a list");
        let found: Vec<&Yaml> = plugins
            .iter()
            .filter(|p| p["type"].as_str() == Some(ty))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "{}: want one plugin of type {ty}",
            self.config_file
        );
        found[0]
    }

    /// The metric specifications of the engine the extractor applies to the pool's pods (its
    /// defaultEngine, given with its metric names): queued, running, KV cache usage.
    fn metric_specs(&self) -> Vec<String> {
        let file = &self.config_file;
        let params = at(file, self.plugin("core-metrics-extractor"), "parameters");
        let engine = text_at(file, params, "defaultEngine");
        let configs = at(file, params, "engineConfigs")
            .as_vec()
            .expect("engineConfigs is a list");
        let config = configs
            .iter()
            .find(|c| c["name"].as_str() == Some(engine.as_str()))
            .unwrap_or_else(|| panic!("{file}: no engineConfigs entry for the defaultEngine {engine}"));
        ["queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"]
            .iter()
            .map(|k| text_at(file, config, k))
            .collect()
    }
}

/// The picker the pool names serves it (see [`Picker::of`]), scrapes `/metrics` over plain HTTP
/// with the metric names set for its default engine, and may read the pool and its pods.
#[test]
fn endpoint_picker_serves_the_pool_and_scrapes_metrics() {
    let docs = manifests();
    let picker = Picker::of(&docs);
    let file = &picker.config_file;
    let source = at(file, picker.plugin("metrics-data-source"), "parameters");
    assert_eq!(
        text_at(file, source, "path"),
        "/metrics",
        "{file}: metrics-data-source path"
    );
    assert_eq!(
        text_at(file, source, "scheme"),
        "http",
        "{file}: metrics-data-source scheme (gpt2 serve speaks HTTP)"
    );
    let specs = picker.metric_specs();
    assert!(
        specs.iter().all(|s| !s.is_empty()),
        "{file}: an empty metric spec {specs:?}"
    );

    // Its service account may get, list and watch the pool and the pods.
    let dfile = &picker.deployment.file;
    let account = text_at(
        dfile,
        &picker.deployment.yaml,
        "spec.template.spec.serviceAccountName",
    );
    named(&docs, "ServiceAccount", &account);
    let pool_group = text_at(&picker.pool.file, &picker.pool.yaml, "apiVersion");
    let pool_group = pool_group.split('/').next().unwrap_or_default();
    let granted = |group: &str, resource: &str| {
        docs.iter()
            .filter(|d| d.yaml["kind"].as_str() == Some("RoleBinding"))
            .any(|binding| {
                let subjects = binding.yaml["subjects"]
                    .as_vec()
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let bound = subjects.iter().any(|s| {
                    s["kind"].as_str() == Some("ServiceAccount")
                        && s["name"].as_str() == Some(account.as_str())
                });
                let role_name = binding.yaml["roleRef"]["name"].as_str().unwrap_or_default();
                bound
                    && binding.yaml["roleRef"]["kind"].as_str() == Some("Role")
                    && docs
                        .iter()
                        .filter(|d| d.yaml["kind"].as_str() == Some("Role") && d.name() == role_name)
                        .any(|role| {
                            role.yaml["rules"].as_vec().into_iter().flatten().any(|rule| {
                                let has = |field: &str, want: &str| {
                                    rule[field]
                                        .as_vec()
                                        .is_some_and(|v| v.iter().any(|x| x.as_str() == Some(want)))
                                };
                                has("apiGroups", group)
                                    && has("resources", resource)
                                    && ["get", "list", "watch"].iter().all(|verb| has("verbs", verb))
                            })
                        })
            })
    };
    assert!(
        granted(pool_group, "inferencepools"),
        "{dfile}: {account} may not get/list/watch {pool_group} inferencepools"
    );
    assert!(
        granted("", "pods"),
        "{dfile}: {account} may not get/list/watch pods"
    );

    // Istio's rule for the picker's TLS, when present, is for the picker's Service.
    let service = picker.service.name();
    for rule in docs
        .iter()
        .filter(|d| d.yaml["kind"].as_str() == Some("DestinationRule"))
    {
        let host = text_at(&rule.file, &rule.yaml, "spec.host");
        assert!(
            host == service || host.starts_with(&format!("{service}.")),
            "{}: host {host} is not the picker's Service {service}",
            rule.file
        );
    }
}

/// The HTTPRoute hangs on the Gateway and sends both completion routes, and nothing else, to the
/// InferencePool.
#[test]
fn http_route_sends_both_completion_routes_to_the_pool() {
    let docs = manifests();
    let gateway = one(&docs, "Gateway");
    let gfile = gateway.file.as_str();
    assert!(
        !text_at(gfile, &gateway.yaml, "spec.gatewayClassName").is_empty(),
        "{gfile}: gatewayClassName"
    );
    assert!(
        at(gfile, &gateway.yaml, "spec.listeners")
            .as_vec()
            .is_some_and(|l| !l.is_empty()),
        "{gfile}: no listeners"
    );
    let pool = one(&docs, "InferencePool");
    let pool_group = text_at(&pool.file, &pool.yaml, "apiVersion");
    let pool_group = pool_group.split('/').next().unwrap_or_default();
    let route = one(&docs, "HTTPRoute");
    let file = route.file.as_str();

    let parents = at(file, &route.yaml, "spec.parentRefs")
        .as_vec()
        .expect("parentRefs is a list");
    assert!(
        parents.iter().any(|p| {
            p["name"].as_str() == Some(gateway.name().as_str())
                && p["kind"].as_str().unwrap_or("Gateway") == "Gateway"
                && p["group"].as_str().unwrap_or("gateway.networking.k8s.io") == "gateway.networking.k8s.io"
        }),
        "{file}: no parentRef names the Gateway {}",
        gateway.name()
    );

    let mut routed = Vec::new();
    for rule in at(file, &route.yaml, "spec.rules")
        .as_vec()
        .expect("rules is a list")
    {
        let backends = at(file, rule, "backendRefs")
            .as_vec()
            .expect("backendRefs is a list");
        assert!(!backends.is_empty(), "{file}: a rule without backendRefs");
        for backend in backends {
            assert_eq!(
                text_at(file, backend, "group"),
                pool_group,
                "{file}: backendRef group"
            );
            assert_eq!(
                text_at(file, backend, "kind"),
                "InferencePool",
                "{file}: backendRef kind"
            );
            assert_eq!(
                text_at(file, backend, "name"),
                pool.name(),
                "{file}: backendRef is not the pool"
            );
        }
        // No `matches` matches every path, as `PathPrefix /` does.
        let matches = rule["matches"].as_vec().map(Vec::as_slice).unwrap_or_default();
        if matches.is_empty() {
            routed.push(("PathPrefix".to_string(), "/".to_string()));
        }
        for m in matches {
            let path = &m["path"];
            let ty = path["type"].as_str().unwrap_or("PathPrefix").to_string();
            routed.push((ty, path["value"].as_str().unwrap_or("/").to_string()));
        }
    }
    for want in COMPLETION_ROUTES {
        let covered = routed.iter().any(|(ty, value)| match ty.as_str() {
            "Exact" => value == want,
            "PathPrefix" => {
                let prefix = value.trim_end_matches('/');
                want == prefix || want.starts_with(&format!("{prefix}/"))
            }
            _ => false,
        });
        assert!(
            covered,
            "{file}: {want} is not routed to the pool (routes: {routed:?})"
        );
    }
}

/// Every path the HTTPRoute matches exactly, and both completion routes, are strings in the
/// server's source. /v1/chat/completions comes with the server work of issue 33; until it is
/// merged this fails, naming it.
#[test]
fn http_route_paths_are_server_routes() {
    let docs = manifests();
    let route = one(&docs, "HTTPRoute");
    let mut paths: BTreeSet<String> = COMPLETION_ROUTES.iter().map(|p| p.to_string()).collect();
    for rule in at(&route.file, &route.yaml, "spec.rules")
        .as_vec()
        .into_iter()
        .flatten()
    {
        for m in rule["matches"].as_vec().into_iter().flatten() {
            if m["path"]["type"].as_str() == Some("Exact") {
                paths.insert(text_at(&route.file, m, "path.value"));
            }
        }
    }
    let missing: Vec<&String> = paths.iter().filter(|p| in_server_source(p).is_empty()).collect();
    assert!(
        missing.is_empty(),
        "{}: routes not found in {SERVER_SOURCE}: {missing:?}",
        route.file
    );
}

#[test]
fn every_flag_given_to_serve_is_a_serve_flag() {
    let help = serve_help_flags();
    let docs = manifests();
    let c = Container::of(server_deployment(&docs));
    let mut given: Vec<(String, String)> = flags(&c.argv)
        .into_iter()
        .map(|(f, _)| (c.file.to_string(), f))
        .collect();
    let docker = dockerfile_instructions(&read(DOCKERFILE));
    for keyword in ["ENTRYPOINT", "CMD"] {
        let argv = dockerfile_exec_form(&docker, keyword);
        given.extend(
            flags(&argv)
                .into_iter()
                .map(|(f, _)| (format!("{DOCKERFILE} {keyword}"), f)),
        );
    }
    if repo().join(LOCAL_CLUSTER).exists() {
        let script = script_serve_flags(&read(LOCAL_CLUSTER));
        println!("{LOCAL_CLUSTER}: serve flags {script:?}");
        given.extend(script.into_iter().map(|f| (LOCAL_CLUSTER.into(), f)));
    } else {
        println!("note: {LOCAL_CLUSTER} is absent, its flags are not checked");
    }
    let unknown: Vec<String> = given
        .iter()
        .filter(|(_, f)| !help.contains(f))
        .map(|(file, f)| format!("{file}: {f}"))
        .collect();
    assert!(
        unknown.is_empty(),
        "flags `gpt2 serve --help` does not list: {unknown:?}"
    );
}

#[test]
fn dockerfile_is_multi_stage_non_root_with_a_healthcheck_on_the_port() {
    let docs = manifests();
    let c = Container::of(server_deployment(&docs));
    let docker = dockerfile_instructions(&read(DOCKERFILE));
    let count = |keyword: &str| docker.iter().filter(|(k, _)| k == keyword).count();
    assert!(
        count("FROM") >= 2,
        "{DOCKERFILE}: {} FROM, want a builder and a runtime stage",
        count("FROM")
    );
    let (_, user) = docker
        .iter()
        .rev()
        .find(|(k, _)| k == "USER")
        .unwrap_or_else(|| panic!("{DOCKERFILE}: no USER (the image would run as root)"));
    let user = user.split(':').next().unwrap_or_default();
    assert!(!matches!(user, "root" | "0"), "{DOCKERFILE}: USER {user}");
    assert_eq!(count("HEALTHCHECK"), 1, "{DOCKERFILE}: want one HEALTHCHECK");
    let exposed: Vec<i64> = docker
        .iter()
        .filter(|(k, _)| k == "EXPOSE")
        .flat_map(|(_, rest)| {
            rest.split_whitespace()
                .map(|p| p.trim_end_matches("/tcp").parse().unwrap_or(-1))
        })
        .collect();
    assert!(
        exposed.contains(&c.port()),
        "{DOCKERFILE}: EXPOSE {exposed:?} lacks the container port {}",
        c.port()
    );
    let cmd = dockerfile_exec_form(&docker, "CMD");
    assert_eq!(
        flag_value(DOCKERFILE, &cmd, "--port").parse::<i64>().ok(),
        Some(c.port()),
        "{DOCKERFILE}: CMD --port is not the container port"
    );
}
