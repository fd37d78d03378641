//! The deployment files in `deploy/` against each other and against the binary, without Docker
//! or a cluster: every `deploy/k8s/*.yaml` parses; the Deployment's probes, drain timing,
//! resources and weights volume agree with the flags it passes; the Service and the HPA point at
//! it; the HPA's metric is one the server exports; every flag given to `gpt2 serve` (in the
//! Deployment, the Dockerfile and `deploy/local-cluster.sh` when present) is one `gpt2 serve
//! --help` lists; the Dockerfile is multi-stage, non-root, with a HEALTHCHECK on the port.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::Path;
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

const DEPLOYMENT: &str = "deploy/k8s/deployment.yaml";
const DOCKERFILE: &str = "deploy/Dockerfile";
const LOCAL_CLUSTER: &str = "deploy/local-cluster.sh";
const METRICS_SOURCE: &str = "tools/serve/src/metrics.rs";

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

/// Every document of every `deploy/k8s/*.yaml`, files in name order; a file that does not parse
/// fails with its name and the parser's message.
fn manifests() -> Vec<Doc> {
    let dir = repo().join("deploy/k8s");
    let mut files: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .expect("a directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no *.yaml in deploy/k8s");
    let mut docs = Vec::new();
    for name in files {
        let file = format!("deploy/k8s/{name}");
        let parsed = YamlLoader::load_from_str(&read(&file))
            .unwrap_or_else(|e| panic!("{file} is not valid YAML: {e}"));
        // An empty document (a trailing `---`) is no object.
        for yaml in parsed.into_iter().filter(|y| !y.is_null()) {
            assert!(!yaml["kind"].is_badvalue(), "{file}: a document without `kind`");
            docs.push(Doc {
                file: file.clone(),
                yaml,
            });
        }
    }
    docs
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
    for kind in ["Deployment", "Service", "HorizontalPodAutoscaler"] {
        one(&docs, kind);
    }
}

#[test]
fn deployment_probes_drain_resources_and_weights_agree_with_its_flags() {
    let docs = manifests();
    let deployment = one(&docs, "Deployment");
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
    let deployment = one(&docs, "Deployment");
    let c = Container::of(deployment);
    let service = one(&docs, "Service");
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

#[test]
fn hpa_scales_the_deployment_on_an_exported_metric_at_max_batch() {
    let docs = manifests();
    let deployment = one(&docs, "Deployment");
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
        text_at(c.file, &deployment.yaml, "metadata.name"),
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

    let metrics = at(file, &hpa.yaml, "spec.metrics")
        .as_vec()
        .expect("spec.metrics is a list");
    let pods = metrics
        .iter()
        .find(|m| m["type"].as_str() == Some("Pods"))
        .unwrap_or_else(|| panic!("{file}: no metric of type Pods"));
    let name = text_at(file, pods, "pods.metric.name");
    let source = read(METRICS_SOURCE);
    assert!(
        source.contains(&format!("\"{name}\"")),
        "{file}: metric {name} is not registered in {METRICS_SOURCE}"
    );
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
    let max_batch = flag_number(c.file, &c.argv, "--max-batch");
    assert_eq!(
        average,
        (max_batch * 1000.0) as i64,
        "{file}: averageValue != the Deployment's --max-batch {max_batch}"
    );
    assert_adapter_serves(&docs, &name);
}

/// A prometheus-adapter rule in the manifests (a ConfigMap's `config.yaml`) whose seriesQuery
/// reads `metric`.
fn assert_adapter_serves(docs: &[Doc], metric: &str) {
    let mut rules = Vec::new();
    for doc in docs
        .iter()
        .filter(|d| d.yaml["kind"].as_str() == Some("ConfigMap"))
    {
        let Some(config) = doc.yaml["data"]["config.yaml"].as_str() else {
            continue;
        };
        let parsed = YamlLoader::load_from_str(config)
            .unwrap_or_else(|e| panic!("{}: data.config.yaml is not valid YAML: {e}", doc.file));
        for rule in parsed.iter().filter_map(|c| c["rules"].as_vec()).flatten() {
            rules.push(rule["seriesQuery"].as_str().unwrap_or_default().to_string());
        }
    }
    assert!(
        rules.iter().any(|q| q.contains(metric)),
        "no prometheus-adapter rule in deploy/k8s reads {metric} (seriesQueries: {rules:?})"
    );
}

#[test]
fn every_flag_given_to_serve_is_a_serve_flag() {
    let help = serve_help_flags();
    let docs = manifests();
    let c = Container::of(one(&docs, "Deployment"));
    let mut given: Vec<(String, String)> = flags(&c.argv)
        .into_iter()
        .map(|(f, _)| (DEPLOYMENT.into(), f))
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
    let c = Container::of(one(&docs, "Deployment"));
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
