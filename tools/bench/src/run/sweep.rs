//! `--sweep AXIS=V1,V2,...`: the workload's shape as axes. Each `--sweep`
//! names one axis and its values; several make their product, the cells,
//! each run with the same protocol as a run without a sweep (its own model
//! load, warmup, single request, levels), their order rotating from one
//! repetition to the next (as the dtypes of `--dtype a,b` rotate: those are
//! cells too, on an axis of their own that is not swept).

use std::fmt;

use gpt2::{Dtype, KvDtype};

use crate::runner::MAX_CLIENTS;

/// A sweepable setting: each stands for the flag of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Axis {
    /// Tokens of every synthetic prompt (`--prompt-tokens`).
    PromptTokens,
    /// The checkpoint: a synthetic preset's name, else a hub model id or a
    /// checkpoint directory (`--model`, `--weights`, `--synthetic`).
    Model,
    /// The linear layers' weight format (`--dtype`).
    Dtype,
    /// The one concurrency level measured beside the single request (`--levels`).
    Concurrency,
    /// New tokens per request (`--max-new-tokens`).
    MaxNewTokens,
    /// The KV cache's format (`--kv-dtype`).
    KvDtype,
}

impl Axis {
    pub const ALL: [Axis; 6] = [
        Axis::PromptTokens,
        Axis::Model,
        Axis::Dtype,
        Axis::Concurrency,
        Axis::MaxNewTokens,
        Axis::KvDtype,
    ];

    /// The name `--sweep` takes, and the reports and file names use.
    pub fn name(self) -> &'static str {
        match self {
            Axis::PromptTokens => "prompt-tokens",
            Axis::Model => "model",
            Axis::Dtype => "dtype",
            Axis::Concurrency => "concurrency",
            Axis::MaxNewTokens => "max-new-tokens",
            Axis::KvDtype => "kv-dtype",
        }
    }

    /// The axis named `name`.
    pub fn from_name(name: &str) -> Option<Axis> {
        Axis::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The plain flags that set what this axis sweeps: giving one beside
    /// the axis is refused.
    pub fn flags(self) -> &'static [&'static str] {
        match self {
            Axis::PromptTokens => &["--prompt-tokens", "--prompt", "--concurrent-prompt"],
            Axis::Model => &[
                "--weights",
                "--model",
                "--synthetic",
                "--synthetic-preset",
                "--revision",
            ],
            Axis::Dtype => &["--dtype"],
            Axis::Concurrency => &["--levels"],
            Axis::MaxNewTokens => &["--max-new-tokens"],
            Axis::KvDtype => &["--kv-dtype"],
        }
    }
}

impl fmt::Display for Axis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One value of an axis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// Tokens or requests in flight.
    Count(usize),
    Dtype(Dtype),
    KvDtype(KvDtype),
    /// A preset name, hub model id or directory, as given.
    Model(String),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Count(n) => write!(f, "{n}"),
            Value::Dtype(d) => write!(f, "{d}"),
            Value::KvDtype(d) => write!(f, "{d}"),
            Value::Model(m) => f.write_str(m),
        }
    }
}

/// One `--sweep AXIS=V1,V2,...`: an axis and its values, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AxisSweep {
    pub axis: Axis,
    pub values: Vec<Value>,
}

/// Parses `AXIS=V1,V2,...` (clap's value parser for `--sweep`): a known
/// axis, at least one value, each valid for the axis and given once.
pub fn parse(spec: &str) -> Result<AxisSweep, String> {
    let known = || Axis::ALL.map(Axis::name).join(", ");
    let (name, list) = spec
        .split_once('=')
        .ok_or_else(|| format!("`{spec}` is not AXIS=V1,V2,... (axes: {})", known()))?;
    let axis = Axis::from_name(name.trim())
        .ok_or_else(|| format!("unknown axis `{}` (axes: {})", name.trim(), known()))?;
    let mut values: Vec<Value> = Vec::new();
    for raw in list.split(',').map(str::trim) {
        let v = value(axis, raw)?;
        if values.contains(&v) {
            return Err(format!("{axis}: the value `{raw}` is given twice"));
        }
        values.push(v);
    }
    Ok(AxisSweep { axis, values })
}

/// One value of `axis`, checked; the error names it.
fn value(axis: Axis, raw: &str) -> Result<Value, String> {
    if raw.is_empty() {
        return Err(format!(
            "{axis}: an empty value (values are separated by single commas)"
        ));
    }
    let count = |what: &str, max: usize| match raw.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(Value::Count(n)),
        _ if max == usize::MAX => Err(format!(
            "{axis}: `{raw}` is not a number of {what} (a whole number >= 1)"
        )),
        _ => Err(format!(
            "{axis}: `{raw}` is not a number of {what} from 1 to {max}"
        )),
    };
    match axis {
        Axis::PromptTokens => count("prompt tokens", usize::MAX),
        Axis::MaxNewTokens => count("new tokens", usize::MAX),
        Axis::Concurrency => count("requests in flight", MAX_CLIENTS),
        Axis::Dtype => raw
            .parse::<Dtype>()
            .map(Value::Dtype)
            .map_err(|e| format!("{axis}: {e}")),
        Axis::KvDtype => raw
            .parse::<KvDtype>()
            .map(Value::KvDtype)
            .map_err(|e| format!("{axis}: {e}")),
        Axis::Model => Ok(Value::Model(raw.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_and_values_parse_and_bad_ones_are_named() {
        let s = parse("prompt-tokens=6, 128,900").unwrap();
        assert_eq!(s.axis, Axis::PromptTokens);
        assert_eq!(s.values, [Value::Count(6), Value::Count(128), Value::Count(900)]);
        let d = parse("dtype=bf16,f32").unwrap();
        assert_eq!(d.values, [Value::Dtype(Dtype::Bf16), Value::Dtype(Dtype::F32)]);
        assert_eq!(parse("model=tiny,gpt2").unwrap().values[1].to_string(), "gpt2");
        let kv = parse("kv-dtype=f32,bf16").unwrap();
        assert_eq!(
            kv.values,
            [Value::KvDtype(KvDtype::F32), Value::KvDtype(KvDtype::Bf16)]
        );
        for (spec, needle) in [
            (
                "prompt-tokens=6,abc",
                "prompt-tokens: `abc` is not a number of prompt tokens",
            ),
            ("prompt-tokens=0", "`0` is not a number"),
            (
                "width=1,2",
                "unknown axis `width` (axes: prompt-tokens, model, dtype",
            ),
            ("dtype=f32,fp8", "unknown dtype `fp8`"),
            ("kv-dtype=int8", "kv-dtype: "),
            ("concurrency=2,2", "concurrency: the value `2` is given twice"),
            ("concurrency=100000", "from 1 to"),
            ("max-new-tokens=", "max-new-tokens: an empty value"),
            ("dtype", "`dtype` is not AXIS=V1,V2,..."),
        ] {
            let e = parse(spec).unwrap_err();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }
}
