//! llama.cpp's own benchmarks, read so that `throughput compare` can set
//! them beside our reports: the JSON of `llama-bench -o json` (or `-o
//! jsonl`) and the JSON lines of `llama-batched-bench --output-format
//! jsonl`, each measured shape one [`LlamaPoint`].
//!
//! `scripts/llama-curves.sh` runs both tools on the GGUF conversions of our
//! synthetic checkpoints; `docs/llama-cpp.md` says how their shapes and
//! numbers match ours. llama-batched-bench's lines do not name the model, so
//! its file must be named after the GGUF, `<model>-<dtype>.jsonl` (the
//! script's `llama-batched-bench_124m-f32.jsonl`, say).

use std::path::Path;

use serde::Deserialize;

/// The longest output we read (a sweep writes a few kB per shape).
const LLAMA_LIMIT: u64 = 16 << 20;

/// The two tools whose output we read.
pub const LLAMA_BENCH: &str = "llama-bench";
pub const BATCHED_BENCH: &str = "llama-batched-bench";

/// One shape llama.cpp measured.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaPoint {
    /// [`LLAMA_BENCH`] or [`BATCHED_BENCH`].
    pub tool: String,
    /// The GGUF's file name without its dtype and extension: `124m` for
    /// `124m-f32.gguf`.
    pub model: String,
    /// Parameters and bytes of the weights, as llama-bench counts them
    /// (`None` for llama-batched-bench, which does not print them).
    pub model_params: Option<u64>,
    pub model_bytes: Option<u64>,
    /// The weights' GGUF type, lower case: `f32`, `f16`, `q8_0`.
    pub dtype: String,
    pub threads: usize,
    /// Prompt tokens per sequence (0 for llama-bench's decode test `tg`).
    pub prompt_tokens: usize,
    /// Tokens generated per sequence (0 for llama-bench's prefill test `pp`).
    pub new_tokens: usize,
    /// Sequences decoded together: llama-batched-bench's `pl` (our
    /// concurrency); 1 for llama-bench.
    pub sequences: usize,
    /// Prompt tokens per second of the prefill, all sequences together.
    pub prefill_tok_s: Option<f64>,
    /// Generated tokens per second of the decode alone (prefill excluded),
    /// all sequences together.
    pub decode_tok_s: Option<f64>,
    /// Timed repetitions behind the figures (llama-bench's `-r`; 1 for
    /// llama-batched-bench, which times each shape once).
    pub samples: usize,
}

/// Which axis of the family and context curves a point lies on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaAxis {
    /// Sequences decoded together (llama-batched-bench's `pl`).
    Concurrency,
    /// Prompt length of a prefill (llama-bench's `pp`).
    PromptTokens,
    /// The model's size, in parameters (llama-bench's `tg`).
    ModelParams,
}

impl LlamaAxis {
    /// The axis' name as the curves' x label says it.
    pub fn as_str(self) -> &'static str {
        match self {
            LlamaAxis::Concurrency => "concurrency",
            LlamaAxis::PromptTokens => "prompt tokens",
            LlamaAxis::ModelParams => "model parameters",
        }
    }
}

/// Where a point is drawn: its curve, its x on `axis`, and the tokens/s
/// that curve plots.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCurvePoint {
    pub series: String,
    pub axis: LlamaAxis,
    pub x: f64,
    pub tokens_per_s: f64,
}

impl LlamaPoint {
    /// The point on its curve: llama-batched-bench's decode tokens/s
    /// against sequences, llama-bench's prefill tokens/s against prompt
    /// tokens, and llama-bench's decode tokens/s against the model's size.
    /// `None` for a figure the point lacks (a size llama-bench did not give).
    pub fn curve_point(&self) -> Option<LlamaCurvePoint> {
        let name = format!("llama.cpp {} {}", self.model, self.dtype);
        let (series, axis, x, y) = if self.tool == BATCHED_BENCH {
            let series = format!(
                "{name} decode (pp {}, tg {})",
                self.prompt_tokens, self.new_tokens
            );
            (
                series,
                LlamaAxis::Concurrency,
                self.sequences as f64,
                self.decode_tok_s?,
            )
        } else if let Some(pp) = self.prefill_tok_s {
            (
                format!("{name} prefill"),
                LlamaAxis::PromptTokens,
                self.prompt_tokens as f64,
                pp,
            )
        } else {
            let series = format!("llama.cpp {} decode (tg {})", self.dtype, self.new_tokens);
            (
                series,
                LlamaAxis::ModelParams,
                self.model_params? as f64,
                self.decode_tok_s?,
            )
        };
        Some(LlamaCurvePoint {
            series,
            axis,
            x,
            tokens_per_s: y,
        })
    }
}

