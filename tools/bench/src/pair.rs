//! `throughput pair`: two variants of one benchmark measured in one call,
//! alternating, and their ratios: what a target comparing two settings
//! (n choices against as many requests; prefix reuse against none) is read
//! from. The project's rule for a ratio: both variants measured in the same
//! call, alternating, the ratio taken pair by pair and its median quoted.
//!
//! Each run is a whole `throughput` run ([`run::measure`]: its warmup, its
//! tests, in process or `--url`), of the common flags (after `--`) plus the
//! variant's own (`--a`, `--b`); pairs alternate their order (A B, B A, A B,
//! ...) so that a drift of the machine weighs on both alike. In process each
//! run loads its model and scheduler afresh: nothing one run cached (a
//! prefix) is seen by the next. Against a server, its caches persist: each
//! run's synthetic prompts get their own seed (`--prompt-seed` + the run's
//! number), so no run is sent another's prompts.
//!
//! A run's figures are its *headline* test's: the last test it ran (its
//! highest concurrency level in its last mode; the single request with
//! `--levels 1`), the median over its repetitions. The pair compares
//! tokens/s, TTFT p50 and latency p50 as A / B; the summary is each
//! ratio's median (min and max beside it) over the pairs. Every run's whole
//! report is kept in the JSON (`throughput_pair_<UTC>[_N].{json,md}`).
//!
//! # Issue 33's targets, one command each
//!
//! `n` choices against as many requests (`n: 8` of one 200-token prompt,
//! 30 tokens each, against the same 8 completions as 8 concurrent
//! requests; target: A's latency p50 / B's ≤ 0.6, i.e. tokens/s A / B ≥
//! 1.67). A's last test is its single test (one `n: 8` request at a time),
//! B's its level 8 (8 requests at once, one wave); every request has a
//! prompt of its own, so nothing but the choices shares a prefill:
//!
//! ```text
//! throughput pair --pairs 5 --a '--choices 8 --levels 1' --b '--levels 8' -- \
//!     --synthetic --mode batched --prompt-tokens 200 --max-new-tokens 30 \
//!     --warmup 1 --single-requests 2 --requests-per-level 8
//! ```
//!
//! Over HTTP, the same against one `gpt2 serve` (its prefix cache is
//! harmless: no two prompts share a token at their start): drop `--synthetic
//! --mode batched`, add `--url http://127.0.0.1:8080` to the common flags.
//!
//! Prefix reuse against none (a 512-token shared preamble, 16 different
//! 16-token suffixes at concurrency 4; target: TTFT p50 A / B ≤ 0.25 and
//! tokens/s A / B ≥ 1):
//!
//! ```text
//! throughput pair --pairs 5 --a '--prefix-cache-mib 256' --b '--prefix-cache-mib 0' -- \
//!     --synthetic --mode batched --shared-prefix-tokens 512 --prompt-tokens 16 \
//!     --levels 4 --requests-per-level 16 --max-new-tokens 30 --warmup 1 --single-requests 1
//! ```
//!
//! Over HTTP: two servers, `gpt2 serve --synthetic --port 8081
//! --prefix-cache-mib 256` and `... --port 8082 --prefix-cache-mib 0`, and
//! `--a '--url http://127.0.0.1:8081' --b '--url http://127.0.0.1:8082'`
//! with the same common flags less `--synthetic --mode batched`.

use std::error::Error;
use std::path::PathBuf;
use std::time::SystemTime;

use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser};
use serde::{Deserialize, Serialize};

use crate::run::{self, Options};
use crate::{meta, report, stats, Report, TestResult};

/// Bump when a field of [`PairReport`] changes meaning or disappears.
pub const PAIR_SCHEMA_VERSION: u32 = 1;

/// Most pairs one call may run (`--pairs`).
pub const MAX_PAIRS: usize = 100;

