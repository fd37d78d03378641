//! `gpt2`: the command-line front door of gpt2-rs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use gpt2::score::{self, ScoreOptions};
use gpt2::synth::{self, Preset};
use gpt2::tokenizer::{Gpt2Tokenizer, TextStream, EOS_TOKEN};
use gpt2::{Fit, GenerateOptions, Generation, Gpt2Config, Gpt2Model, Request, SamplingParams, Session};
use gpt2_hub::{self as hub, DtypeArgs, WeightsArgs};

#[derive(Parser)]
#[command(name = "gpt2", version, about = "A pure-Rust GPT-2 inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    kernels: gpt2_hub::KernelArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout; timings go to stderr.
    Generate(GenerateArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize {
        #[arg(long)]
        text: String,
        /// A tokenizer.json to use instead of the built-in GPT-2 one.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
    },
    /// Print the text of comma-separated token ids.
    Detokenize {
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// A tokenizer.json to use instead of the built-in GPT-2 one.
        #[arg(long, value_name = "FILE")]
        tokenizer: Option<PathBuf>,
    },
    /// Write a deterministic synthetic checkpoint (config.json + model.safetensors).
    Synth {
        /// Shape of the model.
        #[arg(long, value_enum, default_value = "124m")]
        preset: Preset,
        /// Seed of the random weights; the same seed gives a byte-identical file.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Directory to write into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Blocks, instead of the preset's (its heads and width are kept):
        /// with --vocab and --positions, a small checkpoint of a big one's geometry.
        #[arg(long, value_name = "N")]
        layers: Option<usize>,
        /// Vocabulary size, instead of GPT-2's 50257.
        #[arg(long, value_name = "N")]
        vocab: Option<usize>,
        /// Positions (the context), instead of the preset's.
        #[arg(long, value_name = "N")]
        positions: Option<usize>,
    },
    /// Serve completions over HTTP (OpenAI-compatible: /v1/completions,
    /// /v1/models, /health, /metrics); every request shares one batching engine.
    Serve(Box<gpt2_serve::ServeArgs>),
    /// Print the logits of every position of a token sequence as JSON.
    Logits {
        /// Checkpoint directory holding config.json and model.safetensors.
        #[arg(long)]
        weights: PathBuf,
        /// Comma-separated token ids, e.g. 15496,11,703.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Write the JSON here instead of stdout (a new file: an existing one is never replaced).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        dtype: DtypeArgs,
    },
    /// Score a text file: each token's log-probability under the model and the
    /// perplexity, with a sliding window past the context window (the stride of
    /// the `transformers` perplexity guide). A table, or one JSON object, on stdout.
    Score(ScoreArgs),
}

// The flags of `gpt2 generate` (its help text is the doc of `Command::Generate`).
#[derive(clap::Args)]
struct GenerateArgs {
    #[arg(long)]
    prompt: String,
    /// How many tokens to generate at most.
    #[arg(long, default_value_t = 30)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the default).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only from the smallest set of tokens whose probability reaches P (0 < P <= 1).
    #[arg(long)]
    top_p: Option<f32>,
    /// Penalise tokens already present (1.0 = off; > 1 discourages repeats).
    #[arg(long)]
    repetition_penalty: Option<f32>,
    /// Seed of the sampler's RNG.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Do not stop at <|endoftext|>.
    #[arg(long)]
    ignore_eos: bool,
    /// Print a per-op breakdown of the time (prefill and decode apart) to stderr.
    #[arg(long)]
    profile: bool,
    #[command(flatten)]
    weights: WeightsArgs,
    #[command(flatten)]
    dtype: DtypeArgs,
}

// The flags of `gpt2 score` (its help text is the doc of `Command::Score`).
#[derive(clap::Args)]
struct ScoreArgs {
    /// The text to score: UTF-8, at most 16 MiB.
    #[arg(long, value_name = "FILE")]
    file: PathBuf,
    /// Tokens between the starts of two windows, in 1..=n_positions; each window scores
    /// only the tokens the one before it did not. Default: half the window (512 for GPT-2).
    #[arg(long)]
    stride: Option<usize>,
    /// Also give the N most likely alternatives of each token (0..=20).
    #[arg(long, value_name = "N", default_value_t = 0)]
    top: usize,
    /// Print one JSON object (tokens, nll, count, perplexity, window, stride) instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    weights: WeightsArgs,
    #[command(flatten)]
    dtype: DtypeArgs,
}

