//! Picking the next token from one row of logits (length V, the vocabulary).
//!
//! The steps run in the order of vLLM's sampler (v1, `vllm/v1/sample/sampler.py`:
//! logit bias, then its penalties, then greedy or random sampling):
//! 1. logit bias (OpenAI's `logit_bias`), added to the logits;
//! 2. repetition penalty (HF's, CTRL-style), over the whole history;
//! 3. frequency and presence penalties (OpenAI's), over the generated tokens
//!    only: `logit[j] -= c[j] * frequency + (c[j] > 0) * presence`;
//! 4. argmax (temperature 0), or temperature, top-k, top-p (the order of
//!    Hugging Face transformers' logits warpers), softmax and one draw.
//!
//! Steps 1 to 3 change the logits, so they steer greedy decoding too. The bias
//! comes first because it is the caller's edit of the model's distribution,
//! which the penalties then act on. The multiplicative repetition penalty
//! comes before the additive ones, so that frequency and presence shift the
//! final logit by exactly their OpenAI amount instead of being scaled by the
//! repetition penalty. When no bias or penalty is set, steps 1 to 3 cost
//! nothing and change no bit: greedy reads the caller's row.
//!
//! Randomness comes only from the sampler's own seeded [`Rng`] (`crate::rng`,
//! whose draws for a seed are pinned by a test), so a seed gives the same
//! tokens on every machine.
//!
//! A [`Sampler`] belongs to one request, like the KV cache: it keeps its RNG
//! state and its work buffers between tokens, so sampling allocates only
//! while they grow: on the first call, and (with penalties) the few times the
//! history outgrows them, never per token.

use std::cmp::Ordering;
use std::fmt;

use crate::error::{Error, Invalid, Result};
use crate::rng::Rng;

/// How to pick the next token. `temperature == 0` means greedy (argmax,
/// first index on ties); top-k and top-p are then ignored.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before the softmax; `>= 0` and finite, 0 = greedy.
    pub temperature: f32,
    /// Keep only the `k` largest logits (`k >= 1`). Exactly `k` are kept: on
    /// equal logits the lower token id wins, as in [`argmax`], so `top_k = 1`
    /// is greedy. (HF keeps every token tied with the k-th.)
    pub top_k: Option<usize>,
    /// Nucleus sampling, in (0, 1]: keep the smallest set of most likely
    /// tokens whose probability adds up to at least `top_p`, never fewer
    /// than one. Probabilities are those after temperature and top-k.
    pub top_p: Option<f32>,
    /// CTRL-style penalty, `> 0` and finite, as in HF: for every token that is
    /// already in the history, a logit `> 0` is divided by it and any other
    /// is multiplied by it. A token is penalised once however often it
    /// occurs. Values above 1 discourage repetition. Applied after the logit
    /// bias, to the biased logit.
    pub repetition_penalty: Option<f32>,
    /// OpenAI's presence penalty, in [-2, 2] (0 = off): subtracted once from
    /// the logit of every token that occurs among the generated tokens.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty, in [-2, 2] (0 = off): subtracted from the
    /// logit of every token once per occurrence among the generated tokens.
    pub frequency_penalty: f32,
    /// OpenAI's `logit_bias`: (token id, bias in [-100, 100]) added to that
    /// token's logit, before any penalty: -100 in effect bans the token, 100
    /// in effect forces it. An id listed twice gets both biases. Ids are
    /// checked against the vocabulary at the door
    /// ([`Request::prepare`](crate::request::Request::prepare)); a sampler
    /// built directly refuses an id `>= V` when it samples.
    pub logit_bias: Vec<(u32, f32)>,
}

impl SamplingParams {
    /// Argmax decoding: no randomness, no penalty.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }

    /// Checks every parameter; the error names the parameter and its value.
    /// The one thing it cannot check is a `logit_bias` id against the
    /// vocabulary, which it does not know: [`Request::prepare`](crate::request::Request::prepare)
    /// does, and [`Sampler::sample`] answers [`Error::TokenId`] for one.
    pub fn validate(&self) -> Result<(), Invalid> {
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(Invalid::Temperature(t));
        }
        if self.top_k == Some(0) {
            return Err(Invalid::TopK(0));
        }
        if let Some(p) = self.top_p {
            // Written so that NaN fails too.
            let in_range = p > 0.0 && p <= 1.0;
            if !in_range {
                return Err(Invalid::TopP(p));
            }
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(Invalid::RepetitionPenalty(r));
            }
        }
        let penalty_range = |x: f32| (-2.0..=2.0).contains(&x);
        if !penalty_range(self.presence_penalty) {
            return Err(Invalid::PresencePenalty(self.presence_penalty));
        }
        if !penalty_range(self.frequency_penalty) {
            return Err(Invalid::FrequencyPenalty(self.frequency_penalty));
        }
        if let Some(&(id, bias)) = self.logit_bias.iter().find(|b| !(-100.0..=100.0).contains(&b.1)) {
            return Err(Invalid::LogitBiasValue { id, bias });
        }
        Ok(())
    }

    /// True when the next token is the argmax and no random number is drawn.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// True when a bias or penalty changes the logits before sampling.
    fn adjusts_logits(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.repetition_penalty.is_some()
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

impl Default for SamplingParams {
    /// Greedy, so that output is reproducible unless sampling is asked for.
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

/// A request's own sampler: parameters, a seeded RNG and a reusable buffer.
///
/// Each non-greedy [`sample`](Sampler::sample) draws exactly one number from
/// the RNG and greedy draws none, so the tokens of a request depend only on
/// its seed, its parameters and its logits, not on what else ran.
#[derive(Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    /// (V) at most: (token id, value). The value is first the (biased,
    /// penalised) logit, in f64 so that neither a penalty nor a tiny
    /// temperature can overflow it, then the token's unnormalised probability.
    candidates: Vec<(u32, f64)>,
    /// (history) The history's logits before the repetition penalty: HF's
    /// gather, so that the scatter penalises each token once.
    gathered: Vec<f64>,
    /// (generated tokens) Their sorted copy, whose runs count each token for
    /// the frequency and presence penalties.
    generated: Vec<u32>,
}

impl fmt::Debug for Sampler {
    // The buffer is V entries of scratch: not worth printing.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sampler")
            .field("params", &self.params)
            .field("rng", &self.rng)
            .finish_non_exhaustive()
    }
}

