//! Reading untrusted files with a bound, and writing results without ever
//! overwriting or half-writing them.
//!
//! Every small file we read from a user or a download (`config.json`,
//! `tokenizer.json`) goes through [`read_bounded`]: a file that never ends (a
//! link to `/dev/zero`, a FIFO) is refused by name instead of being read until
//! the machine runs out of memory or forever. Every result file goes through
//! [`write_new`]: written under a temporary name in the same directory, synced,
//! then linked to its final name only if that name is still free, so an
//! interrupted run leaves no partial file and a second run never replaces the
//! first one's results.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The longest `config.json` we read (the hub's GPT-2 one is 665 bytes).
pub const CONFIG_LIMIT: u64 = 1 << 20;
/// The longest `tokenizer.json` we read (GPT-2's is 1.4-3.6 MB).
pub const TOKENIZER_LIMIT: u64 = 64 << 20;

/// The whole of `path`, refusing anything but a regular file (after links)
/// and anything longer than `limit` bytes.
pub fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = check_regular(path)?;
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut bytes = Vec::with_capacity(meta.len().min(limit) as usize);
    // One byte past the limit tells "exactly the limit" from "longer": the
    // file may grow after the metadata call, so the size is not trusted.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(Error::TooLarge {
            path: path.to_owned(),
            limit,
        });
    }
    Ok(bytes)
}

/// Fills `buf` from `file` at byte `offset`, without moving a shared
/// cursor (`pread` on Unix): a read of the caller's size, into the caller's
/// buffer. A file shorter than `offset + buf.len()` is an
/// [`UnexpectedEof`](std::io::ErrorKind::UnexpectedEof) error.
pub fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(not(unix))]
    {
        use std::io::{Seek, SeekFrom};
        let mut file = file;
        file.seek(SeekFrom::Start(offset))?;
        file.read_exact(buf)
    }
}

/// The hex digest `D` of `prefix` followed by the bytes of `path`,
/// streamed; errors name the file.
pub fn hex_digest<D: sha2::Digest + Write>(path: &Path, prefix: &[u8]) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = D::new();
    hasher.update(prefix);
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Fails, naming the file and what it is, unless `path` is a regular file
/// (after links). Checked before opening: opening a FIFO for reading blocks
/// until something writes to it.
pub fn check_regular(path: &Path) -> Result<fs::Metadata> {
    let meta = fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::NotAFile {
            path: path.to_owned(),
            kind: file_kind(&meta),
        });
    }
    Ok(meta)
}

/// As [`read_bounded`], as UTF-8 text.
pub fn read_bounded_string(path: &Path, limit: u64) -> Result<String> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|e| {
        Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        )
    })
}

fn file_kind(meta: &fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

/// Writes `bytes` to `path`, which must not exist yet: through a temporary
/// file in the same directory, synced, then hard-linked to `path` (which fails
/// if `path` was taken meanwhile, so nothing is ever replaced) and unlinked.
/// Errors name the path; an existing `path` is [`Error::Exists`].
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    write_new_set(&[(path, bytes)])
}

/// Writes a set of new files all or nothing: every file is written and
/// synced under a temporary name first, then each is linked to its name. If
/// any name is taken ([`Error::Exists`]) or a link fails, the files of the
/// set already linked are removed again, so a set is never left in part.
pub fn write_new_set(files: &[(&Path, &[u8])]) -> Result<()> {
    let mut temps = Vec::with_capacity(files.len());
    let cleanup = |temps: &[PathBuf]| {
        for t in temps {
            let _ = fs::remove_file(t);
        }
    };
    for (path, bytes) in files {
        let tmp = temp_name(path);
        let written = (|| {
            let mut f = fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        temps.push(tmp);
        if let Err(e) = written {
            cleanup(&temps);
            return Err(Error::Write {
                path: path.to_path_buf(),
                source: e,
            });
        }
    }
    let mut linked: Vec<&Path> = Vec::new();
    for ((path, _), tmp) in files.iter().zip(&temps) {
        if let Err(e) = fs::hard_link(tmp, path) {
            for done in &linked {
                let _ = fs::remove_file(done);
            }
            cleanup(&temps);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                Error::Write {
                    path: path.to_path_buf(),
                    source: e,
                }
            });
        }
        linked.push(path);
    }
    cleanup(&temps);
    Ok(())
}

/// Fails, naming the directory, unless files can be created in `dir` (made
/// if missing): checked before a long run, not after it.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::Write {
        path: dir.to_owned(),
        source: e,
    })?;
    let probe = temp_name(&dir.join("write-check"));
    let made = fs::OpenOptions::new().write(true).create_new(true).open(&probe);
    let _ = fs::remove_file(&probe);
    made.map(|_| ()).map_err(|e| Error::Write {
        path: dir.to_owned(),
        source: e,
    })
}

/// `.NAME.PID.N.tmp` beside `path`: unique within this process, hidden, and
/// matched by the project's `*.tmp` ignore rule.
fn temp_name(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gpt2-files-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn reads_are_bounded_and_name_the_file() {
        let d = dir("bounded");
        let p = d.join("config.json");
        fs::write(&p, vec![b' '; 100]).unwrap();
        assert_eq!(read_bounded(&p, 100).unwrap().len(), 100);
        let err = read_bounded(&p, 99).unwrap_err().to_string();
        assert!(err.contains("config.json") && err.contains("99 bytes"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn an_endless_device_is_refused_without_reading_it() {
        let d = dir("device");
        let p = d.join("config.json");
        std::os::unix::fs::symlink("/dev/zero", &p).unwrap();
        let err = read_bounded(&p, CONFIG_LIMIT).unwrap_err().to_string();
        assert!(
            err.contains("config.json") && err.contains("character device"),
            "{err}"
        );
    }

    #[test]
    fn write_new_never_replaces_and_leaves_no_temporary() {
        let d = dir("write");
        let p = d.join("report.json");
        write_new(&p, b"first").unwrap();
        let err = write_new(&p, b"second").unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert!(err.to_string().contains("report.json"), "{err}");
        assert_eq!(fs::read(&p).unwrap(), b"first");
        let left: Vec<_> = fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("report.json")]);
    }

    #[test]
    fn a_set_is_written_whole_or_not_at_all() {
        let d = dir("set");
        let (a, b) = (d.join("r.json"), d.join("r.md"));
        fs::write(&b, b"taken").unwrap();
        let err = write_new_set(&[(&a, b"1"), (&b, b"2")]).unwrap_err();
        assert!(matches!(err, Error::Exists { .. }), "{err}");
        assert!(!a.exists(), "a partial set was left behind");
        assert_eq!(fs::read(&b).unwrap(), b"taken");
        fs::remove_file(&b).unwrap();
        write_new_set(&[(&a, b"1"), (&b, b"2")]).unwrap();
        assert_eq!(
            (fs::read(&a).unwrap(), fs::read(&b).unwrap()),
            (b"1".to_vec(), b"2".to_vec())
        );
        assert_eq!(fs::read_dir(&d).unwrap().count(), 2, "temporaries left");
    }

    #[test]
    fn an_unwritable_directory_is_named_before_any_work() {
        let d = dir("unwritable");
        let file = d.join("plain-file");
        fs::write(&file, b"x").unwrap();
        // A directory under a regular file cannot exist, even for root.
        let err = check_writable_dir(&file.join("out")).unwrap_err().to_string();
        assert!(err.contains("plain-file/out"), "{err}");
        check_writable_dir(&d.join("new/nested")).unwrap();
    }
}
