//! Fault drills and the scale-out sweep (the `drill` binary): each starts a
//! local cluster (`deploy/local-cluster.sh`: replicas of `gpt2 serve`
//! pinned to their own cores, HAProxy in front), drives `throughput --url`
//! through HAProxy at a fixed concurrency with streaming requests, does
//! something to a replica mid-run, and checks what the clients saw:
//!
//! - `rolling`: SIGTERM one replica, wait until it is back (restarted by
//!   the script, loaded, UP in HAProxy), then the other. Nothing may fail.
//! - `crash`: SIGKILL one replica. Only requests it held may fail; HAProxy
//!   must take it out within its check interval and route to it again once
//!   it is back (its new process's `/metrics` counts requests).
//! - `overload`: arrivals at 4x what the cluster serves, the concurrency 4x
//!   the replicas' queues. The excess gets the replicas' 429 through
//!   HAProxy, and sent = succeeded + failed by status.
//! - `scale`: tok/s and p50 latency with 1 and 2 one-core replicas and one
//!   two-core replica, at each concurrency.
//! - `abuse` ([`abuse`]): issue 31's hostile clients (1 MB-prompt
//!   flooders through HAProxy, slowloris connections, streams never read)
//!   while the ordinary load runs: no ordinary request may fail, HAProxy
//!   may mark no replica DOWN, and `/health` must answer 200 with a p99
//!   under 100 ms.
//!
//! Each drill's table (requests sent, succeeded, failed by cause, p50/p99
//! latency, wrong token counts, and its checks) goes to stdout and to
//! `--out-dir` as Markdown and JSON; a drill whose checks fail exits 3.

pub mod abuse;
pub mod cluster;
pub mod tally;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use clap::ValueEnum;
use serde::Serialize;

use cluster::{metric_sum, Cluster, ClusterSpec, Programs};
use gpt2_bench::failure::Cause;
use gpt2_bench::{meta, stats, Report};
use gpt2_hub::WeightsSource;
use tally::{Check, Events, Tally};

/// Which drill (`drill <DRILL>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrillKind {
    /// SIGTERM one replica mid-run, wait until it is back, then the next.
    Rolling,
    /// SIGKILL one replica mid-run.
    Crash,
    /// Arrivals at 4x the cluster's rate, concurrency 4x the replicas' queues: 429s.
    Overload,
    /// Throughput and latency with 1 and 2 one-core replicas and one two-core replica.
    Scale,
    /// Hostile clients (1 MB-prompt flooders, slowloris, non-reading
    /// streams) while ordinary clients are served: none of them may fail.
    Abuse,
    /// rolling, crash and overload, one after the other.
    All,
}

/// The `drill` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    #[arg(value_enum)]
    pub drill: DrillKind,
    /// Checkpoint directory every replica serves (default: the synthetic
    /// 124M checkpoint, `gpt2 serve --synthetic`).
    #[arg(long, value_name = "DIR")]
    pub weights: Option<PathBuf>,
    /// Replicas, one core each (rolling, crash, overload).
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Client concurrency (rolling, crash, overload).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Tokens every request generates, exactly.
    #[arg(long, default_value_t = 32)]
    pub max_new_tokens: usize,
    /// How long the measured run of a fault drill should last, seconds: its
    /// request count is sized from a short calibration run.
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// The longest one request may take (throughput --request-deadline), seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_deadline: f64,
    /// Concurrency levels of the scale sweep (1 is its single-request test).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    pub scale_levels: Vec<usize>,
    /// Requests per level of the scale sweep (at least the level).
    #[arg(long, default_value_t = 32)]
    pub scale_requests: usize,
    /// Repetitions of the scale sweep, the order of the three layouts
    /// rotating; the table gives the median of each cell.
    #[arg(long, default_value_t = 1)]
    pub scale_repetitions: usize,
    /// abuse: clients posting 1,000,000-digit prompts through HAProxy in a loop.
    #[arg(long, default_value_t = 4)]
    pub flood_clients: usize,
    /// abuse: how long the attack (flooders, slowloris, non-readers) lasts, seconds.
    #[arg(long, default_value_t = 15.0)]
    pub flood_seconds: f64,
    /// abuse: partial-header connections held open (spread over HAProxy and each replica).
    #[arg(long, default_value_t = 200)]
    pub slowloris: usize,
    /// abuse: streaming completions sent to the replicas and never read.
    #[arg(long, default_value_t = 2)]
    pub non_readers: usize,
    /// Where the drill reports go (JSON and Markdown; never overwritten).
    #[arg(long, default_value = "data/drills")]
    pub out_dir: PathBuf,
}

