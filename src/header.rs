//! The safetensors header, checked tensor by tensor before the `safetensors`
//! crate reads it, so that every fault names its tensor.
//!
//! The crate reports some inconsistencies without a name (`invalid shape,
//! data type, or offset for tensor`) and keeps the last of two entries with
//! the same key. Here each entry's dtype, shape and byte range are checked
//! against each other and against the file, and a key given twice is an
//! error naming it.

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::path::Path;

use safetensors::tensor::Metadata;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::Value;

use crate::error::{Error, Result};

/// The largest header we read, as the `safetensors` crate (100 MB).
const MAX_HEADER: u64 = 100_000_000;

/// The header of the safetensors file `file` (opened from `path`, `file_len`
/// bytes long), read with two bounded reads (its length, then at most
/// `MAX_HEADER` bytes, never more than the file holds), checked entry by
/// entry, then parsed by the `safetensors` crate. Returns where the data
/// starts (`8 + n`) and the crate's metadata, whose offsets count from there.
pub fn read(path: &Path, file: &File, file_len: u64) -> Result<(u64, Metadata)> {
    let bad = |msg: String| Error::Safetensors {
        path: path.to_owned(),
        msg,
    };
    if file_len < 8 {
        return Err(bad(format!(
            "the file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut len = [0; 8];
    crate::files::read_exact_at(file, &mut len, 0).map_err(|e| Error::io(path, e))?;
    let n = header_len(path, len, file_len)?;
    let mut header = vec![0; n as usize];
    crate::files::read_exact_at(file, &mut header, 8).map_err(|e| Error::io(path, e))?;
    check_entries(path, &header, file_len - 8 - n)?;
    let metadata = serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    Ok((8 + n, metadata))
}

/// Checks the header of the safetensors file `bytes` (read from `path`).
#[cfg(test)]
fn check(path: &Path, bytes: &[u8]) -> Result<()> {
    let Some(len) = bytes.get(..8) else {
        return Err(Error::Safetensors {
            path: path.to_owned(),
            msg: format!(
                "the file is {} bytes, shorter than the 8-byte header length",
                bytes.len()
            ),
        });
    };
    let file_len = bytes.len() as u64;
    let n = header_len(path, len.try_into().expect("8 bytes"), file_len)?;
    check_entries(path, &bytes[8..8 + n as usize], file_len - 8 - n)
}

/// The header length `len` (the file's first 8 bytes) says, checked against
/// the file's length and [`MAX_HEADER`].
fn header_len(path: &Path, len: [u8; 8], file_len: u64) -> Result<u64> {
    let bad = |msg: String| Error::Safetensors {
        path: path.to_owned(),
        msg,
    };
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER {
        return Err(bad(format!(
            "header too large: it claims {n} bytes, more than the {MAX_HEADER} we read"
        )));
    }
    if 8 + n > file_len {
        return Err(bad(format!(
            "invalid header length: the header claims {n} bytes, but the file has only {} after the length",
            file_len - 8
        )));
    }
    Ok(n)
}

/// Checks each entry of `header` against the `data_len` bytes of data after it.
fn check_entries(path: &Path, header: &[u8], data_len: u64) -> Result<()> {
    let bad = |msg: String| Error::Safetensors {
        path: path.to_owned(),
        msg,
    };
    let entries = Entries::parse(header).map_err(|e| bad(format!("header: {e}")))?;
    let mut ranges: Vec<(u64, u64, &str)> = Vec::with_capacity(entries.0.len());
    for (name, value) in &entries.0 {
        if name == "__metadata__" {
            continue;
        }
        let tensor = |msg: String| bad(format!("tensor `{name}`: {msg}"));
        let entry: RawEntry = serde_json::from_value(value.clone()).map_err(|e| tensor(e.to_string()))?;
        let Some(bits) = dtype_bits(&entry.dtype) else {
            return Err(tensor(format!("unknown dtype {:?}", entry.dtype)));
        };
        let [start, end] = entry.data_offsets;
        if start > end {
            return Err(tensor(format!(
                "data_offsets [{start}, {end}] end before they start"
            )));
        }
        if end > data_len {
            return Err(tensor(format!(
                "data_offsets [{start}, {end}] run past the {data_len} bytes of data in the file"
            )));
        }
        let needed = entry
            .shape
            .iter()
            .try_fold(bits, |acc, &d| acc.checked_mul(d))
            .map(|b| b.div_ceil(8));
        match needed {
            Some(needed) if needed == end - start => {}
            Some(needed) => {
                return Err(tensor(format!(
                    "shape {:?} of {} needs {needed} bytes, but data_offsets [{start}, {end}] hold {}",
                    entry.shape,
                    entry.dtype,
                    end - start
                )))
            }
            None => return Err(tensor(format!("shape {:?} overflows a byte count", entry.shape))),
        }
        ranges.push((start, end, name));
    }
    ranges.sort_unstable();
    let mut covered = 0;
    let mut previous: Option<&str> = None;
    for &(start, end, name) in &ranges {
        if start != covered {
            let what = if start < covered {
                "overlaps"
            } else {
                "leaves a gap after"
            };
            return Err(bad(format!(
                "tensor `{name}`: starts at byte {start} and {what} {}, which ends at {covered}",
                previous.map_or("the start of the data".into(), |p| format!("tensor `{p}`"))
            )));
        }
        covered = end;
        previous = Some(name);
    }
    if covered != data_len {
        return Err(bad(format!(
            "the tensors cover {covered} of the {data_len} bytes of data in the file"
        )));
    }
    Ok(())
}

/// Bits per element of a safetensors dtype; `None` if unknown.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "I64" | "U64" | "F64" | "C64" => 64,
        _ => return None,
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// The header's top-level entries in file order, refusing a repeated key.
struct Entries(Vec<(String, Value)>);

impl Entries {
    fn parse(header: &[u8]) -> Result<Self, String> {
        let mut de = serde_json::Deserializer::from_slice(header);
        let entries = de.deserialize_map(EntriesVisitor).map_err(|e| e.to_string())?;
        // Trailing spaces are allowed (the format pads the header with them).
        de.end().map_err(|e| e.to_string())?;
        Ok(entries)
    }
}

struct EntriesVisitor;

impl<'de> Visitor<'de> for EntriesVisitor {
    type Value = Entries;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object of tensors")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
        let mut seen = HashSet::new();
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!("the key `{key}` appears twice")));
            }
            entries.push((key, map.next_value::<Value>()?));
        }
        Ok(Entries(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(header.as_bytes());
        b.resize(b.len() + data, 0);
        b
    }

    fn err(header: &str, data: usize) -> String {
        check(Path::new("m.safetensors"), &file(header, data))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_consistent_header_passes() {
        let h = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}  "#;
        check(Path::new("m.safetensors"), &file(h, 32)).unwrap();
    }

    #[test]
    fn every_fault_names_its_tensor() {
        for (header, data, needles) in [
            (
                r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}}"#,
                20,
                &["`a`", "needs 24 bytes", "hold 20"][..],
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#,
                12,
                &["`w`", "gap after tensor `a`"][..],
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                &["overlaps"][..],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
                8,
                &["`w`", "run past the 8 bytes"][..],
            ),
            (
                r#"{"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,2]}}"#,
                2,
                &["`w`", "unknown dtype \"Q4\""][..],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,2]}}"#,
                2,
                &["`w`", "overflows"][..],
            ),
            (
                r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"extra":1}}"#,
                4,
                &["`w`", "extra"][..],
            ),
        ] {
            let e = err(header, data);
            for n in needles {
                assert!(e.contains(n), "{header}: {n:?} not in {e}");
            }
        }
    }

    #[test]
    fn a_key_given_twice_is_refused() {
        let h = r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let e = err(h, 4);
        assert!(e.contains("`w` appears twice"), "{e}");
    }

    #[test]
    fn lengths_past_the_file_are_refused() {
        let mut b = 1_000u64.to_le_bytes().to_vec();
        b.extend_from_slice(b"{}");
        let e = check(Path::new("m.safetensors"), &b).unwrap_err().to_string();
        assert!(e.contains("claims 1000 bytes"), "{e}");
        // An empty header is valid (no tensors), but not with data after it.
        check(Path::new("m.safetensors"), &file("{}", 0)).unwrap();
        assert!(err("{}", 4).contains("cover 0 of the 4 bytes"));
    }
}
