//! A `gpt2 serve` child process on an ephemeral loopback port, and an HTTP
//! client for it. The guard kills and reaps the process on drop, also when
//! a test fails.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Long enough for a slow, shared machine; only turns a hang into a failure.
pub const PATIENCE: Duration = Duration::from_secs(120);

pub struct ServerProcess {
    child: Child,
    pub base: String,
    stderr: Arc<Mutex<Vec<String>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ServerProcess {
    /// Starts `gpt2 serve --port 0 ARGS` with `envs` and waits for its
    /// "listening on" line (the weights may still be loading).
    pub fn start(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gpt2"));
        cmd.args(["serve", "--port", "0"])
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("GPT2_API_KEY")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn gpt2 serve");
        let pipe = child.stderr.take().expect("stderr is piped");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let lines = Arc::clone(&stderr);
        // Drains stderr for the whole run, so the server never blocks on it.
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.split("listening on http://").nth(1) {
                    let _ = tx.send(addr.trim().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let mut server = ServerProcess {
            child,
            base: String::new(),
            stderr,
            reader: Some(reader),
        };
        match rx.recv_timeout(PATIENCE) {
            Ok(addr) => server.base = format!("http://{addr}"),
            Err(_) => panic!("no `listening on` line; stderr:\n{}", server.stderr()),
        }
        server
    }

    /// Starts it and waits until `/health` says the model is loaded.
    pub fn ready(args: &[&str], envs: &[(&str, &str)]) -> Self {
        let server = Self::start(args, envs);
        wait_healthy(&server.base);
        server
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits up to `patience` for the server's stderr to hold `text` (it is
    /// read by a thread, so a line written a moment ago may not be there yet).
    pub fn stderr_contains_within(&self, text: &str, patience: Duration) -> bool {
        let start = Instant::now();
        while !self.stderr().contains(text) {
            if start.elapsed() > patience {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits for the process to exit (killing it past the patience).
    pub fn wait(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return status;
            }
            if start.elapsed() > PATIENCE {
                let _ = self.child.kill();
                panic!("the server did not exit; stderr:\n{}", self.stderr());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// A client that returns 4xx/5xx responses instead of errors.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(PATIENCE))
        .build()
        .into()
}

/// Polls `/health` until it is 200.
pub fn wait_healthy(base: &str) {
    let agent = agent();
    let start = Instant::now();
    loop {
        if let Ok(r) = agent.get(format!("{base}/health")).call() {
            if r.status() == 200 {
                return;
            }
        }
        assert!(start.elapsed() < PATIENCE, "{base}/health never became 200");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A response's status and body parsed as JSON (`Null` if it is not JSON).
pub struct Reply {
    pub status: u16,
    pub text: String,
    pub json: serde_json::Value,
}

/// POSTs `body` as JSON to `url`.
pub fn post_json(url: &str, body: &serde_json::Value) -> Reply {
    post_raw(url, "application/json", &body.to_string())
}

pub fn post_raw(url: &str, content_type: &str, body: &str) -> Reply {
    let r = agent()
        .post(url)
        .header("Content-Type", content_type)
        .send(body)
        .expect("the request gets a response");
    reply(r)
}

pub fn get(url: &str, key: Option<&str>) -> Reply {
    let mut req = agent().get(url);
    if let Some(k) = key {
        req = req.header("Authorization", format!("Bearer {k}"));
    }
    reply(req.call().expect("the request gets a response"))
}

fn reply(mut r: ureq::http::Response<ureq::Body>) -> Reply {
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().expect("read the body");
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
    Reply { status, text, json }
}

/// A streamed completion: its `data:` payloads in order, up to `[DONE]`.
pub struct Streamed {
    pub status: u16,
    pub chunks: Vec<serde_json::Value>,
    pub done: bool,
}

impl Streamed {
    /// The chunks of generated tokens (all but the last, which has the finish reason).
    pub fn token_chunks(&self) -> &[serde_json::Value] {
        &self.chunks[..self.chunks.len().saturating_sub(1)]
    }

    pub fn text(&self) -> String {
        self.chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect()
    }

    pub fn last(&self) -> &serde_json::Value {
        self.chunks.last().expect("at least one chunk")
    }
}

/// POSTs a streaming request; `after_headers` runs once the response has
/// started, before the body is read.
pub fn stream(url: &str, body: &serde_json::Value, after_headers: impl FnOnce()) -> Streamed {
    let r = agent()
        .post(url)
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .expect("the request gets a response");
    let status = r.status().as_u16();
    after_headers();
    let mut text = String::new();
    r.into_body()
        .into_reader()
        .read_to_string(&mut text)
        .expect("read the stream");
    parse_sse(status, &text)
}

pub fn parse_sse(status: u16, text: &str) -> Streamed {
    let mut out = Streamed {
        status,
        chunks: Vec::new(),
        done: false,
    };
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        assert!(!out.done, "data after [DONE]: {data}");
        if data == "[DONE]" {
            out.done = true;
        } else {
            out.chunks
                .push(serde_json::from_str(data).unwrap_or_else(|e| panic!("chunk {data:?}: {e}")));
        }
    }
    out
}

/// The value of one sample line (`name{labels} value` or `name value`) in a
/// Prometheus text exposition; `None` if absent.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}