/// The longest text file `gpt2 score` reads.
const SCORE_TEXT_LIMIT: u64 = 16 << 20;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.kernels.init() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn tokenizer(path: Option<PathBuf>) -> gpt2::Result<Gpt2Tokenizer> {
    path.map_or_else(|| Ok(Gpt2Tokenizer::builtin()), |p| Gpt2Tokenizer::from_file(&p))
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Generate(args) => generate(args)?,
        Command::Score(args) => score_file(args)?,
        Command::Serve(args) => gpt2_serve::run(*args).map_err(|e| -> Box<dyn std::error::Error> { e })?,
        Command::Tokenize {
            text,
            tokenizer: path,
        } => {
            let ids = tokenizer(path)?.encode(&text)?;
            print_stdout(&serde_json::to_string(&ids)?)?;
        }
        Command::Detokenize {
            tokens,
            tokenizer: path,
        } => {
            print_stdout(&tokenizer(path)?.decode(&tokens)?)?;
        }
        Command::Synth {
            preset,
            seed,
            out,
            layers,
            vocab,
            positions,
        } => {
            let t = Instant::now();
            let full = preset.spec();
            let spec = preset.reduced(
                layers.unwrap_or(full.n_layer),
                vocab.unwrap_or(full.vocab_size),
                positions.unwrap_or(full.n_positions),
            );
            synth::write_spec(&out, &spec, seed)?;
            eprintln!(
                "wrote synthetic {} checkpoint (seed {seed}) to {} in {:.2} s",
                spec.name(),
                out.display(),
                t.elapsed().as_secs_f64()
            );
        }
        Command::Logits {
            weights,
            tokens,
            out,
            dtype,
        } => {
            let model = Gpt2Model::load_with(&weights, dtype.dtype)?.with_kv_dtype(dtype.kv_dtype);
            let v = model.config.vocab_size;
            let logits = model.logits_all(&tokens, 64)?;
            let rows: Vec<&[f32]> = logits.chunks_exact(v).collect();
            let json =
                serde_json::json!({ "dtype": model.dtype().as_str(), "tokens": tokens, "logits": rows });
            match out {
                Some(path) => gpt2::files::write_new(&path, json.to_string().as_bytes())?,
                None => print_stdout(&json.to_string())?,
            }
        }
    }
    Ok(())
}

/// `gpt2 generate`: the prompt's text, then each piece as it is made.
fn generate(args: GenerateArgs) -> Result<(), Box<dyn std::error::Error>> {
    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            repetition_penalty: args.repetition_penalty,
            ..SamplingParams::greedy()
        },
        seed: args.seed,
        ignore_eos: args.ignore_eos,
        eos_token_id: Some(EOS_TOKEN),
        logprobs: None,
        prompt_logprobs: None,
    };
    let resolved = hub::resolve(&args.weights)?;
    let tok = resolved.load_tokenizer()?;
    let ids = tok.encode(&args.prompt)?;
    let t = Instant::now();
    let model = Gpt2Model::load_with(&resolved.dir, args.dtype.dtype)?.with_kv_dtype(args.dtype.kv_dtype);
    let load = t.elapsed();
    // Check the request before printing anything, so a bad one fails cleanly.
    let request = Request::prepare(&model.config, ids, opts, Fit::Prompt)?;
    eprintln!(
        "weights: {}",
        resolved.source.describe(model.config.synthetic.as_ref())
    );
    eprintln!(
        "loaded in {:.0} ms ({:.0} MB packed into {} kernel panels); prompt is {} tokens",
        load.as_secs_f64() * 1e3,
        model.weights.packed_bytes as f64 / 1e6,
        model.dtype(),
        request.prompt().len()
    );
    let mut session = Session::new(&model, request.prompt().len().clamp(1, 128))?;
    session.set_profiling(args.profile);
    let mut stream = TextStream::new(&tok);
    let mut out = std::io::stdout();
    print_flush(&mut out, &args.prompt);
    let mut stream_err = None;
    let gen = session.run(&model, request, |id| match stream.push(id) {
        Ok(Some(piece)) => print_flush(&mut out, &piece),
        Ok(None) => {}
        Err(e) => stream_err = Some(e),
    })?;
    if let Some(e) = stream_err {
        return Err(e.into());
    }
    if let Some(rest) = stream.finish()? {
        print_flush(&mut out, &rest);
    }
    println!();
    report(&gen, &session, &resolved.dir.join("model.safetensors"));
    Ok(())
}