/// One `throughput --url` run through the cluster's HAProxy.
struct Load {
    levels: Vec<usize>,
    requests_per_level: usize,
    single_requests: usize,
    max_new_tokens: usize,
    request_rate: Option<f64>,
    deadline: f64,
}

fn spawn_load(
    programs: &Programs,
    cluster: &Cluster,
    load: &Load,
    weights: Option<&Path>,
) -> Result<Child, String> {
    let levels = load
        .levels
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = Command::new(&programs.throughput);
    cmd.args(["--url", &cluster.lb_url()])
        .args(["--levels", &levels])
        .args(["--requests-per-level", &load.requests_per_level.to_string()])
        .args(["--single-requests", &load.single_requests.to_string()])
        .args(["--warmup", "1"])
        .args(["--max-new-tokens", &load.max_new_tokens.to_string()])
        .args(["--request-deadline", &load.deadline.to_string()])
        .args(["--http-timeout", &load.deadline.to_string()])
        .arg("--out-dir")
        .arg(cluster.state.join("reports"))
        .arg("--json")
        .stdin(Stdio::null())
        // Files, not pipes: the report is large, and nobody reads a pipe
        // until the run is over.
        .stdout(create(&cluster.state.join("load.json"))?)
        .stderr(create(&cluster.state.join("load.log"))?);
    if let Some(r) = load.request_rate {
        cmd.args(["--request-rate", &format!("{r:.3}")]);
    }
    if let Some(w) = weights.filter(|w| w.join("tokenizer.json").is_file()) {
        cmd.arg("--tokenizer").arg(w.join("tokenizer.json"));
    }
    cmd.spawn()
        .map_err(|e| format!("cannot run {}: {e}", programs.throughput.display()))
}

/// A new file at `path`, or an error naming it.
fn create(path: &Path) -> Result<std::fs::File, String> {
    std::fs::File::create(path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Waits for a load at most `limit` (then kills it: a client hung) and
/// reads its report. Exit 0, 3 (targets) and 4 (failed requests) all wrote one.
fn finish_load(mut child: Child, limit: Duration, state: &Path) -> Result<Report, String> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > limit => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "throughput --url did not finish within {} s: a client hung",
                    limit.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(format!("waiting for throughput: {e}")),
        }
    }
    let status = child.wait().map_err(|e| format!("waiting for throughput: {e}"))?;
    if !matches!(status.code(), Some(0 | 3 | 4)) {
        let log = std::fs::read_to_string(state.join("load.log")).unwrap_or_default();
        return Err(format!(
            "throughput --url failed ({status}):\n{}",
            cluster::tail(&log, 15)
        ));
    }
    let json =
        std::fs::read(state.join("load.json")).map_err(|e| format!("reading throughput's report: {e}"))?;
    serde_json::from_slice(&json).map_err(|e| format!("throughput's JSON report is unreadable: {e}"))
}

/// A drill's result: its setting, the tally, the events and the checks.
#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub drill: DrillKind,
    pub timestamp_utc: String,
    pub git_commit: String,
    pub cpu_model: String,
    pub weights: String,
    pub setting: String,
    pub tally: Tally,
    /// What happened when, seconds from the start of the measured run.
    pub events: Vec<(f64, String)>,
    pub checks: Vec<Check>,
}

impl DrillReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub fn markdown(&self) -> String {
        let t = &self.tally;
        let mut s = format!("## Drill `{:?}`\n\n", self.drill).to_lowercase();
        s.push_str(&format!(
            "{}\n\nCPU: {}; weights: {}; commit {}; {}\n\n",
            self.setting, self.cpu_model, self.weights, self.git_commit, self.timestamp_utc
        ));
        s.push_str("| sent | succeeded | failed | p50 ms | p99 ms | tok/s | wrong token counts |\n");
        s.push_str("|---:|---:|---:|---:|---:|---:|---:|\n");
        s.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} |\n\n",
            t.sent,
            t.succeeded,
            t.failed(),
            t.p50_ms,
            t.p99_ms,
            t.tokens_per_s,
            t.wrong_token_counts
        ));
        if !t.failed_by_cause.is_empty() {
            s.push_str("| failed by cause | requests |\n|---|---:|\n");
            for (c, n) in &t.failed_by_cause {
                s.push_str(&format!("| {} | {n} |\n", c.label.replace('|', "\\|")));
            }
            s.push('\n');
        }
        if !self.events.is_empty() {
            s.push_str("Events (seconds from the start of the measured run):\n\n");
            for (at, e) in &self.events {
                s.push_str(&format!("- {at:.2} s: {e}\n"));
            }
            s.push('\n');
        }
        s.push_str("| check | result | seen |\n|---|---|---|\n");
        for c in &self.checks {
            s.push_str(&format!(
                "| {} | {} | {} |\n",
                c.what,
                if c.passed { "PASS" } else { "FAIL" },
                c.seen.replace('|', "\\|")
            ));
        }
        s
    }
}

