//! What a drill saw: the clients' [`Tally`] of one measured run (their
//! failures grouped by the typed cause each request's record carries), the
//! drill's [`Check`]s and its [`Events`]. The benchmark's own figures are
//! read as the benchmark computes them: failures by `RequestRecord::cause`,
//! percentiles by `stats::summarize`.

use std::time::Instant;

use serde::Serialize;

use gpt2_bench::failure::{Cause, Failure, Said};
use gpt2_bench::{stats, Report};

/// One check of a drill: what was required, whether it held, what was seen.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub what: String,
    pub passed: bool,
    pub seen: String,
}

/// What the clients of one measured run saw.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Tally {
    pub sent: usize,
    pub succeeded: usize,
    /// Failures grouped by cause, most frequent first.
    pub failed_by_cause: Vec<(Group, usize)>,
    /// Latency of the successful requests, ms (percentiles as the
    /// benchmark's: [`stats::summarize`]).
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub tokens_per_s: f64,
    /// Requests whose token count was not the one asked for.
    pub wrong_token_counts: usize,
}

impl Tally {
    pub fn failed(&self) -> usize {
        self.failed_where(|_| true)
    }

    /// Failures whose cause `of` accepts.
    pub fn failed_where(&self, of: impl Fn(Cause) -> bool) -> usize {
        self.failed_by_cause
            .iter()
            .filter(|(g, _)| of(g.cause))
            .map(|(_, n)| n)
            .sum()
    }

    /// Every request of every test of `report` (the warmup is not in it).
    pub fn of(report: &Report) -> Tally {
        let mut t = Tally::default();
        let mut latencies = Vec::new();
        let (mut tokens, mut seconds) = (0usize, 0.0);
        for test in &report.tests {
            tokens += test.total_tokens;
            seconds += test.duration_s;
            for r in &test.raw {
                t.sent += 1;
                let group = match (&r.cause, &r.error) {
                    (None, None) if r.generated_tokens == report.metadata.max_new_tokens => {
                        t.succeeded += 1;
                        latencies.push(r.latency_ms);
                        continue;
                    }
                    (Some(f), _) => Group::of(f),
                    // A report written before causes were recorded.
                    (None, Some(e)) => Group::other(e),
                    (None, None) => Group::wrong_count(),
                };
                if group.cause == Cause::WrongCount {
                    t.wrong_token_counts += 1;
                }
                count(&mut t.failed_by_cause, group);
            }
        }
        most_first(&mut t.failed_by_cause, |g| &g.label);
        let latency = stats::summarize(&latencies);
        (t.p50_ms, t.p99_ms) = (latency.p50, latency.p99);
        t.tokens_per_s = if seconds > 0.0 {
            tokens as f64 / seconds
        } else {
            0.0
        };
        t
    }
}

/// Adds one `key` to `counts`.
pub(crate) fn count<K: PartialEq>(counts: &mut Vec<(K, usize)>, key: K) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

/// Sorts `counts` most frequent first, ties by `name`.
pub(crate) fn most_first<K>(counts: &mut [(K, usize)], name: impl Fn(&K) -> &str) {
    counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| name(&a.0).cmp(name(&b.0))));
}

/// Failures of one kind, as the drill counts them: their [`Cause`] (what
/// the checks read) and how the table names them (what the JSON writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub cause: Cause,
    pub label: String,
}

impl Serialize for Group {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.label)
    }
}

impl Group {
    /// A request's failure as a group to count by: the HTTP status with the
    /// server's words, a cut stream, a timeout, a connection that failed, a
    /// stream past the client's bounds, or a wrong token count; anything
    /// else by its own words.
    pub fn of(f: &Failure) -> Group {
        let cause = f.cause();
        let label = match (f, cause) {
            (Failure::HttpStatus { status, said }, _) => status_label(*status, said),
            (_, Cause::WrongCount) => return Group::wrong_count(),
            (_, Cause::Deadline) => "timeout (request deadline passed)".into(),
            (_, Cause::TimedOut) => "timeout (no answer in time)".into(),
            (_, Cause::StreamCut) => "stream cut mid-response".into(),
            (_, Cause::Connection) => "connection failed".into(),
            // The client's bounds on a stream (`throughput --url`): the kind.
            (_, Cause::PastBound) => format!("stream past its bounds ({})", f.bound().unwrap_or_default()),
            (_, Cause::Status(_) | Cause::Other) => return Group::other(&f.to_string()),
        };
        Group { cause, label }
    }