/// The `throughput pair` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PairOptions {
    /// Pairs of runs: each runs A and B once, A first in the first pair,
    /// B first in the second, and so on.
    #[arg(long, default_value_t = 5)]
    pub pairs: usize,
    /// A's own flags, added to the common ones: one string, split as a
    /// shell splits words (e.g. --a '--choices 8 --levels 1').
    #[arg(
        long = "a",
        value_name = "FLAGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub a: String,
    /// B's own flags, added to the common ones (e.g. --b '--choices 1 --levels 8').
    #[arg(
        long = "b",
        value_name = "FLAGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub b: String,
    /// Directory for the pair's JSON and Markdown
    /// (`throughput_pair_<UTC>[_N].{json,md}`, never over an earlier file).
    #[arg(long, default_value = "data/benchmarks")]
    pub out_dir: PathBuf,
    /// The flags both variants share: any `throughput` flags, after `--`
    /// (but --out-dir and --json, which are the pair's).
    #[arg(last = true, value_name = "COMMON")]
    pub common: Vec<String>,
}

/// A variant's flags as `throughput` parses them.
#[derive(Debug, Parser)]
#[command(name = "throughput", no_binary_name = true)]
struct VariantArgs {
    #[command(flatten)]
    options: Options,
}

/// One variant: its label, its own flags, and its options parsed.
#[derive(Debug, Clone)]
struct Variant {
    label: &'static str,
    own: Vec<String>,
    options: Options,
}

/// The figures of one run's headline test (the median over its repetitions).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Headline {
    /// The test's name, mode and concurrency, e.g. `concurrent-4`, `batched`, 4.
    pub test: String,
    pub mode: String,
    pub concurrency: usize,
    pub tokens_per_s: f64,
    pub ttft_p50_ms: f64,
    pub latency_p50_ms: f64,
    /// Failed requests of the run, every test's.
    pub failed: usize,
    /// Prompt tokens the headline test took from a prefix cache, where
    /// counted (in process, batched mode), summed over repetitions.
    pub prefix_tokens_reused: Option<u64>,
}

/// The figures a pair compares, as A / B.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    pub tokens_per_s: f64,
    pub ttft_p50: f64,
    pub latency_p50: f64,
}

impl Ratios {
    /// The figures' names, as the summary names them.
    pub const FIGURES: [&'static str; 3] = ["tokens_per_s", "ttft_p50", "latency_p50"];

    /// The figures, in the order of [`Ratios::FIGURES`].
    pub fn values(&self) -> [f64; 3] {
        [self.tokens_per_s, self.ttft_p50, self.latency_p50]
    }
}

/// One pair of runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// `AB` or `BA`: which ran first.
    pub order: String,
    pub a: Headline,
    pub b: Headline,
    /// A's figures over B's.
    pub ratio: Ratios,
}

/// A ratio over every pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RatioSummary {
    /// `tokens_per_s`, `ttft_p50` or `latency_p50`.
    pub figure: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// Everything one `throughput pair` call wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairReport {
    pub pair_schema_version: u32,
    pub timestamp_utc: String,
    pub git_commit: String,
    /// The flags of both, then A's and B's own.
    pub common: Vec<String>,
    pub a: Vec<String>,
    pub b: Vec<String>,
    pub pairs: Vec<Pair>,
    /// Each ratio's median, min and max over the pairs.
    pub ratios: Vec<RatioSummary>,
    /// Every run's report, in the order they ran.
    pub runs: Vec<Report>,
}

impl PairReport {
    /// Failed requests over every run.
    pub fn failed_requests(&self) -> usize {
        self.runs.iter().flat_map(|r| &r.tests).map(|t| t.failed).sum()
    }
}