/// Our weight format that a llama.cpp GGUF type is measured against: f32
/// with f32, f16 with bf16 (both 2 bytes), q8_0 with int8 (8-bit weights;
/// q8_0 has a scale per block of 32, ours one per output column).
pub fn counterpart(dtype: &str) -> Option<&'static str> {
    match dtype {
        "f32" => Some("f32"),
        "f16" | "bf16" => Some("bf16"),
        "q8_0" => Some("int8"),
        _ => None,
    }
}

/// Which tool wrote `text`, if it looks like llama.cpp's output: a JSON
/// array (llama-bench `-o json`; our reports are objects), or a first line
/// with llama-bench's `avg_ts` or llama-batched-bench's `speed_tg` or `pl`
/// (either, so that a line missing one is still read as that tool's and
/// its error names the field).
pub fn detect(text: &str) -> Option<&'static str> {
    let text = text.trim_start();
    if text.starts_with('[') {
        return Some(LLAMA_BENCH);
    }
    let first: serde_json::Value = serde_json::from_str(text.lines().next()?).ok()?;
    let has = |key: &str| first.get(key).is_some();
    if has("avg_ts") {
        Some(LLAMA_BENCH)
    } else if has("speed_tg") || has("pl") {
        Some(BATCHED_BENCH)
    } else {
        None
    }
}

/// Reads one output of llama-bench or llama-batched-bench; errors name the
/// file and what is wrong (the line and the field, for a bad measurement).
pub fn read_llama_file(path: &Path) -> Result<Vec<LlamaPoint>, String> {
    let text = gpt2::files::read_bounded_string(path, LLAMA_LIMIT).map_err(|e| e.to_string())?;
    parse_llama(path, &text)
}

/// [`read_llama_file`] on text already read from `path`.
pub fn parse_llama(path: &Path, text: &str) -> Result<Vec<LlamaPoint>, String> {
    let points = match detect(text) {
        Some(LLAMA_BENCH) => read_llama_bench(text),
        Some(_) => read_batched_bench(path, text),
        None => Err(
            "not the output of llama-bench (-o json or jsonl) or llama-batched-bench \
                     (--output-format jsonl)"
                .to_string(),
        ),
    };
    match points {
        Ok(p) if p.is_empty() => Err(format!("{}: no measurements in it", path.display())),
        Ok(p) => Ok(p),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

/// The fields of a llama-bench test that we read (it writes many more).
#[derive(Deserialize)]
struct BenchTest {
    model_filename: String,
    /// e.g. `gpt2 0.1B all F32`: the architecture, size and GGUF type.
    model_type: String,
    model_size: u64,
    model_n_params: u64,
    n_threads: usize,
    n_prompt: usize,
    n_gen: usize,
    avg_ts: f64,
    samples_ts: Vec<f64>,
}

/// llama-bench's tests, from `-o json` (one array) or `-o jsonl` (a line each).
fn read_llama_bench(text: &str) -> Result<Vec<LlamaPoint>, String> {
    let tests: Vec<(String, BenchTest)> = if text.trim_start().starts_with('[') {
        let all: Vec<BenchTest> = serde_json::from_str(text).map_err(|e| format!("llama-bench JSON: {e}"))?;
        all.into_iter()
            .enumerate()
            .map(|(i, t)| (format!("test {}", i + 1), t))
            .collect()
    } else {
        json_lines(text)?
    };
    tests
        .into_iter()
        .map(|(at, t)| bench_point(t).map_err(|e| format!("{at}: {e}")))
        .collect()
}

/// One llama-bench test: a prefill (`pp`: prompt tokens, none generated) or
/// a decode (`tg`: generated tokens from an empty context).
fn bench_point(t: BenchTest) -> Result<LlamaPoint, String> {
    let (prefill, decode) = match (t.n_prompt, t.n_gen) {
        (p, 0) if p > 0 => (Some(t.avg_ts), None),
        (0, g) if g > 0 => (None, Some(t.avg_ts)),
        (p, g) => {
            return Err(format!(
                "n_prompt {p} and n_gen {g}: only prefill (pp) or decode (tg) tests are read; a -pg \
                 test's tokens/s mixes both"
            ))
        }
    };
    let dtype = t
        .model_type
        .trim_end_matches(" (guessed)")
        .rsplit(' ')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let stem = file_stem(&t.model_filename);
    let model = stem
        .strip_suffix(&format!("-{dtype}"))
        .unwrap_or(&stem)
        .to_string();
    Ok(LlamaPoint {
        tool: LLAMA_BENCH.into(),
        model,
        model_params: Some(t.model_n_params),
        model_bytes: Some(t.model_size),
        dtype,
        threads: t.n_threads,
        prompt_tokens: t.n_prompt,
        new_tokens: t.n_gen,
        sequences: 1,
        prefill_tok_s: prefill,
        decode_tok_s: decode,
        samples: t.samples_ts.len(),
    })
}

/// The fields of a llama-batched-bench line that we read.
#[derive(Deserialize)]
struct BatchedLine {
    n_threads: usize,
    is_pp_shared: u8,
    pp: usize,
    tg: usize,
    pl: usize,
    speed_pp: f64,
    speed_tg: f64,
}

/// llama-batched-bench's lines; the model and dtype from the file's name.
fn read_batched_bench(path: &Path, text: &str) -> Result<Vec<LlamaPoint>, String> {
    let (model, dtype) = model_and_dtype(path)?;
    json_lines::<BatchedLine>(text)?
        .into_iter()
        .map(|(at, l)| {
            if l.is_pp_shared != 0 {
                return Err(format!(
                    "{at}: is_pp_shared 1 (-pps): its sequences share one prompt, ours each have their own"
                ));
            }
            Ok(LlamaPoint {
                tool: BATCHED_BENCH.into(),
                model: model.clone(),
                model_params: None,
                model_bytes: None,
                dtype: dtype.clone(),
                threads: l.n_threads,
                prompt_tokens: l.pp,
                new_tokens: l.tg,
                sequences: l.pl,
                prefill_tok_s: Some(l.speed_pp),
                decode_tok_s: Some(l.speed_tg),
                samples: 1,
            })
        })
        .collect()
}

/// Every non-blank line parsed as one `T`, with `line N` to name it.
fn json_lines<T: for<'de> Deserialize<'de>>(text: &str) -> Result<Vec<(String, T)>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let at = format!("line {}", i + 1);
            let v = serde_json::from_str(l).map_err(|e| format!("{at}: {e}"))?;
            Ok((at, v))
        })
        .collect()
}