impl Sampler {
    /// A sampler whose random stream is fixed by `seed`. Fails if the
    /// parameters are invalid (see [`SamplingParams::validate`]).
    pub fn new(params: SamplingParams, seed: u64) -> Result<Self> {
        params.validate()?;
        Ok(Sampler::checked(params, seed))
    }

    /// A sampler for parameters already checked, by
    /// [`Request::prepare`](crate::request::Request::prepare).
    pub(crate) fn checked(params: SamplingParams, seed: u64) -> Self {
        Sampler {
            params,
            rng: Rng::new(seed),
            candidates: Vec::new(),
            gathered: Vec::new(),
            generated: Vec::new(),
        }
    }

    /// The parameters it was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token from `logits` (one row, length V). `history` is
    /// the tokens so far, the prompt's `history[..prompt_len]` then the
    /// generated ones: the repetition penalty reads all of it, the frequency
    /// and presence penalties the generated tokens only. The caller's logits
    /// are never modified.
    ///
    /// Errors: any NaN or infinite logit (even when greedy), an empty row,
    /// `prompt_len > history.len()`, a `logit_bias` id `>= V`, or, with a
    /// penalty that reads it, a history token id `>= V`.
    pub fn sample(&mut self, logits: &[f32], history: &[u32], prompt_len: usize) -> Result<u32> {
        check_logits(logits)?;
        let adjusted = self.adjust(logits, history, prompt_len)?;
        let params = &self.params;
        let cands = &mut self.candidates;

        if params.is_greedy() {
            // Without a bias or penalty there is nothing to copy: argmax reads
            // the row.
            return Ok(if adjusted {
                argmax_candidates(cands)
            } else {
                argmax(logits)
            });
        }
        if !adjusted {
            fill(cands, logits);
        }

        if let Some(k) = params.top_k {
            if k < cands.len() {
                // O(V) instead of sorting all V logits.
                cands.select_nth_unstable_by(k - 1, by_rank);
                cands.truncate(k);
                // select_nth leaves the k in an order that std may change
                // between versions; the draw walks them in a fixed one.
                cands.sort_unstable_by(by_rank);
            }
        }

        // Softmax with the max subtracted; the values are finite (checked, and
        // adjusted in f64), so `value - max` is finite and <= 0, and dividing
        // by even the smallest positive f32 temperature stays finite in f64.
        // libm, not std: std's exp calls the platform's C library, whose last
        // bit can differ between systems, and with it a sampled token.
        let max = cands.iter().map(|c| c.1).fold(f64::NEG_INFINITY, f64::max);
        let temperature = f64::from(params.temperature);
        let mut total = 0.0;
        for c in cands.iter_mut() {
            c.1 = libm::exp((c.1 - max) / temperature);
            total += c.1;
        }
        // The max maps to exp(0) = 1, so `total >= 1`: no division by zero.

        if let Some(top_p) = params.top_p {
            // top_p = 1 keeps everything; HF skips the step too.
            if top_p < 1.0 {
                total = nucleus(cands, total, f64::from(top_p));
            }
        }

        let u = self.rng.next_f64();
        Ok(pick(cands, u * total))
    }

    /// Steps 1 to 3 of the module doc: when a bias or penalty is set, fills
    /// the candidates with the row and applies them, in that order, and
    /// returns true; otherwise touches nothing and returns false.
    fn adjust(&mut self, logits: &[f32], history: &[u32], prompt_len: usize) -> Result<bool> {
        let Some(generated) = history.get(prompt_len..) else {
            return Err(invalid(format!(
                "prompt_len {prompt_len} is past the history of {} tokens",
                history.len()
            )));
        };
        let params = &self.params;
        if !params.adjusts_logits() {
            return Ok(false);
        }
        let cands = &mut self.candidates;
        fill(cands, logits);
        apply_logit_bias(cands, &params.logit_bias)?;
        if let Some(penalty) = params.repetition_penalty {
            apply_repetition_penalty(cands, &mut self.gathered, history, f64::from(penalty))?;
        }
        let frequency = f64::from(params.frequency_penalty);
        let presence = f64::from(params.presence_penalty);
        if frequency != 0.0 || presence != 0.0 {
            apply_occurrence_penalties(cands, &mut self.generated, generated, frequency, presence)?;
        }
        Ok(true)
    }
}

/// Index of the largest value, first on ties (like `torch.argmax`).
///
/// `logits` must not be empty (checked in debug builds; release returns 0).
/// NaN never counts as larger, so check finiteness first where it matters,
/// as [`Sampler::sample`] does; a row of only NaN or -inf gives 0.
///
/// Scanned in 16 interleaved lanes, each keeping its own first maximum,
/// then the lanes and the tail compared (larger value, then lower index):
/// the answer of a scan from the front, in a loop that vectorises. A single
/// scan is a chain of dependent compares (60 µs over GPT-2's 50257 logits,
/// paid per sequence per step).
pub fn argmax(logits: &[f32]) -> u32 {
    debug_assert!(!logits.is_empty(), "argmax of an empty slice");
    const LANES: usize = 16;
    let mut best = [f32::NEG_INFINITY; LANES];
    let mut at = [u32::MAX; LANES];
    let chunks = logits.chunks_exact(LANES);
    let tail = chunks.remainder();
    for (c, chunk) in chunks.enumerate() {
        for (l, &x) in chunk.iter().enumerate() {
            // Strict `>` keeps a lane's first of equal values.
            if x > best[l] {
                best[l] = x;
                at[l] = (c * LANES + l) as u32;
            }
        }
    }
    let tail_start = logits.len() - tail.len();
    let candidates = best.into_iter().zip(at).chain(
        tail.iter()
            .enumerate()
            .map(|(i, &x)| (x, (tail_start + i) as u32)),
    );
    let mut winner = (f32::NEG_INFINITY, u32::MAX);
    for (x, i) in candidates {
        // Only values a scan takes: above -inf (NaN never is).
        if x > winner.0 || (x == winner.0 && x > f32::NEG_INFINITY && i < winner.1) {
            winner = (x, i);
        }
    }
    if winner.1 == u32::MAX {
        0
    } else {
        winner.1
    }
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidArgument(msg.into())
}

