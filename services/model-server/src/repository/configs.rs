//! What a model config may say, checked before anything changes (names as TF Serving
//! allows them, base paths under the allowed roots), which versions on disk it asks for,
//! and looking at the disk again for new ones.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{ModelConfig, Repository, VersionPolicy};
use crate::error::ServeError;

impl Repository {
    /// Reconciles every `period`, first after one period, for as long as it is polled: how
    /// new versions on disk are picked up (the model server, and the stream processor's
    /// embedded mode). The directory scans run on tokio's blocking pool; loads start their
    /// own threads and are not waited for.
    pub async fn follow_versions(self, period: std::time::Duration) {
        loop {
            tokio::time::sleep(period).await;
            let repository = self.clone();
            let _ = tokio::task::spawn_blocking(move || drop(repository.reconcile())).await;
        }
    }
}

/// Numeric subdirectories of a model's base path, as TF Serving discovers versions.
pub fn list_versions(base_path: &Path) -> std::io::Result<BTreeSet<i64>> {
    let mut versions = BTreeSet::new();
    for entry in std::fs::read_dir(base_path)? {
        let entry = entry?;
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if let Some(version) = entry.file_name().to_str().and_then(|n| n.parse::<i64>().ok()).filter(|v| *v >= 0) {
            versions.insert(version);
        }
    }
    Ok(versions)
}

pub(super) fn aspired_versions(policy: &VersionPolicy, on_disk: &BTreeSet<i64>) -> BTreeSet<i64> {
    match policy {
        VersionPolicy::Latest(n) => on_disk.iter().rev().take((*n).max(1)).copied().collect(),
        VersionPolicy::All => on_disk.clone(),
        VersionPolicy::Specific(wanted) => wanted.intersection(on_disk).copied().collect(),
    }
}

/// Longest model name accepted.
pub const MAX_MODEL_NAME_LEN: usize = 256;

/// Whether `name` may name a model: 1-256 of `[A-Za-z0-9_.-]`, not starting with a dot.
/// Names become URL path segments (REST), metric labels and thread names, so anything else
/// (a NUL, a slash, a newline) is refused where the config is read, never met later.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_MODEL_NAME_LEN
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// TF Serving's rules (unique model names, labels of `[a-zA-Z0-9_]+`), plus ours: model
/// names per [`valid_model_name`], and with `allowed` roots set, base paths under one of them.
pub(super) fn validate_configs(configs: &[ModelConfig], allowed: &[PathBuf]) -> Result<(), ServeError> {
    let mut names = BTreeSet::new();
    for config in configs {
        if !valid_model_name(&config.name) {
            let shown: String = config.name.chars().take(64).collect();
            return Err(ServeError::InvalidArgument(format!(
                "model name {shown:?} is invalid: names are 1-{MAX_MODEL_NAME_LEN} characters of \
                 [A-Za-z0-9_.-], not starting with a dot"
            )));
        }
        if !names.insert(&config.name) {
            return Err(ServeError::InvalidArgument(format!("model {:?} is configured twice", config.name)));
        }
        if config.base_path.as_os_str().is_empty() {
            return Err(ServeError::InvalidArgument(format!("model {:?} has an empty base_path", config.name)));
        }
        if !allowed.is_empty() && !allowed_base_path(&config.base_path, allowed) {
            // The roots are the operator's; the refused path is the caller's own: neither leaks.
            return Err(ServeError::InvalidArgument(format!(
                "model {:?}: base_path is outside the directories this server may serve models from \
                 (--model_base_path_allow)",
                config.name
            )));
        }
        for label in config.labels.keys() {
            if label.is_empty() || !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(ServeError::InvalidArgument(format!(
                    "label {label:?} of model {:?} is invalid: labels must match [a-zA-Z0-9_]+",
                    config.name
                )));
            }
        }
    }
    Ok(())
}

/// Whether `path` lies under one of `roots`: absolute, no `..` component, and (when it
/// exists) still under a root once symlinks are resolved.
fn allowed_base_path(path: &Path, roots: &[PathBuf]) -> bool {
    use std::path::Component;
    if !path.is_absolute() || path.components().any(|c| matches!(c, Component::ParentDir)) {
        return false;
    }
    let under = |p: &Path| {
        roots.iter().any(|root| p.starts_with(root) || root.canonicalize().is_ok_and(|root| p.starts_with(root)))
    };
    under(path) && path.canonicalize().map_or(true, |real| under(&real))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policies_pick_like_tf_serving() {
        let disk: BTreeSet<i64> = [1, 2, 5].into();
        assert_eq!(aspired_versions(&VersionPolicy::Latest(1), &disk), [5].into());
        assert_eq!(aspired_versions(&VersionPolicy::Latest(2), &disk), [2, 5].into());
        assert_eq!(aspired_versions(&VersionPolicy::All, &disk), disk);
        assert_eq!(aspired_versions(&VersionPolicy::Specific([2, 7].into()), &disk), [2].into());
    }

    #[test]
    fn labels_must_be_word_characters() {
        let config = |label: &str| ModelConfig {
            name: "m".into(),
            base_path: "/m".into(),
            policy: VersionPolicy::All,
            labels: [(label.to_owned(), 1)].into(),
        };
        assert!(validate_configs(&[config("stable_2")], &[]).is_ok());
        let error = validate_configs(&[config("can-ary")], &[]).unwrap_err();
        assert!(error.to_string().contains("[a-zA-Z0-9_]+"), "{error}");
    }

    #[test]
    fn model_names_that_could_break_a_path_a_label_or_a_thread_are_refused() {
        let config = |name: &str| ModelConfig {
            name: name.into(),
            base_path: "/m".into(),
            policy: VersionPolicy::All,
            labels: Default::default(),
        };
        for name in ["car-anomaly", "m.v2", "A_1"] {
            assert!(validate_configs(&[config(name)], &[]).is_ok(), "{name}");
        }
        let long = "x".repeat(MAX_MODEL_NAME_LEN + 1);
        for name in ["", "nul\0byte", "a/b", ".hidden", "new\nline", "sp ace", long.as_str()] {
            let error = validate_configs(&[config(name)], &[]).unwrap_err();
            assert!(error.to_string().contains("[A-Za-z0-9_.-]"), "{name:?}: {error}");
        }
    }

    #[test]
    fn base_paths_outside_the_allowed_roots_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let inside = root.path().join("models/car");
        std::fs::create_dir_all(&inside).unwrap();
        let roots = [root.path().to_owned()];
        let config = |base_path: PathBuf| ModelConfig {
            name: "m".into(),
            base_path,
            policy: VersionPolicy::All,
            labels: Default::default(),
        };
        assert!(validate_configs(&[config(inside.clone())], &roots).is_ok());
        assert!(validate_configs(&[config(root.path().join("not-yet-there"))], &roots).is_ok());
        for outside in [PathBuf::from("/proc"), root.path().join("models/../../etc"), PathBuf::from("relative/m")] {
            let error = validate_configs(&[config(outside.clone())], &roots).unwrap_err();
            assert!(error.to_string().contains("--model_base_path_allow"), "{outside:?}: {error}");
            assert!(!error.to_string().contains(&root.path().display().to_string()), "leaks the root: {error}");
        }
        // A symlink inside a root that points out of it is outside.
        let link = root.path().join("escape");
        std::os::unix::fs::symlink("/proc", &link).unwrap();
        assert!(validate_configs(&[config(link)], &roots).is_err());
        // Without roots, any path is accepted (as TF Serving does).
        assert!(validate_configs(&[config("/proc".into())], &[]).is_ok());
    }
}