/// Everything a drill needs.
pub struct Drills {
    pub args: DrillArgs,
    pub programs: Programs,
    /// A fresh directory for this invocation's clusters.
    pub work: PathBuf,
    /// Where the replicas' weights come from, in words (SYNTHETIC ones named so).
    pub weights: String,
}

/// `gpt2 serve`'s batch and queue flags.
fn serve_flags(max_batch: usize, max_queue: usize) -> Vec<String> {
    vec![
        "--max-batch".into(),
        max_batch.to_string(),
        "--max-queue".into(),
        max_queue.to_string(),
    ]
}

/// The drills' engine settings: room for every client, so only the fault
/// can fail a request.
fn roomy_flags(concurrency: usize) -> Vec<String> {
    serve_flags(concurrency, 4 * concurrency)
}

impl Drills {
    fn spec(&self, replicas: usize, cores: usize, serve_flags: Vec<String>) -> ClusterSpec {
        ClusterSpec {
            replicas,
            cores_per_replica: cores,
            weights: self.args.weights.clone(),
            drain_seconds: 2.0,
            grace_seconds: 30.0,
            serve_flags,
        }
    }

    fn start(&self, name: &str, spec: &ClusterSpec) -> Result<Cluster, String> {
        eprintln!(
            "drill: starting {} replica(s) x {} core(s) behind HAProxy ({name})",
            spec.replicas, spec.cores_per_replica
        );
        Cluster::start(spec, &self.programs, &self.work.join(name))
    }

    /// A closed-loop load of the drill's requests: `requests_per_level` at
    /// each of `levels`, after `single_requests` alone.
    fn load(&self, levels: Vec<usize>, requests_per_level: usize, single_requests: usize) -> Load {
        Load {
            levels,
            requests_per_level,
            single_requests,
            max_new_tokens: self.args.max_new_tokens,
            request_rate: None,
            deadline: self.args.request_deadline,
        }
    }

    /// Runs `load` on `cluster` to its end (within `limit`): its report.
    fn run_load(&self, cluster: &Cluster, load: &Load, limit: Duration) -> Result<Report, String> {
        let child = spawn_load(&self.programs, cluster, load, self.args.weights.as_deref())?;
        finish_load(child, limit, &cluster.state)
    }

    /// Requests per second at the drill's concurrency, from a short run.
    fn calibrate(&self, cluster: &Cluster, c: usize) -> Result<f64, String> {
        let load = self.load(vec![c], 2 * c, 1);
        let limit = Duration::from_secs_f64(self.args.request_deadline * 4.0 + 120.0);
        let report = self.run_load(cluster, &load, limit)?;
        let test = report
            .tests
            .iter()
            .find(|t| t.concurrency == c)
            .ok_or("the calibration run has no concurrent test")?;
        if test.failed > 0 || test.requests_per_s <= 0.0 {
            let mut causes: Vec<&str> = test.raw.iter().filter_map(|r| r.error.as_deref()).collect();
            causes.sort_unstable();
            causes.dedup();
            return Err(format!(
                "the calibration run (no fault) had {} failed requests of {} ({}): the cluster is not healthy",
                test.failed,
                test.requests,
                causes.join("; ")
            ));
        }
        eprintln!(
            "drill: calibration: {:.2} requests/s, {:.1} tok/s at concurrency {c}",
            test.requests_per_s, test.tokens_per_s
        );
        Ok(test.requests_per_s)
    }

    fn measured_load(&self, rate: f64, request_rate: Option<f64>) -> Load {
        let c = self.args.concurrency;
        let wanted = (rate * self.args.duration).ceil() as usize;
        Load {
            request_rate,
            ..self.load(vec![c], wanted.max(2 * c), 1)
        }
    }

    fn report(&self, drill: DrillKind, setting: String, run: Finished) -> DrillReport {
        DrillReport {
            drill,
            timestamp_utc: meta::utc_timestamp(SystemTime::now(), true),
            git_commit: meta::git_commit(),
            cpu_model: meta::cpu_model(),
            weights: self.weights.clone(),
            setting,
            tally: run.tally,
            events: run.events,
            checks: run.checks,
        }
    }