/// Rejects rows that cannot be sampled from: empty, too long for u32 ids, or
/// holding a NaN or infinity (reported with the first such index).
fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(invalid("logits must not be empty"));
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(invalid(format!(
            "logits row has {} entries, more than u32 token ids can index",
            logits.len()
        )));
    }
    // Whether any value is NaN or infinite (all exponent bits set), without
    // stopping early, so that it vectorises; then the first such index.
    const EXPONENT: u32 = 0x7f80_0000;
    let any = logits
        .iter()
        .fold(false, |any, x| any | (x.to_bits() & EXPONENT == EXPONENT));
    if !any {
        return Ok(());
    }
    match logits.iter().position(|x| !x.is_finite()) {
        Some(index) => Err(Error::NonFiniteLogits {
            index,
            value: logits[index],
        }),
        None => Ok(()),
    }
}

/// Replaces `cands` with every token of the row, in token order.
fn fill(cands: &mut Vec<(u32, f64)>, logits: &[f32]) {
    cands.clear();
    // check_logits made sure every index fits in u32.
    cands.extend(logits.iter().enumerate().map(|(i, &x)| (i as u32, f64::from(x))));
}

/// The value of token `id`, where `cands` holds the whole row in token
/// order; an id past the row is an error, not a panic.
fn value_of(cands: &mut [(u32, f64)], id: u32) -> Result<&mut f64> {
    let vocab_size = cands.len();
    match cands.get_mut(id as usize) {
        Some(c) => Ok(&mut c.1),
        None => Err(Error::TokenId { id, vocab_size }),
    }
}

/// Adds each bias to its token's logit. `cands` holds the whole row in token
/// order.
fn apply_logit_bias(cands: &mut [(u32, f64)], bias: &[(u32, f32)]) -> Result<()> {
    for &(id, b) in bias {
        *value_of(cands, id)? += f64::from(b);
    }
    Ok(())
}

/// HF's repetition penalty: gathers the logit of every history token, then
/// scatters the penalised values, so a token that occurs several times is
/// penalised once. `cands` holds the whole row in token order; `gathered` is
/// a reused buffer.
fn apply_repetition_penalty(
    cands: &mut [(u32, f64)],
    gathered: &mut Vec<f64>,
    history: &[u32],
    penalty: f64,
) -> Result<()> {
    gathered.clear();
    for &id in history {
        gathered.push(*value_of(cands, id)?);
    }
    for (&id, &x) in history.iter().zip(gathered.iter()) {
        cands[id as usize].1 = if x < 0.0 { x * penalty } else { x / penalty };
    }
    Ok(())
}

/// OpenAI's frequency and presence penalties over the `generated` tokens:
/// `logit[j] -= c[j] * frequency + (c[j] > 0) * presence`, where c[j] counts
/// token j. `cands` holds the whole row in token order.
///
/// The counts come from sorting a reused copy of the generated tokens (at
/// most the context window, 1024 for GPT-2): O(G log G), a few microseconds,
/// beside the O(V) copy of the row that every adjusted call already makes. A
/// V-sized count array would have to be zeroed per token (200 KB for
/// GPT-2's 50257 tokens) or kept zero between calls by undoing each count.
fn apply_occurrence_penalties(
    cands: &mut [(u32, f64)],
    sorted: &mut Vec<u32>,
    generated: &[u32],
    frequency: f64,
    presence: f64,
) -> Result<()> {
    sorted.clear();
    sorted.extend_from_slice(generated);
    sorted.sort_unstable();
    for run in sorted.chunk_by(|a, b| a == b) {
        let id = run[0];
        let count = run.len() as f64;
        *value_of(cands, id)? -= count * frequency + presence;
    }
    Ok(())
}

/// First index of the largest value of `cands` (in token order).
fn argmax_candidates(cands: &[(u32, f64)]) -> u32 {
    let mut best = cands[0];
    for &c in &cands[1..] {
        if c.1 > best.1 {
            best = c;
        }
    }
    best.0
}

/// The order of top-k and top-p: larger value first, then lower token id. A
/// total order (ids are unique), so the kept set never depends on the sort.
fn by_rank(a: &(u32, f64), b: &(u32, f64)) -> Ordering {
    b.1.total_cmp(&a.1).then(a.0.cmp(&b.0))
}

/// How many of the most likely tokens `nucleus` sorts first. Sampling with
/// top-p usually keeps a small part of V, so a few O(V) selections of a
/// growing head are cheaper than sorting all 50257 entries.
const NUCLEUS_WINDOW: usize = 64;

/// Top-p: keeps the smallest prefix, in `by_rank` order, of the tokens in
/// `cands` (value = unnormalised probability, summing to `total`) whose
/// probability reaches `top_p`; all of them if rounding never gets there.
/// Leaves that prefix sorted in `cands` and returns its unnormalised mass,
/// summed in the order `pick` walks.
fn nucleus(cands: &mut Vec<(u32, f64)>, total: f64, top_p: f64) -> f64 {
    let n = cands.len();
    let mut window = NUCLEUS_WINDOW.min(n);
    loop {
        // The `window` most likely tokens, sorted, at the front. Those are the
        // front of the full sort, so the cut is the same as a full sort's.
        if window < n {
            cands.select_nth_unstable_by(window - 1, by_rank);
        }
        cands[..window].sort_unstable_by(by_rank);

        let mut cumulative = 0.0;
        let mut kept = 0.0;
        let mut cut = None;
        for (i, c) in cands[..window].iter().enumerate() {
            kept += c.1;
            cumulative += c.1 / total;
            if cumulative >= top_p {
                cut = Some(i + 1);
                break;
            }
        }
        if let Some(len) = cut {
            cands.truncate(len);
            return kept;
        }
        if window == n {
            return kept;
        }
        window = (window * 4).min(n);
    }
}

