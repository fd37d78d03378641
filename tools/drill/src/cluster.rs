//! A local cluster as the drills see it: `deploy/local-cluster.sh` started
//! on free loopback ports, its replicas' pid files, their `/health` and
//! `/metrics`, and HAProxy's view of them (its stats page, as CSV).
//!
//! The script owns the processes (it pins, supervises and restarts the
//! replicas, and stops everything when it gets SIGTERM); this side only
//! reads its state directory and sends signals, with the `kill` command, as
//! an operator would.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How a cluster is made.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub replicas: usize,
    pub cores_per_replica: usize,
    /// `--weights DIR` of every replica (else the script's default, `--synthetic`).
    pub weights: Option<PathBuf>,
    pub drain_seconds: f64,
    pub grace_seconds: f64,
    /// More `gpt2 serve` flags (after `--`).
    pub serve_flags: Vec<String>,
}

/// Where the programs are.
#[derive(Debug, Clone)]
pub struct Programs {
    pub script: PathBuf,
    pub gpt2: PathBuf,
    pub throughput: PathBuf,
}

impl Programs {
    /// `gpt2` and `throughput` next to the running binary (cargo builds them
    /// together), the script in the source tree's `deploy/`.
    pub fn beside_current_exe() -> Result<Programs, String> {
        let exe = std::env::current_exe().map_err(|e| format!("cannot locate this program: {e}"))?;
        let dir = exe.parent().unwrap_or(Path::new("."));
        let programs = Programs {
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/local-cluster.sh"),
            gpt2: dir.join("gpt2"),
            throughput: dir.join("throughput"),
        };
        for p in [&programs.script, &programs.gpt2, &programs.throughput] {
            if !p.is_file() {
                return Err(format!(
                    "{} is missing: build every binary first (cargo build --release)",
                    p.display()
                ));
            }
        }
        Ok(programs)
    }
}

/// A replica's state in HAProxy's eyes: `UP`, `DOWN`, `UP 1/2` (going
/// down), `DOWN 1/2` (coming up), `MAINT`, ... or `absent`.
pub type LbStatus = String;

/// A running cluster; dropped, it is stopped.
pub struct Cluster {
    child: Option<Child>,
    pub state: PathBuf,
    pub lb_port: u16,
    pub stats_port: u16,
    pub replica_ports: Vec<u16>,
    pub spec: ClusterSpec,
    agent: ureq::Agent,
}

/// Ports the kernel says are free now (bound to port 0 and released).
fn free_ports(n: usize) -> Result<Vec<u16>, String> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot find a free loopback port: {e}"))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())
}

/// A GET answered: its status and body.
pub struct Got {
    pub status: u16,
    pub body: String,
}

impl Cluster {
    /// Starts the script in `state` (its logs, pid files and generated
    /// HAProxy config go there) and waits until it says ready: every
    /// replica loaded and UP in HAProxy.
    pub fn start(spec: &ClusterSpec, programs: &Programs, state: &Path) -> Result<Cluster, String> {
        std::fs::create_dir_all(state).map_err(|e| format!("cannot create {}: {e}", state.display()))?;
        let ports = free_ports(spec.replicas + 2)?;
        let (lb_port, stats_port, replica_ports) = (ports[0], ports[1], ports[2..].to_vec());
        let log_path = state.join("cluster.log");
        let log = File::create(&log_path).map_err(|e| format!("cannot write {}: {e}", log_path.display()))?;
        let list = |v: &[u16]| v.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
        let mut cmd = Command::new(&programs.script);
        cmd.arg(spec.replicas.to_string())
            .args(["--cores-per-replica", &spec.cores_per_replica.to_string()])
            .args(["--port", &lb_port.to_string()])
            .args(["--stats-port", &stats_port.to_string()])
            .args(["--replica-ports", &list(&replica_ports)])
            .arg("--state-dir")
            .arg(state)
            .args(["--drain-seconds", &spec.drain_seconds.to_string()])
            .args(["--grace-seconds", &spec.grace_seconds.to_string()])
            .env("GPT2_BIN", &programs.gpt2)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        if let Some(w) = &spec.weights {
            cmd.arg("--weights").arg(w);
        }
        if !spec.serve_flags.is_empty() {
            cmd.arg("--").args(&spec.serve_flags);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", programs.script.display()))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        let mut cluster = Cluster {
            child: Some(child),
            state: state.to_path_buf(),
            lb_port,
            stats_port,
            replica_ports,
            spec: spec.clone(),
            agent,
        };
        let start = Instant::now();
        loop {
            if cluster.log().contains("local-cluster: ready") {
                return Ok(cluster);
            }
            if let Some(status) = cluster.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!(
                    "deploy/local-cluster.sh exited ({status}) before it was ready:\n{}",
                    tail(&cluster.log(), 20)
                ));
            }
            if start.elapsed() > Duration::from_secs(300) {
                return Err(format!(
                    "the cluster was not ready within 300 s:\n{}",
                    tail(&cluster.log(), 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The script's own log (what it did, restarts included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.state.join("cluster.log")).unwrap_or_default()
    }

    pub fn lb_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.lb_port)
    }

    pub fn replica_url(&self, i: usize, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.replica_ports[i])
    }

