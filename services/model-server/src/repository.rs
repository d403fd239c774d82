//! The model repository: which versions of which models are served, and their states.
//!
//! Requests read an immutable [`ServingTable`] snapshot through an `ArcSwap` (no lock on
//! the hot path). Everything that changes what is served (a poll of `model_base_path`, a
//! config reload, a finished load) goes through [`Repository::reconcile`], which holds the
//! control lock, decides, and publishes a new snapshot. Loads run on their own threads, so
//! a large model loading never delays requests to the others, and a new version replaces
//! an old one only once it is AVAILABLE (TF Serving's availability-preserving policy): a
//! version that fails to load is reported and never displaces a healthy one. An unloaded
//! version is dropped when its last in-flight request finishes; its memory goes with it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use savedmodel::{SavedModel, SignaturePlan, SignatureSpec};

use crate::batching::{Scheduler, SchedulingMode};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::warmup;

mod configs;

pub use configs::{MAX_MODEL_NAME_LEN, list_versions, valid_model_name};
use configs::{aspired_versions, validate_configs};

/// How versions are chosen from those found on disk (TF Serving's `model_version_policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The highest `n` versions (TF Serving's default is 1).
    Latest(usize),
    All,
    Specific(BTreeSet<i64>),
}

/// One served model, as given by `--model_name/--model_base_path` or a `model_config_list`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelConfig {
    pub name: String,
    pub base_path: PathBuf,
    pub policy: VersionPolicy,
    pub labels: BTreeMap<String, i64>,
}

/// Repository-wide settings.
#[derive(Debug, Clone)]
pub struct RepositoryOptions {
    pub scheduling: SchedulingMode,
    pub enable_warmup: bool,
    pub saved_model_tags: Vec<String>,
    /// When not empty, model base paths must lie under one of these (`--model_base_path_allow`).
    pub allowed_base_paths: Vec<PathBuf>,
}

/// TF Serving's `ModelVersionStatus.State`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionState {
    Start,
    Loading,
    Available,
    Unloading,
    End,
}

