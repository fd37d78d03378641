//! How long one request to a server may take in all (`throughput --url`):
//! `--request-deadline`, or by default a time of the request's size. Its own
//! module because two places read the rule: the HTTP client applies it, and
//! a [`crate::failure::Failure::Deadline`] explains it.

use std::time::Duration;

/// The default deadline of a request ([`default_deadline`]): time per
/// token asked for, and per prompt token, on top of `--http-timeout`.
pub const DEADLINE_PER_TOKEN: Duration = Duration::from_secs(1);
pub const DEADLINE_PER_PROMPT_TOKEN: Duration = Duration::from_millis(10);

/// The longest deadline a request may have (`--request-deadline` and the default alike).
pub const MAX_DEADLINE: Duration = Duration::from_secs(86_400);

/// The longest a request of `prompt_tokens` asking for `max_tokens` may
/// take when `--request-deadline` is not given: `timeout` (the silence the
/// server may keep before its answer begins) + 1 s per token asked for +
/// 10 ms per prompt token. Generous for any server that makes progress (a
/// 124M model on two cores streams tens of tokens a second), and a bound on
/// one that trickles bytes, each within `timeout`, forever.
/// At most [`MAX_DEADLINE`], as `--request-deadline`.
pub fn default_deadline(timeout: Duration, prompt_tokens: usize, max_tokens: usize) -> Duration {
    let times = |d: Duration, n: usize| d.saturating_mul(u32::try_from(n).unwrap_or(u32::MAX));
    timeout
        .saturating_add(times(DEADLINE_PER_TOKEN, max_tokens))
        .saturating_add(times(DEADLINE_PER_PROMPT_TOKEN, prompt_tokens))
        .min(MAX_DEADLINE)
}