    pub fn get(&self, url: &str) -> Result<Got, String> {
        let resp = self
            .agent
            .get(url)
            .call()
            .map_err(|e| format!("GET {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .read_to_string()
            .map_err(|e| format!("GET {url}: reading the answer: {e}"))?;
        Ok(Got { status, body })
    }

    /// The pid of replica `i`'s current process.
    pub fn pid(&self, i: usize) -> Result<u32, String> {
        let path = self.state.join(format!("replica-{i}.pid"));
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        text.trim()
            .parse()
            .map_err(|_| format!("{} holds {text:?}, not a pid", path.display()))
    }

    /// Sends `signal` (`TERM`, `KILL`) to replica `i`; returns its pid.
    pub fn signal(&self, i: usize, signal: &str) -> Result<u32, String> {
        let pid = self.pid(i)?;
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .map_err(|e| format!("cannot run kill: {e}"))?;
        if !status.success() {
            return Err(format!("kill -{signal} {pid} (replica {i}) failed: {status}"));
        }
        Ok(pid)
    }

    /// HAProxy's status of replica `i` (server `r<i>` of backend `replicas`).
    pub fn lb_status(&self, i: usize) -> Result<LbStatus, String> {
        Ok(self.lb_field(i, "status")?.unwrap_or_else(|| "absent".into()))
    }

    /// One column of HAProxy's stats CSV for replica `i` (`status`,
    /// `wretr`: connection retries, `wredis`: redispatches to another
    /// server, ...); `None` if HAProxy does not list it.
    pub fn lb_field(&self, i: usize, column: &str) -> Result<Option<String>, String> {
        let got = self.get(&format!("http://127.0.0.1:{}/stats;csv", self.stats_port))?;
        let header = got.body.lines().next().unwrap_or("");
        let at = header
            .trim_start_matches("# ")
            .split(',')
            .position(|c| c == column)
            .ok_or_else(|| format!("HAProxy's stats have no {column} column: {header}"))?;
        let name = format!("r{i}");
        Ok(got
            .body
            .lines()
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.len() > at && f[0] == "replicas" && f[1] == name)
            .map(|f| f[at].to_string()))
    }

    /// Polls `probe` every 50 ms until it gives `Some`, for at most `limit`.
    pub fn wait_for<T>(
        &self,
        what: &str,
        limit: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> Result<T, String> {
        let start = Instant::now();
        loop {
            if let Some(v) = probe() {
                return Ok(v);
            }
            if start.elapsed() > limit {
                return Err(format!(
                    "{what}: not within {} s; the cluster's log:\n{}",
                    limit.as_secs(),
                    tail(&self.log(), 15)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until replica `i` runs a process other than `old_pid`, answers
    /// 200 on `/health`, and HAProxy has it UP again; returns the new pid.
    pub fn wait_back(&self, i: usize, old_pid: u32, limit: Duration) -> Result<u32, String> {
        let start = Instant::now();
        let pid = self.wait_for(&format!("replica {i} restarted"), limit, || {
            self.pid(i).ok().filter(|&p| p != old_pid)
        })?;
        let left = limit.saturating_sub(start.elapsed());
        self.wait_for(&format!("replica {i} healthy"), left, || {
            let url = self.replica_url(i, "/health");
            self.get(&url).ok().filter(|g| g.status == 200).map(|_| ())
        })?;
        let left = limit.saturating_sub(start.elapsed());
        self.wait_for(&format!("HAProxy sees replica {i} UP"), left, || {
            self.lb_status(i).ok().filter(|s| s == "UP").map(|_| ())
        })?;
        Ok(pid)
    }

    /// Stops the cluster: SIGTERM to the script (which drains and stops
    /// the replicas, then HAProxy), SIGKILL to whatever is left after the
    /// drain and grace periods and a margin.
    pub fn stop(&mut self) -> Result<(), String> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let limit = Duration::from_secs_f64(self.spec.drain_seconds + self.spec.grace_seconds + 30.0);
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = child.try_wait() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
        for i in 0..self.spec.replicas {
            if let Ok(pid) = self.pid(i) {
                let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
            }
        }
        if let Ok(pid) = std::fs::read_to_string(self.state.join("haproxy.pid")) {
            let _ = Command::new("kill").arg("-KILL").arg(pid.trim()).status();
        }
        Err(format!(
            "the cluster did not stop within {} s of SIGTERM: killed",
            limit.as_secs()
        ))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("drill: {e}");
        }
    }
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The sum of the samples of metric `name` in a Prometheus text page whose
/// labels contain every one of `labels` (e.g. `route="/v1/completions"`).
pub fn metric_sum(page: &str, name: &str, labels: &[&str]) -> f64 {
    page.lines()
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let ours = (rest.is_empty() || rest.starts_with('{')) && labels.iter().all(|w| rest.contains(w));
            ours.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_pick_the_name_and_labels() {
        let page = "# HELP gpt2_requests_total x\n\
                    gpt2_requests_total{outcome=\"ok\",route=\"/v1/completions\"} 3\n\
                    gpt2_requests_total{outcome=\"ok\",route=\"/health\"} 40\n\
                    gpt2_requests_total{outcome=\"queue_full\",route=\"/v1/completions\"} 2\n\
                    gpt2_requests_in_flight 7\n\
                    gpt2_requests_in_flight_extra 100\n";
        assert_eq!(metric_sum(page, "gpt2_requests_in_flight", &[]), 7.0);
        assert_eq!(
            metric_sum(page, "gpt2_requests_total", &["route=\"/v1/completions\""]),
            5.0
        );
        assert_eq!(metric_sum(page, "gpt2_requests_total", &[]), 45.0);
        assert_eq!(metric_sum(page, "gpt2_nothing", &[]), 0.0);
    }
}