/// `gpt2 score`: the text's tokens with their log-probabilities, then the
/// perplexity; the run's description and timing on stderr.
fn score_file(args: ScoreArgs) -> Result<(), Box<dyn std::error::Error>> {
    let text = gpt2::files::read_bounded_string(&args.file, SCORE_TEXT_LIMIT)?;
    let resolved = hub::resolve(&args.weights)?;
    let tok = resolved.load_tokenizer()?;
    let ids = tok.encode(&text)?;
    let config = Gpt2Config::from_file(&resolved.dir.join("config.json"))?;
    let opts = ScoreOptions {
        stride: args.stride.unwrap_or(ScoreOptions::half_window(&config).stride),
        top: args.top,
    };
    // Checked before the weights load, so a bad input fails at once.
    score::check(&config, &ids, &opts).map_err(|e| match ids.len() {
        0 | 1 => format!("{}: {e}", args.file.display()),
        _ => e.to_string(),
    })?;
    let model = Gpt2Model::load_with(&resolved.dir, args.dtype.dtype)?.with_kv_dtype(args.dtype.kv_dtype);
    eprintln!(
        "weights: {}",
        resolved.source.describe(model.config.synthetic.as_ref())
    );
    let t = Instant::now();
    let s = score::score(&model, &ids, &opts)?;
    eprintln!(
        "scored {} of {} tokens in {} windows of {} (stride {}) in {:.2} s",
        s.count,
        ids.len(),
        s.windows,
        s.window,
        s.stride,
        t.elapsed().as_secs_f64()
    );
    let piece = |id: u32| tok.decode(&[id]);
    if args.json {
        let mut tokens = Vec::with_capacity(ids.len());
        for (&id, lp) in ids.iter().zip(&s.logprobs) {
            let mut entry = serde_json::json!({
                "id": id, "text": piece(id)?, "logprob": lp.as_ref().map(|l| l.logprob),
            });
            if let (Some(lp), true) = (lp, opts.top > 0) {
                let top: Result<Vec<_>, gpt2::Error> = lp
                    .top
                    .iter()
                    .map(|&(id, logprob)| {
                        Ok(serde_json::json!({ "id": id, "text": piece(id)?, "logprob": logprob }))
                    })
                    .collect();
                entry["top"] = top?.into();
            }
            tokens.push(entry);
        }
        let json = serde_json::json!({
            "tokens": tokens, "nll": s.nll, "count": s.count, "perplexity": s.perplexity(),
            "window": s.window, "stride": s.stride, "windows": s.windows,
        });
        return Ok(print_stdout(&json.to_string())?);
    }
    let mut table = format!("{:>6} {:>6} {:>11}  text\n", "pos", "id", "logprob");
    for (pos, (&id, lp)) in ids.iter().zip(&s.logprobs).enumerate() {
        let value = lp
            .as_ref()
            .map_or("-".to_string(), |l| format!("{:.6}", l.logprob));
        table += &format!("{pos:>6} {id:>6} {value:>11}  {:?}", piece(id)?);
        for &(alt, logprob) in lp.iter().flat_map(|l| &l.top) {
            table += &format!("  {alt}:{:?}:{logprob:.4}", piece(alt)?);
        }
        table.push('\n');
    }
    table += &format!(
        "perplexity {:.6} (nll {:.6} over {} tokens; {} windows of {}, stride {})",
        s.perplexity(),
        s.nll,
        s.count,
        s.windows,
        s.window,
        s.stride
    );
    Ok(print_stdout(&table)?)
}

/// The run's timings, its profile if asked for, and the peak resident
/// memory against the weights file's size, on stderr.
fn report(gen: &Generation, session: &Session, weights_file: &Path) {
    let tm = &gen.timings;
    let n = gen.tokens.len();
    eprintln!(
        "generated {n} tokens ({:?}) in {:.0} ms: time to first token {:.1} ms, {:.1} ms/token after \
         ({:.1} tok/s)",
        gen.stop,
        tm.total.as_secs_f64() * 1e3,
        tm.ttft.as_secs_f64() * 1e3,
        tm.tpot().map_or(0.0, |d| d.as_secs_f64() * 1e3),
        tm.tpot().map_or(0.0, |d| 1.0 / d.as_secs_f64()),
    );
    if let Some(p) = session.profile() {
        eprintln!("{}", p.table());
    }
    if let Some(peak) = gpt2::profile::peak_rss_bytes() {
        let file = std::fs::metadata(weights_file).map_or(0, |m| m.len());
        eprintln!(
            "peak resident memory {:.0} MiB ({:.2}x the {:.0} MiB weights file)",
            peak as f64 / (1 << 20) as f64,
            peak as f64 / file.max(1) as f64,
            file as f64 / (1 << 20) as f64
        );
    }
}

/// Prints to stdout; a closed pipe (`gpt2 logits ... | head`) ends quietly.
fn print_stdout(text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}

/// Writes a streamed piece and flushes it, so text appears as it is made.
fn print_flush(out: &mut std::io::Stdout, text: &str) {
    use std::io::Write;
    // A closed stdout must not stop generation; the error is the reader's choice.
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}