    /// A failure known only by its words: the first 80 characters.
    fn other(error: &str) -> Group {
        Group {
            cause: Cause::Other,
            label: error.chars().take(80).collect(),
        }
    }

    fn wrong_count() -> Group {
        Group {
            cause: Cause::WrongCount,
            label: "wrong token count".into(),
        }
    }
}

/// An HTTP status as a group: with the server's words to the last whole
/// word within 72 characters, or naming a proxy's error page.
fn status_label(status: u16, said: &Said) -> String {
    if matches!(said, Said::Body(b) if b.starts_with("<html>")) {
        // Not the server's JSON error but a proxy's page (HAProxy's
        // 502: the replica died before it answered).
        return format!("HTTP {status} (the proxy's error page)");
    }
    let words = said.to_string();
    if words.is_empty() {
        return format!("HTTP {status}");
    }
    let mut message: String = words.chars().take(72).collect();
    if message.len() < words.len() {
        if let Some(cut) = message.rfind(' ') {
            message.truncate(cut);
            message.push_str(" ...");
        }
    }
    format!("HTTP {status} ({message})")
}

/// Events stamped with their time since the measured run began.
pub struct Events {
    start: Instant,
    list: Vec<(f64, String)>,
}

impl Events {
    /// No events yet; the clock starts now.
    pub fn start() -> Events {
        Events {
            start: Instant::now(),
            list: Vec::new(),
        }
    }

    /// Notes `what`, stamped, and says it on stderr.
    pub fn note(&mut self, what: String) {
        let at = self.start.elapsed().as_secs_f64();
        eprintln!("drill: {at:.2} s: {what}");
        self.list.push((at, what));
    }

    /// Every event noted, in order.
    pub fn into_list(self) -> Vec<(f64, String)> {
        self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_group_by_cause() {
        let label = |f: Failure| Group::of(&f).label;
        let status = |status, said| Failure::HttpStatus { status, said };
        let message = |m: &str| Said::Message(m.into());
        assert_eq!(
            label(status(429, message("the server is full: 4 requests in flight"))),
            "HTTP 429 (the server is full: 4 requests in flight)"
        );
        assert_eq!(
            label(status(429, message(&"word ".repeat(30)))),
            format!("HTTP 429 ({}...)", "word ".repeat(14))
        );
        assert_eq!(label(status(503, Said::Nothing)), "HTTP 503");
        assert_eq!(
            label(status(
                502,
                Said::Body("<html><body><h1>502 Bad Gateway</h1> The server returned an invalid".into())
            )),
            "HTTP 502 (the proxy's error page)"
        );
        let short = Failure::Short {
            tokens: 3,
            asked: 16,
            stop: "length".into(),
        };
        assert_eq!(label(short), "wrong token count");
        assert_eq!(
            label(Failure::CompletionMiscount {
                usage: 15,
                chunks: 16
            }),
            "wrong token count"
        );
        let reset = Failure::StreamBroke {
            events: 5,
            error: "connection reset".into(),
        };
        assert_eq!(label(reset), "stream cut mid-response");
        let error = |e: &str| e.to_string();
        assert_eq!(
            label(Failure::TimedOut {
                error: error("timeout: global")
            }),
            "timeout (no answer in time)"
        );
        assert_eq!(
            label(Failure::Connection {
                error: error("io: Connection refused (os error 111)")
            }),
            "connection failed"
        );
        assert_eq!(
            label(Failure::Connection {
                error: error("io: Peer disconnected")
            }),
            "connection failed"
        );
        assert_eq!(
            label(Failure::TooManyEvents { limit: 12, asked: 4 }),
            "stream past its bounds (too many events)"
        );
        assert_eq!(
            label(Failure::Deadline { seconds: 6.1 }),
            "timeout (request deadline passed)"
        );
    }
}