    fn setting(&self, what: &str, serve: &[String]) -> String {
        format!(
            "{what}: {} replicas x 1 core behind HAProxy (leastconn), `gpt2 serve {}`, `throughput --url` at \
             concurrency {}, streaming, {} tokens per request, deadline {} s per request",
            self.args.replicas,
            serve.join(" "),
            self.args.concurrency,
            self.args.max_new_tokens,
            self.args.request_deadline
        )
    }

    /// SIGTERM each replica in turn, each time waiting until it is back.
    pub fn rolling(&self) -> Result<DrillReport, String> {
        let serve = roomy_flags(self.args.concurrency);
        let cluster = self.start("rolling", &self.spec(self.args.replicas, 1, serve.clone()))?;
        let rate = self.calibrate(&cluster, self.args.concurrency)?;
        let load = self.measured_load(rate, None);
        let mut run = self.measure(&cluster, &load, |cluster, ev, checks| {
            std::thread::sleep(Duration::from_secs_f64(self.args.duration * 0.15));
            for i in 0..cluster.spec.replicas {
                let old = cluster.signal(i, "TERM")?;
                ev.note(format!("SIGTERM to replica {i} (pid {old})"));
                let new = cluster.wait_back(i, old, Duration::from_secs(120))?;
                ev.note(format!("replica {i} back: pid {new}, healthy, UP in HAProxy"));
                checks.push(serves_again(cluster, i, new, ev));
            }
            Ok(())
        })?;
        run.checks.insert(0, none_failed(&run.tally, "no request failed"));
        Ok(self.report(DrillKind::Rolling, self.setting("rolling restart", &serve), run))
    }

    /// SIGKILL one replica mid-run.
    pub fn crash(&self) -> Result<DrillReport, String> {
        let serve = roomy_flags(self.args.concurrency);
        let capacity = 5 * self.args.concurrency;
        let cluster = self.start("crash", &self.spec(self.args.replicas, 1, serve.clone()))?;
        let rate = self.calibrate(&cluster, self.args.concurrency)?;
        let load = self.measured_load(rate, None);
        let mut held = 0.0;
        let mut run = self.measure(&cluster, &load, |cluster, ev, checks| {
            std::thread::sleep(Duration::from_secs_f64(self.args.duration * 0.3));
            let page = cluster
                .get(&cluster.replica_url(0, "/metrics"))
                .map(|g| g.body)
                .unwrap_or_default();
            held = metric_sum(&page, "gpt2_requests_in_flight", &[]);
            let old = cluster.signal(0, "KILL")?;
            let killed = Instant::now();
            ev.note(format!(
                "SIGKILL to replica 0 (pid {old}), holding {held} requests a moment before"
            ));
            let down = cluster.wait_for("HAProxy takes replica 0 out", Duration::from_secs(30), || {
                cluster.lb_status(0).ok().filter(|s| s.starts_with("DOWN"))
            })?;
            let detect = killed.elapsed();
            ev.note(format!("HAProxy: replica 0 {down}"));
            checks.push(Check {
                what: "HAProxy takes the dead replica out within its check interval (1 s)".into(),
                passed: detect <= Duration::from_millis(1_250),
                seen: format!("DOWN {:.0} ms after the kill", detect.as_secs_f64() * 1e3),
            });
            let new = cluster.wait_back(0, old, Duration::from_secs(120))?;
            ev.note(format!("replica 0 back: pid {new}, healthy, UP in HAProxy"));
            checks.push(serves_again(cluster, 0, new, ev));
            Ok(())
        })?;
        // What HAProxy did with the connections the dead replica refused.
        let field = |name: &str| {
            cluster
                .lb_field(0, name)
                .ok()
                .flatten()
                .unwrap_or_else(|| "?".into())
        };
        run.events.push((
            run.events.last().map_or(0.0, |e| e.0),
            format!(
                "HAProxy's counters for replica 0: {} connection retries, {} requests redispatched to another \
                 replica",
                field("wretr"),
                field("wredis")
            ),
        ));
        let t = &run.tally;
        let cut = t.failed_where(|c| matches!(c, Cause::StreamCut | Cause::Connection | Cause::Status(502)));
        run.checks.insert(
            0,
            Check {
                what: format!(
                    "only requests the killed replica held fail (cut streams, broken connections, HAProxy's \
                     502 for an answer that never came; at most its capacity {capacity})"
                ),
                passed: cut == t.failed() && t.failed() <= capacity,
                seen: format!(
                    "{} failed ({cut} cut); it held {held} a moment before the kill",
                    t.failed()
                ),
            },
        );
        run.checks.insert(
            1,
            Check {
                what: "every other request succeeds".into(),
                passed: t.succeeded + t.failed() == t.sent && t.succeeded > 0,
                seen: format!("{} of {} succeeded", t.succeeded, t.sent),
            },
        );
        Ok(self.report(DrillKind::Crash, self.setting("crash", &serve), run))
    }

