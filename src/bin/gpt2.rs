//! `gpt2`: the command-line front door of gpt2-rs.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use gpt2::synth::{self, Preset};
use gpt2::Gpt2Model;

#[derive(Parser)]
#[command(name = "gpt2", version, about = "A pure-Rust GPT-2 inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
    },
    /// Print the logits of every position of a token sequence as JSON.
    Logits {
        /// Checkpoint directory holding config.json and model.safetensors.
        #[arg(long)]
        weights: PathBuf,
        /// Comma-separated token ids, e.g. 15496,11,703.
        #[arg(long, value_delimiter = ',', required = true)]
        tokens: Vec<u32>,
        /// Write the JSON here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    match cli.command {
        Command::Synth { preset, seed, out } => {
            let t = Instant::now();
            synth::write_checkpoint(&out, preset, seed)?;
            eprintln!(
                "wrote synthetic {} checkpoint (seed {seed}) to {} in {:.2} s",
                preset.name(),
                out.display(),
                t.elapsed().as_secs_f64()
            );
        }
        Command::Logits { weights, tokens, out } => {
            let model = Gpt2Model::load(&weights)?;
            let v = model.config.vocab_size;
            let logits = model.logits_all(&tokens, 64)?;
            let rows: Vec<&[f32]> = logits.chunks_exact(v).collect();
            let json = serde_json::json!({ "tokens": tokens, "logits": rows });
            match out {
                Some(path) => std::fs::write(&path, json.to_string())
                    .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
                None => print_stdout(&json.to_string())?,
            }
        }
    }
    Ok(())
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