impl VersionState {
    /// The enum value in `get_model_status.proto`.
    pub fn proto_value(self) -> i32 {
        match self {
            VersionState::Start => 10,
            VersionState::Loading => 20,
            VersionState::Available => 30,
            VersionState::Unloading => 40,
            VersionState::End => 50,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            VersionState::Start => "START",
            VersionState::Loading => "LOADING",
            VersionState::Available => "AVAILABLE",
            VersionState::Unloading => "UNLOADING",
            VersionState::End => "END",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionStatus {
    pub version: i64,
    pub state: VersionState,
    /// Why the version failed to load, if it did.
    pub error: Option<String>,
}

/// Which version a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSelector {
    Latest,
    Version(i64),
    Label(String),
}

/// One signature of a loaded version: ready to run, or the reason it cannot be.
#[derive(Debug)]
pub enum ServedSignature {
    Ready { plan: Arc<SignaturePlan>, scheduler: Scheduler },
    Failed { reason: String },
}

/// A loaded model version. Shared by in-flight requests; dropped (and its memory freed)
/// after the last one finishes once it is no longer in the serving table.
#[derive(Debug)]
pub struct LoadedVersion {
    pub model: String,
    pub version: i64,
    pub dir: PathBuf,
    /// Every signature's interface, including ones the engine cannot run.
    pub specs: BTreeMap<String, SignatureSpec>,
    pub signatures: BTreeMap<String, ServedSignature>,
    repository: Weak<RepositoryState>,
}

impl LoadedVersion {
    /// What a request to `signature` of this version is counted under in metrics: the
    /// signature's name only if the model defines it, never a name a client made up (an
    /// unknown one counts under the empty label).
    pub fn metrics_target(&self, signature: &str) -> (String, i64, String) {
        let label = if self.specs.contains_key(signature) { signature.to_owned() } else { String::new() };
        (self.model.clone(), self.version, label)
    }

    /// The runnable plan and scheduler for `signature`.
    pub fn signature(&self, signature: &str) -> Result<(&Arc<SignaturePlan>, &Scheduler), ServeError> {
        match self.signatures.get(signature) {
            Some(ServedSignature::Ready { plan, scheduler }) => Ok((plan, scheduler)),
            Some(ServedSignature::Failed { reason }) => Err(ServeError::SignatureUnavailable {
                model: self.model.clone(),
                version: self.version,
                signature: signature.to_owned(),
                reason: reason.clone(),
            }),
            None => Err(ServeError::SignatureNotFound {
                model: self.model.clone(),
                version: self.version,
                signature: signature.to_owned(),
                available: self.specs.keys().cloned().collect(),
            }),
        }
    }
}

impl Drop for LoadedVersion {
    fn drop(&mut self) {
        if let Some(shared) = self.repository.upgrade() {
            for name in self.signatures.keys() {
                shared.metrics.forget_signature(&self.model, self.version, name);
            }
            shared.set_state_if(&self.model, self.version, VersionState::Unloading, VersionState::End);
        }
    }
}

/// What requests see: the AVAILABLE versions and labels of every model.
#[derive(Debug, Default, Clone)]
pub struct ServingTable {
    pub models: HashMap<String, ServedModel>,
}

#[derive(Debug, Default, Clone)]
pub struct ServedModel {
    pub versions: BTreeMap<i64, Arc<LoadedVersion>>,
    pub labels: BTreeMap<String, i64>,
}

#[derive(Debug)]
struct Control {
    configs: Vec<ModelConfig>,
    /// Versions with a load under way.
    loading: BTreeSet<(String, i64)>,
    /// Versions that failed to load; not retried until they leave the aspired set.
    failed: BTreeSet<(String, i64)>,
    /// Per model, the versions its policy wants among those on disk at the last scan.
    aspired: BTreeMap<String, BTreeSet<i64>>,
}

#[derive(Debug)]
struct RepositoryState {
    table: ArcSwap<ServingTable>,
    control: Mutex<Control>,
    /// Locked only briefly and never while dropping a table or a version.
    statuses: Mutex<BTreeMap<String, BTreeMap<i64, VersionStatus>>>,
    options: RepositoryOptions,
    metrics: Metrics,
}

/// Cheap to clone; all clones are the same repository.
#[derive(Debug, Clone)]
pub struct Repository {
    shared: Arc<RepositoryState>,
}

impl Repository {
    pub fn new(configs: Vec<ModelConfig>, options: RepositoryOptions, metrics: Metrics) -> Result<Self, ServeError> {
        validate_configs(&configs, &options.allowed_base_paths)?;
        Ok(Self {
            shared: Arc::new(RepositoryState {
                table: ArcSwap::from_pointee(ServingTable::default()),
                control: Mutex::new(Control {
                    configs,
                    loading: BTreeSet::new(),
                    failed: BTreeSet::new(),
                    aspired: BTreeMap::new(),
                }),
                statuses: Mutex::new(BTreeMap::new()),
                options,
                metrics,
            }),
        })
    }

    /// The current snapshot of what is served.
    pub fn table(&self) -> Arc<ServingTable> {
        self.shared.table.load_full()
    }

    pub fn model_names(&self) -> Vec<String> {
        self.shared.lock_control().configs.iter().map(|c| c.name.clone()).collect()
    }

    /// Whether the server can answer: at least one model configured, and every configured
    /// model with a version AVAILABLE. An empty model list is not ready: it serves nothing.
    pub fn readiness(&self) -> Result<(), String> {
        let names = self.model_names();
        if names.is_empty() {
            return Err("no model is configured".into());
        }
        let table = self.table();
        let missing: Vec<String> = names.into_iter().filter(|m| !table.models.contains_key(m)).collect();
        if missing.is_empty() { Ok(()) } else { Err(format!("no available version yet: {}", missing.join(", "))) }
    }

    /// Finds the version a request addresses.
    pub fn resolve(&self, model: &str, selector: &VersionSelector) -> Result<Arc<LoadedVersion>, ServeError> {
        let table = self.shared.table.load();
        let Some(served) = table.models.get(model) else {
            if self.model_names().iter().any(|m| m == model) {
                return Err(ServeError::NoVersionAvailable { model: model.to_owned() });
            }
            return Err(ServeError::ModelNotFound { model: model.to_owned(), served: self.model_names() });
        };
        let version = match selector {
            VersionSelector::Latest => {
                *served.versions.keys().next_back().ok_or(ServeError::NoVersionAvailable { model: model.to_owned() })?
            }
            VersionSelector::Version(v) => *v,
            VersionSelector::Label(label) => *served.labels.get(label).ok_or_else(|| ServeError::LabelNotFound {
                model: model.to_owned(),
                label: label.clone(),
                labels: served.labels.keys().cloned().collect(),
            })?,
        };
        served.versions.get(&version).cloned().ok_or_else(|| ServeError::VersionNotFound {
            model: model.to_owned(),
            version,
            available: served.versions.keys().copied().collect(),
        })
    }

    /// Version states for `GetModelStatus`, newest first.
    pub fn status(&self, model: &str, selector: &VersionSelector) -> Result<Vec<VersionStatus>, ServeError> {
        let statuses = self.shared.lock_statuses();
        let Some(versions) = statuses.get(model) else {
            drop(statuses);
            if self.model_names().iter().any(|m| m == model) {
                return Err(ServeError::NoVersionAvailable { model: model.to_owned() });
            }
            return Err(ServeError::ModelNotFound { model: model.to_owned(), served: self.model_names() });
        };
        let wanted = match selector {
            VersionSelector::Latest => None,
            VersionSelector::Version(v) => Some(*v),
            VersionSelector::Label(label) => {
                let table = self.shared.table.load();
                let version = table.models.get(model).and_then(|m| m.labels.get(label)).copied();
                Some(version.ok_or_else(|| ServeError::LabelNotFound {
                    model: model.to_owned(),
                    label: label.clone(),
                    labels: table.models.get(model).map(|m| m.labels.keys().cloned().collect()).unwrap_or_default(),
                })?)
            }
        };
        let mut out: Vec<VersionStatus> = match wanted {
            Some(v) => versions.get(&v).cloned().into_iter().collect(),
            None => versions.values().cloned().collect(),
        };
        if out.is_empty() {
            let available = versions.keys().copied().collect();
            return Err(ServeError::VersionNotFound {
                model: model.to_owned(),
                version: wanted.unwrap_or(0),
                available,
            });
        }
        out.reverse();
        Ok(out)
    }

    /// Replaces the model list (`HandleReloadConfigRequest`, or a changed config file).
    /// Labels may only point at versions that are AVAILABLE now, or at versions of a model
    /// that is new in this config (they apply once it loads).
    pub fn set_configs(&self, configs: Vec<ModelConfig>) -> Result<Vec<JoinHandle<()>>, ServeError> {
        validate_configs(&configs, &self.shared.options.allowed_base_paths)?;
        {
            let table = self.shared.table.load();
            let mut control = self.shared.lock_control();
            for config in &configs {
                let existing = control.configs.iter().any(|c| c.name == config.name);
                for (label, version) in &config.labels {
                    let available = table.models.get(&config.name).is_some_and(|m| m.versions.contains_key(version));
                    if existing && !available {
                        return Err(ServeError::FailedPrecondition(format!(
                            "label {label:?} of model {:?} points at version {version}, which is not available",
                            config.name
                        )));
                    }
                }
            }
            // A changed config gives failed versions another chance.
            control.failed.clear();
            control.configs = configs;
        }
        Ok(self.reconcile())
    }

    /// Scans every model's base path and converges: starts loads of wanted versions, unloads
    /// unwanted ones once a wanted version is available, refreshes labels. Returns the load
    /// threads it started (startup waits for them; the poller does not).
    ///
    /// The control lock is held only to decide: the directory scans run before it is taken,
    /// the load threads start after it is released, and a retired version is dropped after
    /// that, so nothing that blocks or can fail holds it.
    pub fn reconcile(&self) -> Vec<JoinHandle<()>> {
        let configs = self.configs();
        let scans: HashMap<(String, PathBuf), BTreeSet<i64>> = configs
            .into_iter()
            .map(|config| {
                let on_disk = list_versions(&config.base_path).unwrap_or_else(|e| {
                    tracing::warn!(model = %config.name, base_path = %config.base_path.display(), "cannot list versions: {e}");
                    BTreeSet::new()
                });
                ((config.name, config.base_path), on_disk)
            })
            .collect();
        let mut loads = Vec::new();
        let retired = {
            let mut guard = self.shared.lock_control();
            let control = &mut *guard;
            let table = self.shared.table.load_full();
            for config in &control.configs {
                // A config that changed since the scan is left as it was; the next scan takes it.
                let Some(on_disk) = scans.get(&(config.name.clone(), config.base_path.clone())) else { continue };
                let aspired = aspired_versions(&config.policy, on_disk);
                control.failed.retain(|(m, v)| m != &config.name || aspired.contains(v));
                for &version in &aspired {
                    let key = (config.name.clone(), version);
                    let loaded = table.models.get(&config.name).is_some_and(|m| m.versions.contains_key(&version));
                    if loaded || control.loading.contains(&key) || control.failed.contains(&key) {
                        continue;
                    }
                    control.loading.insert(key);
                    self.shared.set_state(&config.name, version, VersionState::Loading, None);
                    loads.push((config.name.clone(), version, config.base_path.join(version.to_string())));
                }
                control.aspired.insert(config.name.clone(), aspired);
            }
            let names: BTreeSet<&String> = control.configs.iter().map(|c| &c.name).collect();
            control.aspired.retain(|name, _| names.contains(name));
            self.publish(control)
        };
        drop(retired);
        let mut started = Vec::with_capacity(loads.len());
        for (model, version, dir) in loads {
            let repository = self.clone();
            let thread = std::thread::Builder::new().name(format!("load-v{version}")).spawn({
                let model = model.clone();
                move || {
                    lower_priority_of_this_thread();
                    repository.load(model, version, dir)
                }
            });
            match thread {
                Ok(thread) => started.push(thread),
                // Out of threads: the version is reported failed, and retried on the next config change.
                Err(e) => self.finish_load(&model, version, Err(format!("cannot start a load thread: {e}"))),
            }
        }
        started
    }

    /// Runs on a load thread: builds every signature, warms up, then hands the version in.
    fn load(&self, model: String, version: i64, dir: PathBuf) {
        tracing::info!(%model, version, dir = %dir.display(), "loading");
        let started = std::time::Instant::now();
        // A panic while loading (the engine is guarded already; this is everything else)
        // fails the version instead of leaving it LOADING forever.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.build_version(&model, version, &dir)))
                .unwrap_or_else(|_| Err(format!("{}: loading panicked", dir.display())));
        if result.is_ok() {
            tracing::info!(%model, version, elapsed_ms = started.elapsed().as_millis() as u64, "available");
        }
        self.shared.metrics.observe_load(&dir, result.is_ok(), started.elapsed());
        self.finish_load(&model, version, result);
    }

    /// Hands a load's outcome in: an AVAILABLE version joins the table, a failed one is
    /// reported and not retried until the config changes.
    fn finish_load(&self, model: &str, version: i64, result: Result<LoadedVersion, String>) {
        let retired = {
            let mut control = self.shared.lock_control();
            control.loading.remove(&(model.to_owned(), version));
            match result {
                Ok(loaded) => {
                    let mut table = (**self.shared.table.load()).clone();
                    table.models.entry(model.to_owned()).or_default().versions.insert(version, Arc::new(loaded));
                    self.shared.table.store(Arc::new(table));
                    self.shared.set_state(model, version, VersionState::Available, None);
                    self.shared.metrics.set_available(model, version, true);
                }
                Err(error) => {
                    tracing::error!(%model, version, "load failed: {error}");
                    self.shared.metrics.load_failed(model);
                    control.failed.insert((model.to_owned(), version));
                    self.shared.set_state(model, version, VersionState::End, Some(error));
                }
            }
            // Re-decide with the outcome (against the last scan): a new version may now retire an old one.
            self.publish(&control)
        };
        drop(retired);
    }

    fn build_version(&self, model: &str, version: i64, dir: &Path) -> Result<LoadedVersion, String> {
        let tags: Vec<&str> = self.shared.options.saved_model_tags.iter().map(String::as_str).collect();
        let saved = SavedModel::open_with_tags(dir, &tags).map_err(|e| e.to_string())?;
        let specs = saved.signatures().clone();
        let mut signatures = BTreeMap::new();
        for name in specs.keys() {
            let served = match saved.load(name) {
                Ok(plan) => {
                    let plan = Arc::new(plan);
                    let metrics = self.shared.metrics.signature(model, version, name);
                    let scheduler = Scheduler::start(
                        Arc::clone(&plan),
                        self.shared.options.scheduling.clone(),
                        metrics,
                        &format!("{model}-{version}"),
                    );
                    ServedSignature::Ready { plan, scheduler }
                }
                Err(e) => {
                    tracing::warn!(%model, version, signature = %name, "signature cannot be served: {e}");
                    ServedSignature::Failed { reason: e.to_string() }
                }
            };
            signatures.insert(name.clone(), served);
        }
        if !signatures.values().any(|s| matches!(s, ServedSignature::Ready { .. })) {
            let reasons: Vec<String> = signatures
                .iter()
                .filter_map(|(name, s)| match s {
                    ServedSignature::Failed { reason } => Some(format!("{name}: {reason}")),
                    ServedSignature::Ready { .. } => None,
                })
                .collect();
            return Err(if reasons.is_empty() {
                format!("{}: the SavedModel has no signatures", dir.display())
            } else {
                reasons.join("; ")
            });
        }
        let loaded = LoadedVersion {
            model: model.to_owned(),
            version,
            dir: dir.to_owned(),
            specs,
            signatures,
            repository: Arc::downgrade(&self.shared),
        };
        if self.shared.options.enable_warmup {
            let replayed = warmup::replay(&loaded).map_err(|e| format!("warmup failed: {e}"))?;
            if replayed > 0 {
                tracing::info!(model, version, requests = replayed, "warmup replayed");
            }
        }
        Ok(loaded)
    }

    /// Publishes a new table: unaspired versions leave once their model has an aspired
    /// version available (or nothing aspired is left), labels point at available versions.
    /// Returns the previous table, for the caller to drop once it has released the control
    /// lock (it may hold the last reference to a retired version, whose drop stops threads).
    #[must_use = "drop the previous table after releasing the control lock"]
    fn publish(&self, control: &Control) -> Arc<ServingTable> {
        let old = self.shared.table.load_full();
        let mut table = ServingTable::default();
        let mut retired = Vec::new();
        for config in &control.configs {
            let Some(served) = old.models.get(&config.name) else { continue };
            let wanted = control.aspired.get(&config.name).cloned().unwrap_or_default();
            let any_wanted_available = wanted.iter().any(|v| served.versions.contains_key(v));
            let mut versions = BTreeMap::new();
            for (&version, loaded) in &served.versions {
                // Availability-preserving: an unwanted version stays until a wanted one is
                // available, so a loading or failed successor never leaves the model empty.
                let keep = wanted.contains(&version) || (!any_wanted_available && !wanted.is_empty());
                if keep {
                    versions.insert(version, Arc::clone(loaded));
                } else {
                    retired.push((config.name.clone(), version));
                }
            }
            let labels =
                config.labels.iter().filter(|(_, v)| versions.contains_key(v)).map(|(l, v)| (l.clone(), *v)).collect();
            if !versions.is_empty() {
                table.models.insert(config.name.clone(), ServedModel { versions, labels });
            }
        }
        // Models dropped from the config retire every version.
        for (name, served) in old.models.iter() {
            if !control.configs.iter().any(|c| &c.name == name) {
                retired.extend(served.versions.keys().map(|v| (name.clone(), *v)));
            }
        }
        for (model, version) in &retired {
            tracing::info!(%model, version, "unloading");
            self.shared.set_state(model, *version, VersionState::Unloading, None);
            self.shared.metrics.set_available(model, *version, false);
        }
        self.shared.table.store(Arc::new(table));
        old
    }

    /// Waits for the given load threads (used at startup, as TF Serving does).
    pub fn wait(handles: Vec<JoinHandle<()>>) {
        for handle in handles {
            let _ = handle.join();
        }
    }

    /// The configured models.
    pub fn configs(&self) -> Vec<ModelConfig> {
        self.shared.lock_control().configs.clone()
    }
}

impl RepositoryState {
    /// The control lock. Nothing that can panic runs under it, but a poisoned lock is
    /// recovered rather than `expect`ed: its state is only ever replaced whole.
    fn lock_control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_statuses(&self) -> MutexGuard<'_, BTreeMap<String, BTreeMap<i64, VersionStatus>>> {
        self.statuses.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set_state(&self, model: &str, version: i64, state: VersionState, error: Option<String>) {
        self.lock_statuses()
            .entry(model.to_owned())
            .or_default()
            .insert(version, VersionStatus { version, state, error });
    }

    fn set_state_if(&self, model: &str, version: i64, from: VersionState, to: VersionState) {
        let mut statuses = self.lock_statuses();
        if let Some(status) = statuses.get_mut(model).and_then(|m| m.get_mut(&version))
            && status.state == from
        {
            status.state = to;
        }
    }
}

/// Loading a model is seconds of CPU work on a background thread; serving must not wait
/// behind it. On Linux a thread has its own nice value, so the loader drops to nice 10 and
/// the scheduler favours the threads answering requests (measured in docs/benchmarks.md).
/// Elsewhere priority is per process, so nothing changes.
fn lower_priority_of_this_thread() {
    #[cfg(target_os = "linux")]
    {
        // `None` is "the caller", which Linux reads as this thread. Failure (e.g. a seccomp
        // profile refusing it) leaves the default priority: slower serving during loads, no more.
        let _ = rustix::process::setpriority_process(None, 10);
    }
}
