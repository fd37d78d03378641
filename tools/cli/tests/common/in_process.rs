//! `gpt2_serve::serve` in-process, on its own tokio runtime thread, over a
//! synthetic checkpoint, with a step observer that can hold the engine
//! after each step: so a test can keep a request in flight (a slot taken,
//! a stream open) for as long as it needs. Stopped and joined on drop.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gpt2::scheduler::{StepObserver, StepStats};
use gpt2::tokenizer::Gpt2Tokenizer;
use gpt2::{Gpt2Model, Scheduler, SchedulerConfig};
use gpt2_serve::{Engine, ServeConfig};

use super::server::{self, metric, PATIENCE};

/// Holds the engine after each step while `held`.
#[derive(Debug, Default)]
struct Hold {
    /// The server's own observer, passed every step.
    inner: OnceLock<Arc<dyn StepObserver>>,
    held: Mutex<bool>,
    cv: Condvar,
}

impl Hold {
    fn set(&self, held: bool) {
        *self.held.lock().unwrap() = held;
        self.cv.notify_all();
    }
}

impl StepObserver for Hold {
    fn on_step(&self, step: &StepStats) {
        if let Some(inner) = self.inner.get() {
            inner.on_step(step);
        }
        let mut held = self.held.lock().unwrap();
        while *held {
            held = self.cv.wait(held).unwrap();
        }
    }
}

/// The checkpoint an [`InProcess`] server loads, and how it names it.
pub struct Checkpoint {
    /// The checkpoint's directory (loaded as f32).
    pub dir: PathBuf,
    /// The engine's `model_id`.
    pub model_id: &'static str,
    /// The engine's description of its weights.
    pub weights: &'static str,
}

/// `gpt2_serve::serve` on a synthetic checkpoint, on its own runtime
/// thread; stopped and joined on drop.
pub struct InProcess {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    hold: Arc<Hold>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl InProcess {
    /// Serves `checkpoint` with `config` and waits until it is healthy; its
    /// listener's send buffer set to `send_buffer` bytes (accepted sockets
    /// inherit it) when given.
    pub fn start(checkpoint: Checkpoint, config: ServeConfig, send_buffer: Option<u32>) -> Self {
        let Checkpoint {
            dir,
            model_id,
            weights,
        } = checkpoint;
        let hold = Arc::new(Hold::default());
        let engine_hold = Arc::clone(&hold);
        let load = move |mut sc: SchedulerConfig| {
            let model = Arc::new(Gpt2Model::load_with(&dir, gpt2::Dtype::F32)?);
            if let Some(inner) = sc.observer.take() {
                let _ = engine_hold.inner.set(inner);
            }
            sc.observer = Some(engine_hold as Arc<dyn StepObserver>);
            Ok(Engine {
                scheduler: Scheduler::new(model, sc)?,
                tokenizer: Gpt2Tokenizer::builtin(),
                model_id: model_id.into(),
                weights: weights.into(),
                synthetic: true,
            })
        };
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                if let Some(n) = send_buffer {
                    socket.set_send_buffer_size(n).unwrap();
                }
                socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
                let listener = socket.listen(64).unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                let stopped = async move {
                    let _ = stop_rx.await;
                };
                gpt2_serve::serve(listener, config, load, stopped).await.unwrap();
            });
            rt.shutdown_timeout(Duration::from_secs(5));
        });
        let addr = addr_rx.recv_timeout(PATIENCE).expect("the server binds");
        let server = InProcess {
            base: format!("http://{addr}"),
            hold,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        server::wait_healthy(&server.base);
        server
    }

    /// Holds the engine after each step (`true`) or lets it run (`false`).
    pub fn hold(&self, held: bool) {
        self.hold.set(held);
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The text of `/metrics`.
    pub fn metrics(&self) -> String {
        server::get(&self.url("/metrics"), None).text
    }

    /// One series of `/metrics`.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric(&self.metrics(), series)
    }

    /// Polls `/metrics` until `ok` holds; fails the test after `limit`.
    pub fn wait_for(&self, what: &str, limit: Duration, ok: impl Fn(&str) -> bool) {
        let start = Instant::now();
        loop {
            let m = self.metrics();
            if ok(&m) {
                return;
            }
            assert!(start.elapsed() < limit, "never {what} within {limit:?}:\n{m}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Signals the server to stop (its grace period starts) without
    /// waiting for it.
    pub fn signal_stop(&mut self) {
        self.stop.take().unwrap().send(()).unwrap();
    }

    /// Waits for the server's thread to end; a panic there fails the test.
    pub fn join(&mut self) {
        self.thread.take().unwrap().join().unwrap();
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.hold.set(false);
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
