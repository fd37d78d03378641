//! Where a run happened: the facts about this build and machine that go into
//! a report's [`Metadata`](super::Metadata) and its file names.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::Sha256;

/// The SHA-256 of a file, in hex; the error names the file.
pub fn sha256_file(path: &Path) -> Result<String, String> {
    gpt2::files::hex_digest::<Sha256>(path, b"").map_err(|e| e.to_string())
}

/// The commit of the source tree this binary was built from, `-dirty` if
/// tracked files had changes, or `unknown` without git.
pub fn git_commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "HEAD"]) {
        Some(commit) => {
            let dirty =
                git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
            if dirty {
                format!("{commit}-dirty")
            } else {
                commit
            }
        }
        None => "unknown".into(),
    }
}

/// The CPU: model name, family, model and stepping, and the vector features the
/// kernels care about (e.g. `AMD EPYC (family 25, model 1, stepping 1; avx2 fma)`).
pub fn cpu_model() -> String {
    gpt2_kernels::CpuInfo::detect().to_string()
}

/// `2026-11-28T04:35:12Z` (`pretty`) or `20261128T043512Z` (for file names).
pub fn utc_timestamp(t: SystemTime, pretty: bool) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    if pretty {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}{month:02}{day:02}T{h:02}{m:02}{s:02}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_civil_utc() {
        let t = |s| UNIX_EPOCH + Duration::from_secs(s);
        assert_eq!(utc_timestamp(t(0), true), "1970-01-01T00:00:00Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        assert_eq!(utc_timestamp(t(951_827_696), true), "2000-02-29T12:34:56Z");
        assert_eq!(utc_timestamp(t(951_827_696), false), "20000229T123456Z");
    }

    #[test]
    fn sha256_of_a_file_and_a_missing_one() {
        let path = std::env::temp_dir().join(format!("gpt2-meta-sha-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        std::fs::remove_file(&path).unwrap();
        assert!(sha256_file(&path).unwrap_err().contains("cannot read"));
    }
}
