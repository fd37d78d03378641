//! Progress for long runs (`throughput --full`, `soak`, `fuzz_loader`).
//!
//! On a terminal, an `indicatif` bar on stderr with the latest status line as
//! its message. Anywhere else (CI, a redirect, a pipe), no bar: each status
//! line is printed to stderr as it comes, exactly as before there was a bar,
//! so logs stay greppable.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A count of `total` steps, drawn as a bar only when stderr is a terminal.
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// `what` names the unit counted ("requests", "levels", "cases").
    pub fn new(total: u64, what: &str) -> Self {
        Self::with_bar(std::io::stderr().is_terminal(), total, what)
    }

    /// As [`Progress::new`], with the terminal test made by the caller.
    pub fn with_bar(bar: bool, total: u64, what: &str) -> Self {
        if !bar {
            return Progress { bar: None };
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let template = format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {what} {{msg}}");
        if let Ok(style) = ProgressStyle::with_template(&template) {
            pb.set_style(style.progress_chars("=> "));
        }
        Progress { bar: Some(pb) }
    }

    /// Whether a bar is drawn (false: status lines go to stderr as they are).
    pub fn is_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Counts `n` more steps done.
    pub fn inc(&self, n: u64) {
        if let Some(pb) = &self.bar {
            pb.inc(n);
        }
    }

    /// A status line: the bar's message on a terminal, else a line on stderr.
    pub fn status(&self, line: &str) {
        match &self.bar {
            Some(pb) => pb.set_message(line.to_string()),
            None => eprintln!("{line}"),
        }
    }

    /// A line that must stay on screen (a failure, a result): printed above
    /// the bar on a terminal, else a line on stderr.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(pb) => pb.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar (nothing to do without one).
    pub fn finish(&self) {
        if let Some(pb) = &self.bar {
            pb.finish_and_clear();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