    /// Arrivals at 4x the cluster's rate into small queues.
    pub fn overload(&self) -> Result<DrillReport, String> {
        let c = self.args.concurrency;
        // Each replica holds max_batch + max_queue requests; concurrency is
        // 4x the replicas' queues (and 2x what they hold in all).
        let queue = (c / (4 * self.args.replicas)).max(1);
        let serve = serve_flags(queue, queue);
        let cluster = self.start("overload", &self.spec(self.args.replicas, 1, serve.clone()))?;
        // The rate it serves with every batch slot busy. Not at max_batch +
        // max_queue per replica: a client sends its next request as soon as
        // it has read the last one's end, before the replica has freed that
        // slot, so a full calibration drew an occasional 429 (twice in CI
        // runs on a loaded machine). The queue's room absorbs that here, and
        // a full batch serves the same rate.
        let rate = self.calibrate(&cluster, queue * self.args.replicas)?;
        let offered = 4.0 * rate;
        let mut load = self.measured_load(offered, Some(offered));
        load.requests_per_level = load.requests_per_level.max(4 * c);
        let mut run = self.measure(&cluster, &load, |_, ev, _| {
            ev.note(format!(
                "arrivals at {offered:.2} requests/s (4x the {rate:.2}/s measured), concurrency {c} = 4 x \
                 {} replicas x --max-queue {queue}",
                self.args.replicas
            ));
            Ok(())
        })?;
        let t = &run.tally;
        let by_429 = t.failed_where(|c| c == Cause::Status(429));
        run.checks.insert(
            0,
            Check {
                what: "the excess gets the replicas' 429 through HAProxy".into(),
                passed: by_429 > 0 && by_429 == t.failed(),
                seen: format!("{by_429} got 429, of {} failed", t.failed()),
            },
        );
        run.checks.insert(
            1,
            Check {
                what: "nothing is lost: sent = succeeded + failed by status".into(),
                passed: t.sent == t.succeeded + t.failed() && t.succeeded > 0,
                seen: format!("{} = {} + {}", t.sent, t.succeeded, t.failed()),
            },
        );
        Ok(self.report(DrillKind::Overload, self.setting("overload", &serve), run))
    }

    /// Issue 31's hostile clients while the ordinary load runs ([`abuse`]).
    pub fn abuse(&self) -> Result<DrillReport, String> {
        let (c, r) = (self.args.concurrency, self.args.replicas);
        // Each replica holds its share of the ordinary clients and of the
        // non-readers, no more: a slot the attack keeps shows as a 429.
        let share = c.div_ceil(r) + self.args.non_readers.div_ceil(r);
        let serve = serve_flags(share, share);
        let cluster = self.start("abuse", &self.spec(r, 1, serve.clone()))?;
        let models = cluster.get(&format!("{}/v1/models", cluster.lb_url()))?;
        let model = serde_json::from_str::<serde_json::Value>(&models.body)
            .ok()
            .and_then(|v| v["data"][0]["id"].as_str().map(String::from))
            .ok_or_else(|| format!("/v1/models lists no model: {}", models.body))?;
        let context = match &self.args.weights {
            Some(dir) => {
                gpt2::config::Gpt2Config::from_file(&dir.join("config.json"))
                    .map_err(|e| e.to_string())?
                    .n_positions
            }
            None => 1024,
        };
        let attack = abuse::Attack {
            flood_clients: self.args.flood_clients,
            flood_seconds: self.args.flood_seconds,
            slowloris: self.args.slowloris,
            non_readers: self.args.non_readers,
            non_reader_tokens: context.saturating_sub(8).clamp(1, 1000),
        };
        let rate = self.calibrate(&cluster, c)?;
        let load = self.measured_load(rate, None);
        let mut run = self.measure(&cluster, &load, |cluster, ev, checks| {
            std::thread::sleep(Duration::from_secs_f64(self.args.duration * 0.1));
            let (_, found) = abuse::attack(cluster, &model, &attack, ev)?;
            checks.extend(found);
            Ok(())
        })?;
        run.checks.insert(
            0,
            none_failed(
                &run.tally,
                "no ordinary request failed (no 429, no timeout, no error)",
            ),
        );
        let what = format!(
            "abuse ({} flooders of {}-digit prompts through HAProxy for {} s, {} slowloris connections over HAProxy \
             and the replicas, {} non-reading streams of {} tokens to the replicas)",
            attack.flood_clients,
            abuse::FLOOD_PROMPT_CHARS,
            attack.flood_seconds,
            attack.slowloris,
            attack.non_readers,
            attack.non_reader_tokens
        );
        Ok(self.report(DrillKind::Abuse, self.setting(&what, &serve), run))
    }