/// The model and GGUF type in a llama-batched-bench file's name: `124m`
/// and `f32` from `llama-batched-bench_124m-f32.jsonl` (the prefix is optional).
fn model_and_dtype(path: &Path) -> Result<(String, String), String> {
    let stem = file_stem(&path.display().to_string());
    let stem = stem.strip_prefix("llama-batched-bench_").unwrap_or(&stem);
    match stem.rsplit_once('-') {
        Some((model, dtype)) if !model.is_empty() && is_gguf_type(dtype) => {
            Ok((model.to_string(), dtype.to_ascii_lowercase()))
        }
        _ => Err(
            "llama-batched-bench does not name its model: name the file after the GGUF, \
                  <model>-<dtype>.jsonl (e.g. 124m-f32.jsonl), as scripts/llama-curves.sh does"
                .to_string(),
        ),
    }
}

/// Whether `s` names a GGUF weight type: f32, f16, bf16, q8_0, q4_k_m, ...
fn is_gguf_type(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    matches!(s.as_str(), "f32" | "f16" | "bf16")
        || (s.starts_with('q') && s[1..].starts_with(|c: char| c.is_ascii_digit()))
}

/// A path's file name without its last extension.
fn file_stem(path: &str) -> String {
    Path::new(path)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn testdata(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("src/testdata")
            .join(name)
    }

    const BENCH: &str = "llama-bench_124m-f32.json";
    const BATCHED: &str = "llama-batched-bench_124m-f32.jsonl";

    /// A captured `llama-bench -p 6,128 -n 30 -r 1 -t 2 -o json` on the
    /// synthetic 124M in f32: two prefills and a decode.
    #[test]
    fn reads_llama_bench_json() {
        let points = read_llama_file(&testdata(BENCH)).unwrap();
        let tests: Vec<(usize, usize, Option<f64>, Option<f64>)> = points
            .iter()
            .map(|p| (p.prompt_tokens, p.new_tokens, p.prefill_tok_s, p.decode_tok_s))
            .collect();
        assert_eq!(
            tests,
            [
                (6, 0, Some(16.976455), None),
                (128, 0, Some(18.934312), None),
                (0, 30, None, Some(2.463077))
            ]
        );
        let p = &points[0];
        assert_eq!(
            (p.tool.as_str(), p.model.as_str(), p.dtype.as_str()),
            (LLAMA_BENCH, "124m", "f32")
        );
        assert_eq!(
            (p.model_params, p.model_bytes),
            (Some(163_037_184), Some(652_148_736))
        );
        assert_eq!((p.threads, p.sequences, p.samples), (2, 1, 1));
    }

    /// `-o jsonl` writes the same tests a line each.
    #[test]
    fn reads_llama_bench_jsonl_as_json() {
        let text = std::fs::read_to_string(testdata(BENCH)).unwrap();
        let all: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let lines: Vec<String> = all.iter().map(|v| v.to_string()).collect();
        let path = Path::new("124m-f32.jsonl");
        assert_eq!(detect(&lines.join("\n")), Some(LLAMA_BENCH));
        let from_lines = parse_llama(path, &lines.join("\n")).unwrap();
        assert_eq!(from_lines, read_llama_file(&testdata(BENCH)).unwrap());
    }

    /// A captured `llama-batched-bench -npp 6,128 -ntg 30 -npl 1,4 -t 2
    /// --output-format jsonl`: four shapes, named by the file.
    #[test]
    fn reads_batched_bench_jsonl() {
        let points = read_llama_file(&testdata(BATCHED)).unwrap();
        let shapes: Vec<(usize, usize, usize)> = points
            .iter()
            .map(|p| (p.prompt_tokens, p.new_tokens, p.sequences))
            .collect();
        assert_eq!(shapes, [(6, 30, 1), (6, 30, 4), (128, 30, 1), (128, 30, 4)]);
        let p = &points[1];
        assert_eq!(
            (p.tool.as_str(), p.model.as_str(), p.dtype.as_str()),
            (BATCHED_BENCH, "124m", "f32")
        );
        assert_eq!(
            (p.prefill_tok_s, p.decode_tok_s),
            (Some(10.15271), Some(5.213897))
        );
        assert_eq!((p.threads, p.samples, p.model_params), (2, 1, None));
    }

    #[test]
    fn curve_points_put_each_tool_on_its_axis() {
        let batched = read_llama_file(&testdata(BATCHED)).unwrap();
        let c = batched[1].curve_point().unwrap();
        assert_eq!(
            (c.axis, c.x, c.tokens_per_s),
            (LlamaAxis::Concurrency, 4.0, 5.213897)
        );
        assert_eq!(c.series, "llama.cpp 124m f32 decode (pp 6, tg 30)");
        let bench = read_llama_file(&testdata(BENCH)).unwrap();
        let pp = bench[1].curve_point().unwrap();
        assert_eq!(
            (pp.axis, pp.x, pp.series.as_str()),
            (LlamaAxis::PromptTokens, 128.0, "llama.cpp 124m f32 prefill")
        );
        let tg = bench[2].curve_point().unwrap();
        assert_eq!(
            (tg.axis, tg.x, tg.tokens_per_s),
            (LlamaAxis::ModelParams, 163_037_184.0, 2.463077)
        );
        assert_eq!(tg.axis.as_str(), "model parameters");
    }

    #[test]
    fn gguf_types_face_our_dtypes() {
        assert_eq!(counterpart("f32"), Some("f32"));
        assert_eq!(counterpart("f16"), Some("bf16"));
        assert_eq!(counterpart("q8_0"), Some("int8"));
        assert_eq!(counterpart("q4_k_m"), None);
    }

    /// `text`'s error read as `path`.
    fn error(path: &str, text: &str) -> String {
        parse_llama(Path::new(path), text).unwrap_err()
    }

    #[test]
    fn bad_outputs_name_the_file_and_the_field() {
        let line = r#"{"n_threads": 2, "is_pp_shared": 0, "pp": 6, "tg": 30, "pl": 4, "speed_pp": 1.0, "speed_tg": 2.0}"#;
        assert!(parse_llama(Path::new("124m-f32.jsonl"), line).is_ok());
        let missing = line.replace(r#", "speed_tg": 2.0"#, "");
        let e = error("124m-f32.jsonl", &format!("{line}\n{missing}"));
        assert!(
            e.starts_with("124m-f32.jsonl: line 2:") && e.contains("speed_tg"),
            "{e}"
        );
        let e = error("run.jsonl", line);
        assert!(
            e.starts_with("run.jsonl: ") && e.contains("<model>-<dtype>.jsonl"),
            "{e}"
        );
        let e = error(
            "124m-f32.jsonl",
            &line.replace(r#""is_pp_shared": 0"#, r#""is_pp_shared": 1"#),
        );
        assert!(e.contains("-pps"), "{e}");

        let bench = std::fs::read_to_string(testdata(BENCH)).unwrap();
        let e = error("b.json", &bench.replacen(r#""avg_ts""#, r#""avg""#, 1));
        assert!(e.starts_with("b.json: ") && e.contains("avg_ts"), "{e}");
        let e = error("b.json", &bench.replacen(r#""n_gen": 0"#, r#""n_gen": 4"#, 1));
        assert!(e.contains("test 1") && e.contains("-pg"), "{e}");
        let e = error("b.json", &bench[..bench.len() / 2]);
        assert!(e.starts_with("b.json: "), "a cut file: {e}");
        assert_eq!(error("b.json", "[]"), "b.json: no measurements in it");
        assert!(error("r.json", r#"{"schema_version": 4}"#).contains("not the output of llama-bench"));
        assert_eq!(
            detect(r#"{"schema_version": 4}"#),
            None,
            "our reports are not llama.cpp's"
        );
    }
}