/// Runs the pairs `opts` asks for, writes the JSON and the Markdown, prints
/// the Markdown on stdout. Both variants' flags are checked, and the output
/// directory, before any run.
pub fn pair(opts: &PairOptions) -> Result<PairReport, Box<dyn Error>> {
    if !(1..=MAX_PAIRS).contains(&opts.pairs) {
        return Err(format!("--pairs must be within 1..={MAX_PAIRS}, not {}", opts.pairs).into());
    }
    let a = variant("A", &opts.common, &opts.a, opts)?;
    let b = variant("B", &opts.common, &opts.b, opts)?;
    gpt2::files::check_writable_dir(&opts.out_dir)?;
    let mut runs = Vec::with_capacity(2 * opts.pairs);
    let mut pairs = Vec::with_capacity(opts.pairs);
    for i in 0..opts.pairs {
        let ab = i % 2 == 0;
        let order = if ab { [&a, &b] } else { [&b, &a] };
        let mut heads = Vec::with_capacity(2);
        for v in order {
            let number = runs.len();
            eprintln!(
                "pair {}/{}: {} ({}), run {} of {}",
                i + 1,
                opts.pairs,
                v.label,
                if v.own.is_empty() {
                    "the common flags".to_string()
                } else {
                    v.own.join(" ")
                },
                number + 1,
                2 * opts.pairs
            );
            let mut options = v.options.clone();
            options.prompt_seed = options.prompt_seed.wrapping_add(number as u64);
            let report = run::measure(&options)?;
            heads.push(headline(&report).ok_or("a run measured no test")?);
            runs.push(report);
        }
        let second = heads.pop().expect("two runs");
        let first = heads.pop().expect("two runs");
        let (a_head, b_head) = if ab { (first, second) } else { (second, first) };
        pairs.push(Pair {
            order: if ab { "AB" } else { "BA" }.into(),
            ratio: ratios(&a_head, &b_head),
            a: a_head,
            b: b_head,
        });
    }
    let report = PairReport {
        pair_schema_version: PAIR_SCHEMA_VERSION,
        timestamp_utc: meta::utc_timestamp(SystemTime::now(), true),
        git_commit: meta::git_commit(),
        common: opts.common.clone(),
        a: a.own,
        b: b.own,
        ratios: summarize(&pairs),
        pairs,
        runs,
    };
    write(&report, opts)?;
    Ok(report)
}

/// Variant `label`'s options: the common flags and its own (`own`, split as
/// a shell splits words), parsed as `throughput` parses them and checked as
/// a run checks them. Its reports go nowhere of their own: --out-dir and
/// --json are the pair's, refused here by name.
fn variant(label: &'static str, common: &[String], own: &str, opts: &PairOptions) -> Result<Variant, String> {
    let flag = format!("--{}", label.to_ascii_lowercase());
    let own: Vec<String> = shlex::split(own)
        .ok_or_else(|| format!("{flag} `{own}`: unbalanced quotes or a trailing backslash"))?;
    // A flag of many values (--levels, --target) given in both would
    // gather both sets of values; it belongs to one side.
    let given = |args: &[String]| -> Vec<String> {
        let Ok(m) = VariantArgs::command()
            .ignore_errors(true)
            .try_get_matches_from(args)
        else {
            return Vec::new();
        };
        m.ids()
            .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
            .map(|id| id.to_string())
            .collect()
    };
    let mine = given(&own);
    if let Some(both) = given(common).into_iter().find(|id| mine.contains(id)) {
        return Err(format!(
            "variant {label}: --{} is given both after -- and in {flag}; give it in one of them",
            both.replace('_', "-")
        ));
    }
    let args: Vec<&String> = common.iter().chain(&own).collect();
    let matches = VariantArgs::command()
        .try_get_matches_from(&args)
        .map_err(|e| format!("variant {label} (the flags after -- and {flag}): {}", e.render()))?;
    for id in ["out_dir", "json"] {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            return Err(format!(
                "variant {label}: --{} is the pair's (give it before --), not a variant's",
                id.replace('_', "-")
            ));
        }
    }
    let mut options = VariantArgs::from_arg_matches(&matches)
        .map_err(|e| format!("variant {label}: {}", e.render()))?
        .options;
    options.out_dir = opts.out_dir.clone();
    run::check(&options).map_err(|e| format!("variant {label}: {e}"))?;
    Ok(Variant { label, own, options })
}