/// The token whose interval of the cumulative sum holds `target`, where
/// `target` is in `[0, sum of the values)`.
fn pick(cands: &[(u32, f64)], target: f64) -> u32 {
    let mut cumulative = 0.0;
    for &(id, weight) in cands {
        cumulative += weight;
        // Strict `<`: a token of probability 0 is never picked.
        if target < cumulative {
            return id;
        }
    }
    // `u * total` can round up to `total`: take the last token with any mass.
    cands.iter().rev().find(|c| c.1 > 0.0).map_or(cands[0].0, |c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: Option<usize>, top_p: Option<f32>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: None,
            ..SamplingParams::greedy()
        }
    }

    /// How often each token is drawn in `n` samples.
    fn counts(sampler: &mut Sampler, logits: &[f32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[sampler.sample(logits, &[], 0).unwrap() as usize] += 1;
        }
        counts
    }

    /// Logits whose softmax at temperature `t` is `probs`.
    fn logits_for(probs: &[f64], t: f64) -> Vec<f32> {
        probs.iter().map(|p| (p.ln() * t) as f32).collect()
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
        let e: Vec<f64> = logits.iter().map(|&x| ((x as f64 - max) / t).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|x| x / sum).collect()
    }

    fn invalid_message(p: SamplingParams) -> String {
        match p.validate().map_err(Error::from) {
            Err(Error::InvalidArgument(msg)) => msg,
            other => panic!("expected InvalidArgument for {p:?}, got {other:?}"),
        }
    }

    #[test]
    fn argmax_takes_first_of_ties() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[5.0]), 0);
        assert_eq!(argmax(&[-2.0, -1.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    /// The lane-wise argmax answers as a scan from the front does, on rows of
    /// every length around the lane width and the vocabulary's, with many
    /// ties (values from a small set), -inf and NaN, wherever they fall.
    #[test]
    fn argmax_matches_a_scan_from_the_front() {
        fn scan(x: &[f32]) -> u32 {
            let (mut best, mut value) = (0, f32::NEG_INFINITY);
            for (i, &v) in x.iter().enumerate() {
                if v > value {
                    (best, value) = (i, v);
                }
            }
            best as u32
        }
        let mut rng = Rng::new(3);
        let palette = [-1.0, 0.0, -0.0, 2.5, 2.5, f32::NEG_INFINITY, f32::NAN, 7.0];
        for len in (1..70).chain([50257, 50258]) {
            for _ in 0..20 {
                // Mostly low values, a few of the palette's larger ones.
                let row: Vec<f32> = (0..len)
                    .map(|_| {
                        let u = rng.next_f64();
                        if u < 0.9 {
                            palette[(u * 5.0) as usize % 2]
                        } else {
                            palette[(u * 80.0) as usize % palette.len()]
                        }
                    })
                    .collect();
                assert_eq!(argmax(&row), scan(&row), "{row:?}");
            }
            let mut only_low = vec![f32::NEG_INFINITY; len];
            only_low[len / 2] = f32::NAN;
            assert_eq!(argmax(&only_low), scan(&only_low));
        }
    }

    #[test]
    fn non_finite_logits_are_refused_at_the_first_index() {
        for len in [1, 15, 16, 17, 50257] {
            for at in [0, len / 2, len - 1] {
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    let mut row = vec![0.5f32; len];
                    row[at] = bad;
                    if at > 0 {
                        row[at - 1] = f32::MAX;
                    }
                    match check_logits(&row) {
                        Err(Error::NonFiniteLogits { index, .. }) => assert_eq!(index, at),
                        other => panic!("len {len} at {at} {bad}: {other:?}"),
                    }
                }
            }
            assert!(check_logits(&vec![f32::MAX; len]).is_ok());
        }
    }

    #[test]
    fn greedy_picks_argmax_and_draws_nothing() {
        let logits = [0.5, 2.0, -1.0, 2.0, 1.9];
        let mut s = Sampler::new(SamplingParams::greedy(), 7).unwrap();
        let rng_before = s.rng.clone();
        for _ in 0..10 {
            assert_eq!(s.sample(&logits, &[], 0).unwrap(), 1);
        }
        assert_eq!(s.rng, rng_before, "greedy must not consume random numbers");
        assert!(SamplingParams::default().is_greedy());
        assert_eq!(SamplingParams::default(), SamplingParams::greedy());
    }

    #[test]
    fn temperature_zero_ignores_top_k_and_top_p() {
        // top_k = 3 and top_p = 0.99 would leave tokens 0, 3, 4 to sample from.
        let logits = [2.0, -1.0, 0.0, 1.99, 1.98];
        let mut s = Sampler::new(params(0.0, Some(3), Some(0.99)), 1).unwrap();
        assert!(s.params().is_greedy());
        let rng_before = s.rng.clone();
        for _ in 0..200 {
            assert_eq!(s.sample(&logits, &[], 0).unwrap(), 0);
        }
        assert_eq!(s.rng, rng_before);
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        let logits = [0.1, 0.3, -0.2, 0.0, 0.25, 0.05, -0.1, 0.2];
        let p = params(1.0, None, None);
        let draw = |seed| {
            let mut s = Sampler::new(p.clone(), seed).unwrap();
            (0..100)
                .map(|_| s.sample(&logits, &[], 0).unwrap())
                .collect::<Vec<u32>>()
        };
        let a = draw(42);
        assert_eq!(a, draw(42));
        assert_ne!(a, draw(43));
        assert_ne!(a, draw(0));
        // Not a constant stream: several tokens show up.
        let mut seen = a.clone();
        seen.sort_unstable();
        seen.dedup();
        assert!(seen.len() >= 5, "only {seen:?} in 100 draws");
    }

    #[test]
    fn each_sample_draws_exactly_one_number() {
        let logits = [0.3, 1.0, -0.5, 0.8];
        for p in [
            params(1.0, None, None),
            params(0.7, Some(2), None),
            params(1.3, None, Some(0.6)),
            params(1.0, Some(1), None),
        ] {
            let mut s = Sampler::new(p.clone(), 99).unwrap();
            let mut expected = Rng::new(99);
            for _ in 0..25 {
                s.sample(&logits, &[], 0).unwrap();
                expected.next_u64();
            }
            assert_eq!(s.rng, expected, "{p:?}");
        }
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        // Ties too: token 1 and 2 are equal, the lower id wins as in argmax.
        let logits = [0.5, 2.0, 2.0, -1.0, 1.999];
        for t in [0.01, 0.5, 1.0, 10.0, 1000.0] {
            let mut s = Sampler::new(params(t, Some(1), None), 3).unwrap();
            for _ in 0..200 {
                assert_eq!(
                    s.sample(&logits, &[], 0).unwrap(),
                    argmax(&logits),
                    "temperature {t}"
                );
            }
        }
    }

    #[test]
    fn top_k_three_keeps_the_three_largest() {
        let logits = [0.0, 1.0, 0.8, -0.5, 0.9, 0.7, 0.2, 0.85];
        // The three largest: 1 (1.0), 4 (0.9), 7 (0.85).
        let mut s = Sampler::new(params(1.5, Some(3), None), 11).unwrap();
        let c = counts(&mut s, &logits, 2000);
        for (id, &n) in c.iter().enumerate() {
            if [1, 4, 7].contains(&id) {
                assert!(n > 0, "token {id} never drawn: {c:?}");
            } else {
                assert_eq!(n, 0, "token {id} is outside the top 3: {c:?}");
            }
        }
    }

    #[test]
    fn top_k_larger_than_vocab_keeps_everything() {
        let logits = [0.0, 0.1, 0.2];
        let mut s = Sampler::new(params(1.0, Some(1000), None), 5).unwrap();
        let c = counts(&mut s, &logits, 600);
        assert!(c.iter().all(|&n| n > 0), "{c:?}");
    }

    #[test]
    fn tiny_top_p_is_argmax() {
        let logits = [0.1, 0.3, 0.29, -0.2, 0.0];
        let mut s = Sampler::new(params(1.0, None, Some(1e-6)), 17).unwrap();
        for _ in 0..500 {
            assert_eq!(s.sample(&logits, &[], 0).unwrap(), 1);
        }
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_it() {
        // Probabilities 0.4, 0.3, 0.2, 0.1: 0.4 < 0.5 <= 0.7, so two are kept.
        let logits = logits_for(&[0.4, 0.3, 0.2, 0.1], 1.0);
        let mut s = Sampler::new(params(1.0, None, Some(0.5)), 23).unwrap();
        let c = counts(&mut s, &logits, 5000);
        assert_eq!((c[2], c[3]), (0, 0), "{c:?}");
        assert!(c[0] > 0 && c[1] > 0, "{c:?}");
        // Renormalised over the two kept: 0.4 / 0.7.
        let f0 = c[0] as f64 / 5000.0;
        assert!((f0 - 4.0 / 7.0).abs() < 0.03, "{c:?}");
    }

    #[test]
    fn top_k_then_top_p_then_temperature() {
        // At temperature 2 the probabilities are 0.45, 0.3, 0.15, 0.1.
        let logits = logits_for(&[0.45, 0.3, 0.15, 0.1], 2.0);

        // top_p alone at 0.8: cumulative 0.45, 0.75, 0.9 keeps three tokens.
        let mut s = Sampler::new(params(2.0, None, Some(0.8)), 31).unwrap();
        let c = counts(&mut s, &logits, 3000);
        assert!(c[0] > 0 && c[1] > 0 && c[2] > 0 && c[3] == 0, "{c:?}");

        // top_k = 3 first renormalises to 0.5, 0.333, 0.167, so top_p = 0.8
        // is reached after two tokens: top-k runs before top-p, as in HF.
        let mut s = Sampler::new(params(2.0, Some(3), Some(0.8)), 31).unwrap();
        let c = counts(&mut s, &logits, 3000);
        assert!(c[0] > 0 && c[1] > 0 && c[2] == 0 && c[3] == 0, "{c:?}");
        let f0 = c[0] as f64 / 3000.0;
        assert!((f0 - 0.6).abs() < 0.03, "0.5 / (0.5 + 0.333) expected, got {c:?}");

        // Temperature comes before top-p: at 0.5 the same logits give
        // probabilities proportional to p^4, and 0.45^4 alone is over 0.8.
        let mut s = Sampler::new(params(0.5, Some(3), Some(0.8)), 31).unwrap();
        let c = counts(&mut s, &logits, 500);
        assert_eq!(c[0], 500, "{c:?}");
    }

    #[test]
    fn frequencies_match_softmax() {
        let logits = [1.0, 2.0, 0.5, -1.0];
        let n = 20_000;
        for t in [0.8, 1.0, 2.5] {
            let expected = softmax(&logits, t as f64);
            let mut s = Sampler::new(params(t, None, None), 2024).unwrap();
            let c = counts(&mut s, &logits, n);
            for (id, (&got, want)) in c.iter().zip(&expected).enumerate() {
                let freq = got as f64 / n as f64;
                assert!(
                    (freq - want).abs() < 0.02,
                    "temperature {t}, token {id}: frequency {freq}, softmax {want}"
                );
            }
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_logits() {
        let logits = [1.0, 3.0, 2.0];
        let p = SamplingParams {
            repetition_penalty: Some(2.0),
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, 0).unwrap();
        assert_eq!(s.sample(&logits, &[], 0).unwrap(), 1);
        // 3 / 2 = 1.5 < 2.
        assert_eq!(s.sample(&logits, &[1], 0).unwrap(), 2);
        assert_eq!(logits, [1.0, 3.0, 2.0], "the caller's logits must not change");
        // The buffer is rebuilt each call: a history without token 1 restores it.
        assert_eq!(s.sample(&logits, &[0], 0).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_multiplies_negative_logits() {
        let logits = [-1.0, -0.5, -3.0];
        let p = SamplingParams {
            repetition_penalty: Some(4.0),
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, 0).unwrap();
        assert_eq!(s.sample(&logits, &[], 0).unwrap(), 1);
        // -0.5 * 4 = -2 < -1; dividing would have raised it to -0.125.
        assert_eq!(s.sample(&logits, &[1], 0).unwrap(), 0);
        assert_eq!(logits, [-1.0, -0.5, -3.0]);
    }

    #[test]
    fn repetition_penalty_applies_once_per_token() {
        let logits = [1.0, 3.0, 2.0];
        let p = SamplingParams {
            repetition_penalty: Some(1.4),
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, 0).unwrap();
        // Once: 3 / 1.4 = 2.14 > 2. Three times would be 3 / 1.4^3 = 1.09.
        assert_eq!(s.sample(&logits, &[1, 1, 1], 0).unwrap(), 1);
    }

    #[test]
    fn repetition_penalty_shapes_sampling() {
        let logits = [0.1, 5.0, 4.0, -10.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: Some(2),
            top_p: None,
            repetition_penalty: Some(100.0),
            ..SamplingParams::greedy()
        };
        // Token 1 falls to 0.05, below token 0: the top 2 become 2 and 0.
        // Token 3 rises to -1000, which changes nothing.
        let mut s = Sampler::new(p, 8).unwrap();
        let mut seen = [0usize; 4];
        for _ in 0..1000 {
            seen[s.sample(&logits, &[1, 3], 0).unwrap() as usize] += 1;
        }
        assert_eq!((seen[1], seen[3]), (0, 0), "{seen:?}");
        assert!(seen[0] > 0 && seen[2] > 0, "{seen:?}");
    }

    #[test]
    fn repetition_penalty_rejects_out_of_range_history() {
        let p = SamplingParams {
            repetition_penalty: Some(1.2),
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, 0).unwrap();
        match s.sample(&[0.0, 1.0, 2.0], &[0, 3], 0) {
            Err(Error::TokenId { id: 3, vocab_size: 3 }) => {}
            other => panic!("expected TokenId error, got {other:?}"),
        }
        // Without a penalty the history is not read.
        let mut s = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        assert_eq!(s.sample(&[0.0, 1.0, 2.0], &[0, 3], 0).unwrap(), 2);
    }

    #[test]
    fn invalid_params_name_the_parameter() {
        let g = SamplingParams::greedy;
        let cases = [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..g()
                },
                "temperature must be >= 0 and finite, got -1",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..g()
                },
                "temperature must be >= 0 and finite, got NaN",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..g()
                },
                "temperature must be >= 0 and finite, got inf",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..g()
                },
                "top_k must be at least 1, got 0",
            ),
            (
                SamplingParams {
                    top_p: Some(1.5),
                    ..g()
                },
                "top_p must be in (0, 1], got 1.5",
            ),
            (
                SamplingParams {
                    top_p: Some(0.0),
                    ..g()
                },
                "top_p must be in (0, 1], got 0",
            ),
            (
                SamplingParams {
                    top_p: Some(f32::NAN),
                    ..g()
                },
                "top_p must be in (0, 1], got NaN",
            ),
            (
                SamplingParams {
                    repetition_penalty: Some(0.0),
                    ..g()
                },
                "repetition_penalty must be > 0 and finite, got 0",
            ),
            (
                SamplingParams {
                    repetition_penalty: Some(-2.0),
                    ..g()
                },
                "repetition_penalty must be > 0 and finite, got -2",
            ),
            (
                SamplingParams {
                    repetition_penalty: Some(f32::INFINITY),
                    ..g()
                },
                "repetition_penalty must be > 0 and finite, got inf",
            ),
        ];
        for (p, want) in cases {
            assert_eq!(invalid_message(p.clone()), want);
            assert!(matches!(Sampler::new(p, 0), Err(Error::InvalidArgument(_))));
        }
        // The edges that are allowed.
        let ok = SamplingParams {
            temperature: 0.0,
            top_k: Some(1),
            top_p: Some(1.0),
            repetition_penalty: Some(1e-3),
            ..SamplingParams::greedy()
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn non_finite_logits_are_rejected_with_their_index() {
        let cases: [(&[f32], usize); 4] = [
            (&[0.0, 1.0, f32::NAN, 2.0], 2),
            (&[f32::INFINITY, 1.0], 0),
            (&[0.0, 1.0, 2.0, f32::NEG_INFINITY], 3),
            (&[0.0, f32::NAN, f32::INFINITY], 1),
        ];
        for p in [SamplingParams::greedy(), params(1.0, Some(2), Some(0.9))] {
            let mut s = Sampler::new(p, 0).unwrap();
            for (logits, want) in cases {
                match s.sample(logits, &[], 0) {
                    Err(Error::NonFiniteLogits { index, value }) => {
                        assert_eq!(index, want);
                        assert_eq!(value.to_bits(), logits[want].to_bits());
                    }
                    other => panic!("expected NonFiniteLogits at {want}, got {other:?}"),
                }
            }
        }
    }

    #[test]
    fn empty_logits_are_rejected() {
        let mut s = Sampler::new(params(1.0, None, None), 0).unwrap();
        assert!(matches!(s.sample(&[], &[], 0), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn extreme_values_stay_finite() {
        // A subnormal temperature: (x - max) / T is about -1e45 in f64, not
        // -inf or NaN, so sampling is greedy in effect.
        let logits = [1.0, 2.0, 1.5];
        let mut s = Sampler::new(params(1e-45, None, Some(0.9)), 4).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&logits, &[], 0).unwrap(), 1);
        }
        // Huge logits with a temperature near f32::MAX: close to uniform.
        let logits = [3e36, -3e36, 0.0];
        let mut s = Sampler::new(params(3e38, None, None), 4).unwrap();
        let c = counts(&mut s, &logits, 3000);
        assert!(c.iter().all(|&n| n > 500), "{c:?}");
        // A penalty that would overflow f32 (3e38 / 1e-3).
        let p = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: Some(1e-3),
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, 4).unwrap();
        assert_eq!(s.sample(&[0.0, 3e38, 3e38], &[2], 0).unwrap(), 2);
    }

    /// The row after steps 1 to 3 (bias, then the penalties), in token order.
    fn adjusted(p: SamplingParams, logits: &[f32], history: &[u32], prompt_len: usize) -> Vec<f64> {
        let mut s = Sampler::new(p, 0).unwrap();
        assert!(s.adjust(logits, history, prompt_len).unwrap());
        s.candidates.iter().map(|c| c.1).collect()
    }

    /// The greedy pick for `p` (made greedy) on `logits`.
    fn greedy_pick(p: &SamplingParams, logits: &[f32], history: &[u32], prompt_len: usize) -> u32 {
        let p = SamplingParams {
            temperature: 0.0,
            ..p.clone()
        };
        Sampler::new(p, 0)
            .unwrap()
            .sample(logits, history, prompt_len)
            .unwrap()
    }

    /// How often each token is drawn in `n` samples, with a history.
    fn counts_after(sampler: &mut Sampler, logits: &[f32], history: &[u32], n: usize) -> Vec<usize> {
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[sampler.sample(logits, history, 0).unwrap() as usize] += 1;
        }
        counts
    }

    #[test]
    fn logit_bias_adds_to_the_logits() {
        let logits = [1.0, 2.0, 0.5, 1.5];
        let p = SamplingParams {
            // Token 2 is named twice: both biases are added.
            logit_bias: vec![(2, 1.25), (1, -0.75), (2, 0.5)],
            ..SamplingParams::greedy()
        };
        // 1, 2 - 0.75, 0.5 + 1.25 + 0.5, 1.5.
        assert_eq!(adjusted(p.clone(), &logits, &[], 0), [1.0, 1.25, 2.25, 1.5]);
        assert_eq!(greedy_pick(&p, &logits, &[], 0), 2);
        assert_eq!(greedy_pick(&SamplingParams::greedy(), &logits, &[], 0), 1);
    }

    #[test]
    fn frequency_and_presence_penalties_follow_openai() {
        let logits = [1.0, 2.0, 0.5, 1.5];
        // Prompt [1]; generated: token 3 twice, token 0 once.
        let (history, prompt_len) = ([1, 3, 3, 0], 1);
        let p = |frequency_penalty, presence_penalty| SamplingParams {
            frequency_penalty,
            presence_penalty,
            ..SamplingParams::greedy()
        };
        // logit[j] -= c[j] * frequency + (c[j] > 0) * presence, c = [1, 0, 0, 2]:
        // token 1 is only in the prompt and keeps its 2.
        let cases = [
            ((0.5, 0.0), [0.5, 2.0, 0.5, 0.5]),
            ((0.0, 0.25), [0.75, 2.0, 0.5, 1.25]),
            ((0.5, 0.25), [0.25, 2.0, 0.5, 0.25]),
            // Negative values encourage repetition.
            ((-1.0, -0.5), [2.5, 2.0, 0.5, 4.0]),
        ];
        for ((f, pr), want) in cases {
            assert_eq!(
                adjusted(p(f, pr), &logits, &history, prompt_len),
                want,
                "f {f}, p {pr}"
            );
        }
        assert_eq!(greedy_pick(&p(-1.0, -0.5), &logits, &history, prompt_len), 3);
    }

    #[test]
    fn frequency_and_presence_count_generated_tokens_only() {
        let logits = [2.0, 1.75];
        for p in [
            SamplingParams {
                presence_penalty: 0.5,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                frequency_penalty: 0.5,
                ..SamplingParams::greedy()
            },
        ] {
            // Token 0 as the prompt: not penalised.
            assert_eq!(greedy_pick(&p, &logits, &[0], 1), 0, "{p:?}");
            // The same token generated: 2 - 0.5 = 1.5 < 1.75.
            assert_eq!(greedy_pick(&p, &logits, &[0], 0), 1, "{p:?}");
        }
        // The repetition penalty reads the prompt too: 2 / 2 = 1 < 1.75.
        let p = SamplingParams {
            repetition_penalty: Some(2.0),
            ..SamplingParams::greedy()
        };
        assert_eq!(greedy_pick(&p, &logits, &[0], 1), 1);
    }

    #[test]
    fn logit_bias_comes_before_the_repetition_penalty() {
        let logits = [-1.0, 0.25];
        let p = SamplingParams {
            logit_bias: vec![(0, 2.0)],
            repetition_penalty: Some(2.0),
            ..SamplingParams::greedy()
        };
        // (-1 + 2) / 2 = 0.5 > 0.25. The other order, -1 * 2 + 2 = 0, would
        // pick token 1.
        assert_eq!(adjusted(p.clone(), &logits, &[0, 0], 0), [0.5, 0.25]);
        assert_eq!(greedy_pick(&p, &logits, &[0, 0], 0), 0);
    }

    #[test]
    fn repetition_penalty_comes_before_frequency_and_presence() {
        let logits = [2.0, 0.25];
        for p in [
            SamplingParams {
                presence_penalty: 1.0,
                repetition_penalty: Some(2.0),
                ..SamplingParams::greedy()
            },
            SamplingParams {
                frequency_penalty: 1.0,
                repetition_penalty: Some(2.0),
                ..SamplingParams::greedy()
            },
        ] {
            // 2 / 2 - 1 = 0 < 0.25. The other order, (2 - 1) / 2 = 0.5, would
            // pick token 0.
            assert_eq!(adjusted(p.clone(), &logits, &[0], 0), [0.0, 0.25], "{p:?}");
            assert_eq!(greedy_pick(&p, &logits, &[0], 0), 1, "{p:?}");
        }
    }

    #[test]
    fn penalties_come_before_temperature_and_top_k() {
        // Token 1 generated twice at frequency 0.5: its logit falls to -1.
        let logits = [0.0; 4];
        let history = [1, 1];
        let p = SamplingParams {
            temperature: 2.0,
            frequency_penalty: 0.5,
            ..SamplingParams::greedy()
        };
        // At temperature 2 token 1 has e^-0.5 / (3 + e^-0.5) = 0.168; had the
        // penalty come after the temperature, e^-1 / (3 + e^-1) = 0.109.
        let n = 20_000;
        let mut s = Sampler::new(p.clone(), 77).unwrap();
        let c = counts_after(&mut s, &logits, &history, n);
        let f1 = c[1] as f64 / n as f64;
        let want = (-0.5f64).exp() / (3.0 + (-0.5f64).exp());
        assert!((f1 - want).abs() < 0.015, "{c:?}: {f1} against {want}");

        // top_k = 3 keeps 0, 2, 3: the penalty ranks token 1 last first (top-k
        // on the raw, equal logits would keep 0, 1, 2).
        let mut s = Sampler::new(SamplingParams { top_k: Some(3), ..p }, 77).unwrap();
        let c = counts_after(&mut s, &logits, &history, 3000);
        assert_eq!(c[1], 0, "{c:?}");
        assert!(c[0] > 0 && c[2] > 0 && c[3] > 0, "{c:?}");
    }

    #[test]
    fn logit_bias_bans_and_forces_under_sampling() {
        let logits = [3.0, 1.0, 0.5, -2.0];
        let sampled = |logit_bias| SamplingParams {
            temperature: 1.5,
            logit_bias,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(sampled(vec![(0, -100.0)]), 5).unwrap();
        let c = counts(&mut s, &logits, 5000);
        assert_eq!(c[0], 0, "-100 must ban token 0: {c:?}");
        assert!(c[1] > 0 && c[2] > 0 && c[3] > 0, "{c:?}");

        let mut s = Sampler::new(sampled(vec![(3, 100.0)]), 5).unwrap();
        let c = counts(&mut s, &logits, 5000);
        assert_eq!(c[3], 5000, "+100 must force token 3: {c:?}");

        assert_eq!(greedy_pick(&sampled(vec![(0, -100.0)]), &logits, &[], 0), 1);
        assert_eq!(greedy_pick(&sampled(vec![(3, 100.0)]), &logits, &[], 0), 3);
    }

    #[test]
    fn token_ids_past_the_row_are_errors() {
        let logits = [0.0, 1.0, 2.0];
        let bias = |id| SamplingParams {
            logit_bias: vec![(1, 1.0), (id, 1.0)],
            ..SamplingParams::greedy()
        };
        for (p, id) in [(bias(3), 3), (bias(u32::MAX), u32::MAX)] {
            for t in [0.0, 1.0] {
                let p = SamplingParams {
                    temperature: t,
                    ..p.clone()
                };
                let mut s = Sampler::new(p, 0).unwrap();
                match s.sample(&logits, &[], 0) {
                    Err(Error::TokenId {
                        id: got,
                        vocab_size: 3,
                    }) => assert_eq!(got, id),
                    other => panic!("expected TokenId {id}, got {other:?}"),
                }
            }
        }
        // A generated token past the row, with a penalty that counts it.
        for p in [
            SamplingParams {
                presence_penalty: 0.1,
                ..SamplingParams::greedy()
            },
            SamplingParams {
                frequency_penalty: -0.1,
                ..SamplingParams::greedy()
            },
        ] {
            let mut s = Sampler::new(p, 0).unwrap();
            assert!(matches!(
                s.sample(&logits, &[0, 1, 7], 1),
                Err(Error::TokenId { id: 7, vocab_size: 3 })
            ));
        }
        // A prompt longer than the history.
        let mut s = Sampler::new(SamplingParams::greedy(), 0).unwrap();
        match s.sample(&logits, &[0, 1], 3) {
            Err(Error::InvalidArgument(msg)) => {
                assert_eq!(msg, "prompt_len 3 is past the history of 2 tokens")
            }
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn unset_biases_and_penalties_change_nothing() {
        let logits = [0.1, 0.3, -0.2, 0.0, 0.25, 0.05, -0.1, 0.2];
        let history = [1, 1, 4, 4, 4, 7];
        for base in [
            SamplingParams::greedy(),
            params(1.0, None, None),
            params(0.8, Some(5), Some(0.9)),
        ] {
            let draw = |p: SamplingParams, history: &[u32]| {
                let mut s = Sampler::new(p, 42).unwrap();
                let tokens: Vec<u32> = (0..100).map(|_| s.sample(&logits, history, 2).unwrap()).collect();
                (tokens, s.rng)
            };
            let plain = draw(base.clone(), &history[..2]);
            // Explicit zeros (-0 too) skip the adjustment: the history is
            // not read, greedy argmax reads the row.
            let zeros = SamplingParams {
                presence_penalty: 0.0,
                frequency_penalty: -0.0,
                logit_bias: Vec::new(),
                ..base.clone()
            };
            assert!(!zeros.adjusts_logits());
            assert_eq!(draw(zeros, &history), plain, "{base:?}");
            // A bias of 0 takes the adjusted path and changes no bit.
            let zero_bias = SamplingParams {
                logit_bias: vec![(1, 0.0)],
                ..base.clone()
            };
            assert!(zero_bias.adjusts_logits());
            assert_eq!(draw(zero_bias, &history), plain, "{base:?}");
        }
    }

    /// The naive twin of `nucleus`: sort everything, cut the prefix.
    fn nucleus_reference(cands: &[(u32, f64)], total: f64, top_p: f64) -> Vec<u32> {
        let mut sorted = cands.to_vec();
        sorted.sort_by(by_rank);
        let mut cumulative = 0.0;
        let mut kept = Vec::new();
        for (id, w) in sorted {
            kept.push(id);
            cumulative += w / total;
            if cumulative >= top_p {
                break;
            }
        }
        kept
    }

    #[test]
    fn nucleus_matches_full_sort() {
        let mut rng = Rng::new(12345);
        for n in [1, 2, 5, 63, 64, 65, 300, 5000] {
            for flatness in [0.1, 1.0, 8.0] {
                // Weights exp(-flatness * u): flat ones need a nucleus far
                // larger than the first window. Some exact ties on purpose.
                let cands: Vec<(u32, f64)> = (0..n as u32)
                    .map(|i| {
                        let u = if i % 7 == 3 { 0.5 } else { rng.next_f64() };
                        (i, (-flatness * u * 10.0).exp())
                    })
                    .collect();
                let total: f64 = cands.iter().map(|c| c.1).sum();
                for top_p in [1e-9, 0.1, 0.5, 0.9, 0.999, 1.0] {
                    let want = nucleus_reference(&cands, total, top_p);
                    let mut got = cands.clone();
                    let kept = nucleus(&mut got, total, top_p);
                    let got_ids: Vec<u32> = got.iter().map(|c| c.0).collect();
                    assert_eq!(got_ids, want, "n {n}, flatness {flatness}, top_p {top_p}");
                    let sum: f64 = got.iter().map(|c| c.1).sum();
                    assert_eq!(kept, sum);
                }
            }
        }
    }

    #[test]
    fn pick_walks_the_cumulative_sum() {
        let cands = [(7, 0.25), (3, 0.0), (5, 0.5), (9, 0.25)];
        assert_eq!(pick(&cands, 0.0), 7);
        assert_eq!(pick(&cands, 0.2499), 7);
        // Token 3 has no mass: never picked, even at its boundary.
        assert_eq!(pick(&cands, 0.25), 5);
        assert_eq!(pick(&cands, 0.7499), 5);
        assert_eq!(pick(&cands, 0.75), 9);
        // Rounding past the end falls back to the last token with mass.
        assert_eq!(pick(&[(1, 0.5), (2, 0.5), (4, 0.0)], 1.0), 2);
    }
}
