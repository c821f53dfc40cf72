//! File helpers shared by the store's modules: error context, numbered files, atomic replacement.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use super::commit_log::StoreError;

/// Digits in the name of a numbered file (commit-log segments, index files).
pub const NUMBERED_NAME_DIGITS: usize = 20;

/// Maps an I/O error to a [`StoreError`] naming what was done to which path.
pub fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// `root/component`, refused unless `component` is one plain path component, so the result stays
/// under `root`. Names are validated before they get here; this is the last line of defence.
pub fn child_path(root: &Path, component: &str) -> Result<PathBuf, StoreError> {
    let outside = || StoreError::OutsideDataDir {
        root: root.to_owned(),
        path: root.join(component),
    };
    let mut components = Path::new(component).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(part)), None) if part == component && !component.contains('\0') => {
            let path = root.join(part);
            if path.starts_with(root) && path.parent() == Some(root) {
                Ok(path)
            } else {
                Err(outside())
            }
        }
        _ => Err(outside()),
    }
}

/// The name of numbered file `number`: 20 zero-padded digits, so names sort like numbers.
pub fn numbered_name(number: u64) -> String {
    format!("{number:0width$}", width = NUMBERED_NAME_DIGITS)
}

/// The numbered files in `dir`, sorted; other files are ignored.
pub fn numbered_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StoreError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list", dir))? {
        let entry = entry.map_err(io_error("list", dir))?;
        let name = entry.file_name();
        if let Some(number) = name
            .to_str()
            .filter(|name| {
                name.len() == NUMBERED_NAME_DIGITS && name.bytes().all(|b| b.is_ascii_digit())
            })
            .and_then(|name| name.parse::<u64>().ok())
        {
            found.push((number, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// fsyncs a directory, making file creations, renames and deletions in it durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io_error("fsync directory", dir))
}

/// Replaces `dir/name` with `contents` so that a crash leaves the old or the new file, never a mix:
/// write a temporary file, fsync it, rename it over the old one, fsync the directory.
pub fn replace_file(dir: &Path, name: &str, contents: &[u8]) -> Result<(), StoreError> {
    let path = dir.join(name);
    let temporary = dir.join(format!("{name}.tmp"));
    let mut file = File::create(&temporary).map_err(io_error("create", &temporary))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &temporary))?;
    fs::rename(&temporary, &path).map_err(io_error("rename", &temporary))?;
    sync_dir(dir)
}

/// Reads a file holding one big-endian u64; `None` when it does not exist or is not 8 bytes.
pub fn read_u64(path: &Path) -> Result<Option<u64>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(<[u8; 8]>::try_from(bytes.as_slice())
            .ok()
            .map(u64::from_be_bytes)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StoreError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn child_paths_stay_one_level_below_their_root() {
        let root = Path::new("/data/consumequeue");
        assert_eq!(
            child_path(root, "TopicTest").expect("plain"),
            root.join("TopicTest")
        );
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/etc",
            "a/",
            "./a",
            "a\0b",
            "%DLQ%../../x",
        ] {
            assert!(
                matches!(
                    child_path(root, bad),
                    Err(StoreError::OutsideDataDir { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