/// A run's headline test: the last test it ran, over its repetitions
/// (those of the same name, mode and dtype); `None` if it ran none.
pub fn headline(report: &Report) -> Option<Headline> {
    let last = report.tests.last()?;
    let same: Vec<&TestResult> = report
        .tests
        .iter()
        .filter(|t| (&t.name, &t.mode, &t.dtype) == (&last.name, &last.mode, &last.dtype))
        .collect();
    let median = |f: fn(&TestResult) -> f64| {
        let mut v: Vec<f64> = same.iter().map(|t| f(t)).collect();
        v.sort_by(f64::total_cmp);
        stats::quantile(&v, 0.5)
    };
    let reused: Vec<u64> = same
        .iter()
        .filter_map(|t| t.prefix.map(|p| p.tokens_reused))
        .collect();
    Some(Headline {
        test: last.name.clone(),
        mode: last.mode.clone(),
        concurrency: last.concurrency,
        tokens_per_s: median(|t| t.tokens_per_s),
        ttft_p50_ms: median(|t| t.ttft_ms.p50),
        latency_p50_ms: median(|t| t.latency_ms.p50),
        failed: report.tests.iter().map(|t| t.failed).sum(),
        prefix_tokens_reused: (!reused.is_empty()).then(|| reused.iter().sum()),
    })
}

/// A's figures over B's.
fn ratios(a: &Headline, b: &Headline) -> Ratios {
    Ratios {
        tokens_per_s: a.tokens_per_s / b.tokens_per_s,
        ttft_p50: a.ttft_p50_ms / b.ttft_p50_ms,
        latency_p50: a.latency_p50_ms / b.latency_p50_ms,
    }
}

/// Each ratio's median, min and max over `pairs`, in the order of
/// [`Ratios::FIGURES`].
pub fn summarize(pairs: &[Pair]) -> Vec<RatioSummary> {
    Ratios::FIGURES
        .iter()
        .enumerate()
        .map(|(k, figure)| {
            let mut v: Vec<f64> = pairs.iter().map(|p| p.ratio.values()[k]).collect();
            v.sort_by(f64::total_cmp);
            RatioSummary {
                figure: figure.to_string(),
                median: stats::quantile(&v, 0.5),
                min: v.first().copied().unwrap_or(f64::NAN),
                max: v.last().copied().unwrap_or(f64::NAN),
            }
        })
        .collect()
}