    /// Runs `load` while `faults` acts on the cluster, then checks that
    /// the faults fell inside the run and that no token count was wrong.
    fn measure(
        &self,
        cluster: &Cluster,
        load: &Load,
        faults: impl FnOnce(&Cluster, &mut Events, &mut Vec<Check>) -> Result<(), String>,
    ) -> Result<Finished, String> {
        eprintln!(
            "drill: measured run: {} requests at concurrency {}",
            load.requests_per_level + load.single_requests,
            load.levels[0]
        );
        let mut child = spawn_load(&self.programs, cluster, load, self.args.weights.as_deref())?;
        let mut events = Events::start();
        let mut checks = Vec::new();
        let acted = faults(cluster, &mut events, &mut checks);
        let still_running = matches!(child.try_wait(), Ok(None));
        if let Err(e) = acted {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        events.note("the drill's actions are done".into());
        let limit = Duration::from_secs_f64(self.args.duration * 6.0 + self.args.request_deadline + 120.0);
        let report = finish_load(child, limit, &cluster.state)?;
        events.note("the run ended".into());
        let tally = Tally::of(&report);
        checks.push(Check {
            what: "the faults fell inside the measured run".into(),
            passed: still_running,
            seen: if still_running {
                "the run was still going when they were done".into()
            } else {
                "the run had ended before the faults were done: raise --duration".into()
            },
        });
        checks.push(Check {
            what: "no token count is wrong".into(),
            passed: tally.wrong_token_counts == 0,
            seen: format!("{} wrong", tally.wrong_token_counts),
        });
        Ok(Finished {
            tally,
            events: events.into_list(),
            checks,
        })
    }
}

/// One layout of the scale sweep.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Layout {
    pub replicas: usize,
    pub cores_per_replica: usize,
}

impl Layout {
    pub fn name(&self) -> String {
        format!(
            "{} x {} core{}",
            self.replicas,
            self.cores_per_replica,
            if self.cores_per_replica == 1 { "" } else { "s" }
        )
    }
}

/// The scale sweep: per layout and concurrency, tok/s and p50 latency
/// (medians over the repetitions).
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    pub timestamp_utc: String,
    pub git_commit: String,
    pub cpu_model: String,
    pub weights: String,
    pub setting: String,
    pub layouts: Vec<Layout>,
    pub levels: Vec<usize>,
    /// `[layout][level]`: (tok/s, p50 latency ms), medians.
    pub cells: Vec<Vec<(f64, f64)>>,
    /// Every repetition's cells, in the order they ran.
    pub runs: Vec<(usize, Vec<(f64, f64)>)>,
    pub failed_requests: usize,
}

impl ScaleReport {
    pub fn markdown(&self) -> String {
        let mut s = format!(
            "## Scale-out through HAProxy\n\n{}\n\nCPU: {}; weights: {}; commit {}; {}\n\n",
            self.setting, self.cpu_model, self.weights, self.git_commit, self.timestamp_utc
        );
        s.push_str("| concurrency |");
        for l in &self.layouts {
            s.push_str(&format!(" {0} tok/s | {0} p50 ms |", l.name()));
        }
        s.push_str(" 2x1 / 1x1 tok/s | 2x1 / 1x2 tok/s |\n|---:|");
        s.push_str(&"---:|---:|".repeat(self.layouts.len()));
        s.push_str("---:|---:|\n");
        for (j, level) in self.levels.iter().enumerate() {
            s.push_str(&format!("| {level} |"));
            for cells in &self.cells {
                s.push_str(&format!(" {:.1} | {:.0} |", cells[j].0, cells[j].1));
            }
            let tok = |k: usize| self.cells[k][j].0;
            let ratio = |a: f64, b: f64| {
                if b > 0.0 {
                    format!("{:.2}x", a / b)
                } else {
                    "-".into()
                }
            };
            s.push_str(&format!(
                " {} | {} |\n",
                ratio(tok(1), tok(0)),
                ratio(tok(1), tok(2))
            ));
        }
        s.push_str(&format!(
            "\n{} requests failed in all (any failure makes the sweep exit 3).\n",
            self.failed_requests
        ));
        s
    }
}

