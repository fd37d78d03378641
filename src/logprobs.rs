//! Log-probabilities of tokens under the model: the numbers evaluation
//! harnesses and perplexity read.
//!
//! Every log-probability here is the **raw model's**: `log_softmax` of the
//! logits row the forward pass produced, before any logit bias, penalty,
//! temperature, top-k or top-p (vLLM's default, `raw_logprobs`). So a token's
//! number is the same whatever sampling parameters were used, and scoring a
//! text (`echo` with `max_tokens: 0`) measures the model, not the sampler.
//!
//! The sums run in f64 with `libm`'s `exp` and `log` (not the platform's C
//! library), so a row gives the same bits on every machine.

/// OpenAI's bound on the alternatives per token (`logprobs` ≤ 20), as vLLM's.
pub const MAX_LOGPROBS: usize = 20;

/// One token's log-probability and the most likely alternatives at its
/// position.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    /// The token that was sampled (or, for a prompt, that came next).
    pub token: u32,
    /// `log p(token)` under the raw model.
    pub logprob: f32,
    /// The `top` most likely tokens with their log-probabilities, most
    /// likely first (lower id first on ties). The token itself is in it
    /// only if it is among them.
    pub top: Vec<(u32, f32)>,
}

/// `log_softmax(logits)[token]` and the `top` most likely tokens of the row.
///
/// `logits` is one row (length V) of finite values and `token < V`; a row
/// holding NaN gives NaN, not a panic.
pub fn token_logprob(logits: &[f32], token: u32, top: usize) -> TokenLogprob {
    let lse = log_sum_exp(logits);
    let at = |id: u32| (f64::from(logits[id as usize]) - lse) as f32;
    TokenLogprob {
        token,
        logprob: at(token),
        top: top_tokens(logits, top)
            .into_iter()
            .map(|id| (id, at(id)))
            .collect(),
    }
}

/// `log(sum(exp(x)))` of a row, with its maximum subtracted first.
pub fn log_sum_exp(logits: &[f32]) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    if !max.is_finite() {
        return f64::from(max);
    }
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&x| libm::exp(f64::from(x) - max)).sum();
    max + libm::log(sum)
}

/// The ids of the `n` largest logits, largest first, lower id first on ties.
/// One pass that keeps a sorted list of at most `n` (n ≤ 20 here): each
/// value is compared with the smallest kept one first, so most cost one
/// compare.
fn top_tokens(logits: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(logits.len());
    let mut kept: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    if n == 0 {
        return Vec::new();
    }
    for (id, &x) in logits.iter().enumerate() {
        // Ids rise, so an equal value never displaces a kept one.
        if kept.len() == n && x <= kept[n - 1].0 {
            continue;
        }
        let at = kept.partition_point(|&(y, _)| y >= x);
        kept.insert(at, (x, id as u32));
        kept.truncate(n);
    }
    kept.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a direct computation: exp of the log-probabilities sums to
    /// one, each is the logit minus the log-normaliser, and the top list is
    /// the sorted order with ties by id.
    #[test]
    fn matches_a_direct_log_softmax() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&x| f64::from(x).exp()).sum();
        for t in 0..5u32 {
            let lp = token_logprob(&logits, t, 3);
            let want = (f64::from(logits[t as usize]) - z.ln()) as f32;
            assert!((lp.logprob - want).abs() < 1e-6, "{t}: {} vs {want}", lp.logprob);
            let ids: Vec<u32> = lp.top.iter().map(|p| p.0).collect();
            assert_eq!(ids, [1, 3, 0]);
        }
        let total: f64 = (0..5u32)
            .map(|t| f64::from(token_logprob(&logits, t, 0).logprob).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    /// Large logits do not overflow, and `top` past V is all of V.
    #[test]
    fn stable_and_bounded() {
        let logits = [1000.0f32, 999.0];
        let lp = token_logprob(&logits, 1, 20);
        assert!((lp.logprob - (-(1.0 + (-1.0f64).exp()).ln() - 1.0) as f32).abs() < 1e-5);
        assert_eq!(lp.top.len(), 2);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
    }
}