/// Writes the JSON and the Markdown as a new set under `opts.out_dir`, and
/// prints the Markdown.
fn write(report: &PairReport, opts: &PairOptions) -> Result<(), Box<dyn Error>> {
    let base = format!(
        "throughput_pair_{}",
        meta::utc_timestamp(SystemTime::now(), false)
    );
    let json = serde_json::to_string_pretty(report)?;
    let md = report::pair_markdown(report);
    let paths = run::write_set(&opts.out_dir, &base, |_| {
        vec![
            ("json", json.clone().into_bytes()),
            ("md", md.clone().into_bytes()),
        ]
    })?;
    print!("{md}");
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    eprintln!("wrote {}", names.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(common: &[&str], a: &str, b: &str) -> PairOptions {
        PairOptions {
            pairs: 1,
            a: a.into(),
            b: b.into(),
            out_dir: std::env::temp_dir(),
            common: common.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Each variant is the common flags plus its own; a flag given in both
    /// is clap's error, named with the variant; the pair's own flags are
    /// refused in a variant; a run's checks apply to each.
    #[test]
    fn variants_are_the_common_flags_and_their_own() {
        let o = opts(
            &["--synthetic", "--mode", "batched"],
            "--choices 8 --levels 1",
            "--levels '8'",
        );
        let a = variant("A", &o.common, &o.a, &o).unwrap();
        let b = variant("B", &o.common, &o.b, &o).unwrap();
        assert_eq!((a.options.choices, a.options.levels.clone()), (8, Some(vec![1])));
        assert_eq!((b.options.choices, b.options.levels.clone()), (1, Some(vec![8])));
        assert_eq!(b.own, ["--levels", "8"]);
        assert_eq!(a.options.out_dir, o.out_dir, "the pair's directory");

        let twice = opts(&["--levels", "2"], "--levels 4", "");
        let e = variant("A", &twice.common, &twice.a, &twice).unwrap_err();
        assert_eq!(
            e, "variant A: --levels is given both after -- and in --a; give it in one of them",
            "values would gather"
        );
        let same = opts(&["--warmup", "1"], "--warmup 2", "");
        let e = variant("A", &same.common, &same.a, &same).unwrap_err();
        assert!(e.contains("--warmup is given both"), "{e}");
        let clash = opts(&["--warmup", "1"], "--max-batch x", "");
        let e = variant("A", &clash.common, &clash.a, &clash).unwrap_err();
        assert!(
            e.starts_with("variant A (the flags after -- and --a)") && e.contains("--max-batch"),
            "{e}"
        );
        let out = opts(&["--out-dir", "x"], "", "");
        let e = variant("B", &out.common, &out.b, &out).unwrap_err();
        assert!(e.contains("--out-dir is the pair's"), "{e}");
        let bad = opts(&["--mode", "threads"], "--choices 2", "");
        let e = variant("A", &bad.common, &bad.a, &bad).unwrap_err();
        assert!(
            e.starts_with("variant A: --choices 2 needs --mode batched"),
            "{e}"
        );
        let quotes = opts(&[], "--prompt 'open", "");
        assert!(variant("A", &quotes.common, &quotes.a, &quotes)
            .unwrap_err()
            .contains("unbalanced quotes"));
    }

    fn head(tok: f64, ttft: f64, lat: f64) -> Headline {
        Headline {
            test: "concurrent-4".into(),
            mode: "batched".into(),
            concurrency: 4,
            tokens_per_s: tok,
            ttft_p50_ms: ttft,
            latency_p50_ms: lat,
            failed: 0,
            prefix_tokens_reused: None,
        }
    }

    #[test]
    fn ratios_are_a_over_b_and_summarized_by_their_median() {
        let pairs: Vec<Pair> = [(100.0, 10.0), (120.0, 20.0), (90.0, 40.0)]
            .into_iter()
            .map(|(tok, ttft)| {
                let (a, b) = (head(tok, ttft, 1000.0), head(100.0, 40.0, 500.0));
                Pair {
                    order: "AB".into(),
                    ratio: ratios(&a, &b),
                    a,
                    b,
                }
            })
            .collect();
        let s = summarize(&pairs);
        let by = |f: &str| s.iter().find(|r| r.figure == f).unwrap().clone();
        let tok = by("tokens_per_s");
        assert_eq!((tok.median, tok.min, tok.max), (1.0, 0.9, 1.2));
        assert_eq!(by("ttft_p50").median, 0.5);
        assert_eq!(by("latency_p50").median, 2.0);
    }

    /// The headline is the last test, the median over its repetitions, with
    /// the prefix reuse counted where there is any.
    #[test]
    fn the_headline_is_the_last_test_over_its_repetitions() {
        let test = |name: &str, mode: &str, rep: usize, tok: f64| TestResult {
            tokens_per_s: tok,
            prefix: (mode == "batched").then_some(crate::PrefixReuse {
                hits: 1,
                tokens_reused: 8,
            }),
            ..stats::test_result(name, mode, "f32", 4, rep, 1.0, vec![])
        };
        let mut report: Report =
            serde_json::from_str(include_str!("testdata/schema2_probe_report.json")).unwrap();
        report.tests = vec![
            test("single", "threads", 0, 5.0),
            test("concurrent-4", "batched", 0, 30.0),
            test("single", "threads", 1, 6.0),
            test("concurrent-4", "batched", 1, 50.0),
            test("concurrent-4", "batched", 2, 10.0),
        ];
        let h = headline(&report).unwrap();
        assert_eq!((h.test.as_str(), h.mode.as_str()), ("concurrent-4", "batched"));
        assert_eq!((h.tokens_per_s, h.prefix_tokens_reused), (30.0, Some(24)));
        report.tests.clear();
        assert_eq!(headline(&report), None);
    }
}