impl Drills {
    /// 1 and 2 one-core replicas and one two-core replica, each at every level.
    pub fn scale(&self) -> Result<ScaleReport, String> {
        let layouts = [
            Layout {
                replicas: 1,
                cores_per_replica: 1,
            },
            Layout {
                replicas: 2,
                cores_per_replica: 1,
            },
            Layout {
                replicas: 1,
                cores_per_replica: 2,
            },
        ];
        let mut levels = self.args.scale_levels.clone();
        levels.retain(|&l| l >= 1);
        levels.push(1);
        levels.sort_unstable();
        levels.dedup();
        let concurrent: Vec<usize> = levels.iter().copied().filter(|&l| l > 1).collect();
        let top = levels.last().copied().unwrap_or(1);
        let serve = roomy_flags(top);
        let reps = self.args.scale_repetitions.max(1);
        let mut runs = Vec::new();
        let mut failed = 0;
        for rep in 0..reps {
            for k in 0..layouts.len() {
                let which = (k + rep) % layouts.len();
                let l = layouts[which];
                let spec = self.spec(l.replicas, l.cores_per_replica, serve.clone());
                let name = format!("scale-{}x{}-rep{rep}", l.replicas, l.cores_per_replica);
                let cluster = self.start(&name, &spec)?;
                let load = self.load(concurrent.clone(), self.args.scale_requests, 4);
                let report = self.run_load(&cluster, &load, Duration::from_secs(3600))?;
                drop(cluster);
                let cells: Vec<(f64, f64)> = levels
                    .iter()
                    .map(|&lv| {
                        report
                            .tests
                            .iter()
                            .find(|t| t.concurrency == lv)
                            .map_or((0.0, 0.0), |t| (t.tokens_per_s, t.latency_ms.p50))
                    })
                    .collect();
                failed += report.tests.iter().map(|t| t.failed).sum::<usize>();
                eprintln!("drill: {}: {:?}", l.name(), cells);
                runs.push((which, cells));
            }
        }
        let cells = medians(&runs, layouts.len(), levels.len());
        Ok(ScaleReport {
            timestamp_utc: meta::utc_timestamp(SystemTime::now(), true),
            git_commit: meta::git_commit(),
            cpu_model: meta::cpu_model(),
            weights: self.weights.clone(),
            setting: format!(
                "`gpt2 serve {}` replicas pinned to their cores behind HAProxy (leastconn); `throughput --url` \
                 closed loop, streaming, {} tokens per request, {} requests per level (4 at concurrency 1); \
                 medians of {reps} repetition(s), the layouts' order rotating",
                serve.join(" "),
                self.args.max_new_tokens,
                self.args.scale_requests
            ),
            layouts: layouts.to_vec(),
            levels,
            cells,
            runs,
            failed_requests: failed,
        })
    }
}

/// Per layout and level, the median (by [`stats::quantile`]) of every
/// run's tok/s and of its p50 latency; `runs` are (layout, cells by level).
fn medians(runs: &[(usize, Vec<(f64, f64)>)], layouts: usize, levels: usize) -> Vec<Vec<(f64, f64)>> {
    let median = |layout: usize, level: usize, f: fn(&(f64, f64)) -> f64| {
        let mut v: Vec<f64> = runs
            .iter()
            .filter(|(w, _)| *w == layout)
            .map(|(_, cells)| f(&cells[level]))
            .collect();
        v.sort_by(f64::total_cmp);
        stats::quantile(&v, 0.5)
    };
    (0..layouts)
        .map(|k| {
            (0..levels)
                .map(|j| (median(k, j, |c| c.0), median(k, j, |c| c.1)))
                .collect()
        })
        .collect()
}

