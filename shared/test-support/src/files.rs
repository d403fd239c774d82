//! Files a test writes for the code under test to read, kept until the test drops them.

use std::path::{Path, PathBuf};

/// A file in a fresh temporary directory: its path, and the directory (deleted on drop).
pub struct TempFile {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

/// Writes `text` to a file named `name` in a fresh temporary directory (a config file for
/// a service's layering tests, say).
pub fn temp_file(name: &str, text: &str) -> TempFile {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap_or_else(|error| panic!("writing {}: {error}", path.display()));
    TempFile { path, _dir: dir }
}

/// Copies the directory `from` (a SavedModel version, say) to `to`, recursively.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|error| panic!("creating {}: {error}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|error| panic!("reading {}: {error}", from.display())) {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target)
                .unwrap_or_else(|error| panic!("copying {} to {}: {error}", entry.path().display(), target.display()));
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_file_lives_as_long_as_its_handle() {
        let file = super::temp_file("a.toml", "x = 1\n");
        assert_eq!(std::fs::read_to_string(&file.path).unwrap(), "x = 1\n");
        let path = file.path.clone();
        drop(file);
        assert!(!path.exists());
    }
}