/// Runs the drill `args` names; the reports go to stdout and `--out-dir`.
/// Returns whether every check passed.
pub fn run(args: DrillArgs) -> Result<bool, Box<dyn std::error::Error>> {
    if args.replicas == 0 || args.concurrency == 0 || args.max_new_tokens == 0 {
        return Err("--replicas, --concurrency and --max-new-tokens must be at least 1".into());
    }
    if args.flood_clients > 64 || args.slowloris > 10_000 || args.non_readers > 64 {
        return Err("--flood-clients and --non-readers: at most 64; --slowloris: at most 10000".into());
    }
    for (flag, v) in [
        ("--duration", args.duration),
        ("--request-deadline", args.request_deadline),
        ("--flood-seconds", args.flood_seconds),
    ] {
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            return Err(
                format!("{flag} must be a number of seconds above 0 and at most 86400, not {v}").into(),
            );
        }
    }
    let weights = match &args.weights {
        Some(dir) => {
            let config = gpt2::config::Gpt2Config::from_file(&dir.join("config.json"))?;
            WeightsSource::Local { dir: dir.clone() }.describe(config.synthetic.as_ref())
        }
        None => WeightsSource::Synthetic {
            preset: "124m".into(),
            seed: gpt2_hub::SYNTHETIC_SEED,
        }
        .to_string(),
    };
    gpt2::files::check_writable_dir(&args.out_dir)?;
    let programs = Programs::beside_current_exe()?;
    let work = std::env::temp_dir().join(format!(
        "gpt2-drill-{}-{}",
        std::process::id(),
        meta::utc_timestamp(SystemTime::now(), false)
    ));
    let drills = Drills {
        args,
        programs,
        work,
        weights,
    };
    let stamp = meta::utc_timestamp(SystemTime::now(), false);
    let write = |name: &str, md: String, json: String| -> Result<(), Box<dyn std::error::Error>> {
        println!("{md}");
        let paths =
            gpt2_bench::run::write_set(&drills.args.out_dir, &format!("drill_{name}_{stamp}"), |_| {
                vec![
                    ("md", md.clone().into_bytes()),
                    ("json", json.clone().into_bytes()),
                ]
            })?;
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        eprintln!("wrote {}", names.join(", "));
        Ok(())
    };
    let kinds = match drills.args.drill {
        DrillKind::All => vec![DrillKind::Rolling, DrillKind::Crash, DrillKind::Overload],
        k => vec![k],
    };
    let mut passed = true;
    for kind in kinds {
        if kind == DrillKind::Scale {
            let r = drills.scale()?;
            passed &= r.failed_requests == 0;
            write("scale", r.markdown(), serde_json::to_string_pretty(&r)?)?;
            continue;
        }
        let r = match kind {
            DrillKind::Rolling => drills.rolling(),
            DrillKind::Crash => drills.crash(),
            DrillKind::Abuse => drills.abuse(),
            _ => drills.overload(),
        }?;
        passed &= r.passed();
        let name = format!("{kind:?}").to_lowercase();
        write(&name, r.markdown(), serde_json::to_string_pretty(&r)?)?;
    }
    eprintln!("drill: logs of the clusters in {}", drills.work.display());
    Ok(passed)
}

/// The measured run's outcome, before the drill's own checks.
struct Finished {
    tally: Tally,
    events: Vec<(f64, String)>,
    checks: Vec<Check>,
}

/// The check that every request of a run was sent and none failed.
fn none_failed(t: &Tally, what: &str) -> Check {
    Check {
        what: what.into(),
        passed: t.failed() == 0 && t.sent > 0,
        seen: format!("{} of {} failed", t.failed(), t.sent),
    }
}

/// Whether HAProxy routes to replica `i` again once it is back: its new
/// process (`pid`) answers completion requests within 10 s.
fn serves_again(cluster: &Cluster, i: usize, pid: u32, ev: &mut Events) -> Check {
    let served = cluster.wait_for("", Duration::from_secs(10), || {
        let n = completions(cluster, i);
        (n > 0.0).then_some(n)
    });
    if served.is_ok() {
        ev.note(format!("replica {i} (pid {pid}) answers requests again"));
    }
    Check {
        what: format!("HAProxy routes to replica {i} again after its restart"),
        passed: served.is_ok() && cluster.pid(i) == Ok(pid),
        seen: match served {
            Ok(n) => format!("its new process (pid {pid}) had answered {n} completion requests"),
            Err(_) => format!("its new process (pid {pid}) answered none within 10 s"),
        },
    }
}

/// Completion requests replica `i`'s current process has answered (any status).
fn completions(cluster: &Cluster, i: usize) -> f64 {
    let page = cluster
        .get(&cluster.replica_url(i, "/metrics"))
        .map(|g| g.body)
        .unwrap_or_default();
    metric_sum(&page, "gpt2_requests_total", &["route=\"/v1/completions\""])
}
