//! The resource store: per type, name → shared resource; change notification to streams; and
//! the on-demand resolver hook for names the store does not have yet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::resource::VersionedResource;

/// Changes buffered for a slow stream before it lags (and then resyncs by a full diff).
const CHANGE_BUFFER: usize = 4096;

/// Some resources of one type changed (or were resolved and may now be answered).
#[derive(Debug, Clone)]
pub struct Change {
    pub type_url: String,
    pub names: Vec<String>,
    /// Every name of the type may answer differently (`names` is then empty).
    pub whole_type: bool,
    /// When the change was made, for push latency.
    pub at: Instant,
}

type Resources = BTreeMap<String, Arc<VersionedResource>>;

/// The control plane's resources. Cheap to share (`Arc<Store>`); readers never wait on a
/// slow stream because notification is a broadcast each stream drains at its own pace.
#[derive(Debug)]
pub struct Store {
    types: RwLock<HashMap<String, Resources>>,
    changes: broadcast::Sender<Arc<Change>>,
    resolving: Mutex<HashSet<(String, String)>>,
}

impl Default for Store {
    fn default() -> Self {
        Self::new()
    }
}

impl Store {
    pub fn new() -> Self {
        Self {
            types: RwLock::default(),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            resolving: Mutex::default(),
        }
    }

    /// Inserts or replaces a resource. Same version (same content) is a no-op: no push.
    /// Returns whether anything changed.
    pub fn upsert(&self, resource: VersionedResource) -> bool {
        let type_url = resource.type_url.clone();
        let changed = self.upsert_quiet(resource);
        if let Some(name) = changed.clone() {
            self.notify(&type_url, vec![name]);
        }
        changed.is_some()
    }

    /// Upserts several resources, one notification per type. Returns how many changed.
    pub fn upsert_many(&self, resources: impl IntoIterator<Item = VersionedResource>) -> usize {
        let mut changed: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in resources {
            let type_url = r.type_url.clone();
            if let Some(name) = self.upsert_quiet(r) {
                changed.entry(type_url).or_default().push(name);
            }
        }
        let n = changed.values().map(Vec::len).sum();
        for (type_url, names) in changed {
            self.notify(&type_url, names);
        }
        n
    }

    fn upsert_quiet(&self, resource: VersionedResource) -> Option<String> {
        let mut types = self.types.write().unwrap_or_else(PoisonError::into_inner);
        let map = types.entry(resource.type_url.clone()).or_default();
        if map
            .get(&resource.name)
            .is_some_and(|old| old.version == resource.version)
        {
            return None;
        }
        let name = resource.name.clone();
        map.insert(name.clone(), Arc::new(resource));
        Some(name)
    }

    /// Deletes a resource; streams holding it are sent `removed_resources`.
    pub fn delete(&self, type_url: &str, name: &str) -> bool {
        let removed = {
            let mut types = self.types.write().unwrap_or_else(PoisonError::into_inner);
            types
                .get_mut(type_url)
                .and_then(|m| m.remove(name))
                .is_some()
        };
        if removed {
            self.notify(type_url, vec![name.to_owned()]);
        }
        removed
    }

    /// Makes `resources` the whole content of `type_url`. Returns the names that changed.
    pub fn replace_all(&self, type_url: &str, resources: Vec<VersionedResource>) -> Vec<String> {
        let changed = {
            let mut types = self.types.write().unwrap_or_else(PoisonError::into_inner);
            let old = types.remove(type_url).unwrap_or_default();
            let new: Resources = resources
                .into_iter()
                .map(|r| (r.name.clone(), Arc::new(r)))
                .collect();
            let mut changed: Vec<String> = old
                .keys()
                .filter(|n| !new.contains_key(*n))
                .cloned()
                .collect();
            changed.extend(
                new.iter()
                    .filter(|(n, r)| old.get(*n).is_none_or(|o| o.version != r.version))
                    .map(|(n, _)| n.clone()),
            );
            types.insert(type_url.to_owned(), new);
            changed
        };
        if !changed.is_empty() {
            self.notify(type_url, changed.clone());
        }
        changed
    }

    pub fn get(&self, type_url: &str, name: &str) -> Option<Arc<VersionedResource>> {
        let types = self.types.read().unwrap_or_else(PoisonError::into_inner);
        types.get(type_url)?.get(name).cloned()
    }

    pub fn names(&self, type_url: &str) -> Vec<String> {
        let types = self.types.read().unwrap_or_else(PoisonError::into_inner);
        types
            .get(type_url)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Every resource: type URL → name → version.
    pub fn versions(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let types = self.types.read().unwrap_or_else(PoisonError::into_inner);
        types
            .iter()
            .map(|(t, m)| {
                (
                    t.clone(),
                    m.iter()
                        .map(|(n, r)| (n.clone(), r.version.clone()))
                        .collect(),
                )
            })
            .collect()
    }

    /// The change feed. A receiver that falls behind gets `Lagged` and must resync fully.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Change>> {
        self.changes.subscribe()
    }

    /// Announces names whose answer may have changed without a store change (a resolution
    /// that found nothing, a fault lifted).
    pub fn notify(&self, type_url: &str, names: Vec<String>) {
        // No receivers is fine: nobody to tell.
        let _ = self.changes.send(Arc::new(Change {
            type_url: type_url.to_owned(),
            names,
            whole_type: false,
            at: Instant::now(),
        }));
    }

    /// Announces that any name of a type may answer differently (faults changed).
    pub fn notify_type(&self, type_url: &str) {
        let _ = self.changes.send(Arc::new(Change {
            type_url: type_url.to_owned(),
            names: Vec::new(),
            whole_type: true,
            at: Instant::now(),
        }));
    }

    /// Whether a resolution of this name is under way (its answer is withheld meanwhile).
    pub fn is_resolving(&self, type_url: &str, name: &str) -> bool {
        let resolving = self
            .resolving
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        resolving.contains(&(type_url.to_owned(), name.to_owned()))
    }

    /// Starts resolving a name the store lacks (once, however many streams ask), bounded by
    /// `timeout`. When it ends, the result (if any) is upserted and the name announced, so
    /// streams waiting for it answer. Returns whether a resolution is now under way.
    pub fn resolve_missing(
        self: &Arc<Self>,
        resolver: &Arc<dyn Resolver>,
        timeout: Duration,
        type_url: &str,
        name: &str,
    ) -> bool {
        if self.get(type_url, name).is_some() {
            return false;
        }
        let key = (type_url.to_owned(), name.to_owned());
        {
            let mut resolving = self
                .resolving
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if !resolving.insert(key.clone()) {
                return true;
            }
        }
        let store = Arc::clone(self);
        let fut = resolver.resolve(type_url, name);
        tokio::spawn(async move {
            let (type_url, name) = key;
            match tokio::time::timeout(timeout, fut).await {
                Ok(Ok(Some(r))) if r.type_url == type_url && r.name == name => {
                    store.upsert(r);
                }
                Ok(Ok(Some(r))) => {
                    tracing::warn!(%type_url, %name, got = %r.name, "resolver returned another resource; ignored");
                }
                Ok(Ok(None)) => tracing::debug!(%type_url, %name, "resolver: no such resource"),
                Ok(Err(e)) => tracing::warn!(%type_url, %name, error = %e, "resolver failed"),
                Err(_) => tracing::warn!(%type_url, %name, ?timeout, "resolver timed out"),
            }
            store
                .resolving
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&(type_url.clone(), name.clone()));
            // After the in-flight mark is gone, so streams see the final answer.
            store.notify(&type_url, vec![name]);
        });
        true
    }
}

/// Why a resolver could not answer.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ResolveError(pub String);

/// What a resolver returns: the resource, or `None` if it does not exist.
pub type ResolveFuture =
    Pin<Box<dyn Future<Output = Result<Option<VersionedResource>, ResolveError>> + Send>>;

/// Fetches a resource the store does not have when a client first subscribes to it (e.g. a
/// topic route from a nameserver). The server answers that name only once this finished or
/// timed out.
pub trait Resolver: Send + Sync + 'static {
    fn resolve(&self, type_url: &str, name: &str) -> ResolveFuture;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::TOPIC_ROUTE;
    use tokio::time::timeout;

    fn res(name: &str, content: &str) -> VersionedResource {
        VersionedResource::from_bytes(name, TOPIC_ROUTE, content.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn identical_upsert_is_a_no_op() {
        let store = Store::new();
        let mut rx = store.subscribe();
        assert!(store.upsert(res("a", "1")));
        assert!(!store.upsert(res("a", "1")));
        assert!(store.upsert(res("a", "2")));
        assert_eq!(rx.recv().await.unwrap().names, vec!["a".to_owned()]);
        assert_eq!(rx.recv().await.unwrap().names, vec!["a".to_owned()]);
        assert!(rx.try_recv().is_err(), "the no-op upsert notified nobody");
    }

    #[tokio::test]
    async fn replace_all_reports_added_changed_and_removed() {
        let store = Store::new();
        store.upsert_many([res("a", "1"), res("b", "1"), res("c", "1")]);
        let mut changed = store.replace_all(
            TOPIC_ROUTE,
            vec![res("a", "1"), res("b", "2"), res("d", "1")],
        );
        changed.sort();
        assert_eq!(changed, vec!["b", "c", "d"]);
        assert_eq!(store.names(TOPIC_ROUTE), vec!["a", "b", "d"]);
        assert!(store.delete(TOPIC_ROUTE, "a"));
        assert!(!store.delete(TOPIC_ROUTE, "a"));
        assert_eq!(store.versions()[TOPIC_ROUTE].len(), 2);
    }

    struct Slow(Duration, Option<&'static str>);
    impl Resolver for Slow {
        fn resolve(&self, type_url: &str, name: &str) -> ResolveFuture {
            let (delay, content) = (self.0, self.1);
            let (t, n) = (type_url.to_owned(), name.to_owned());
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(content.map(|c| VersionedResource::from_bytes(n, t, c.as_bytes().to_vec())))
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn resolver_fills_the_store_once_and_announces() {
        let store = Arc::new(Store::new());
        let mut rx = store.subscribe();
        let resolver: Arc<dyn Resolver> = Arc::new(Slow(Duration::from_millis(10), Some("x")));
        assert!(store.resolve_missing(&resolver, Duration::from_secs(1), TOPIC_ROUTE, "t"));
        assert!(
            store.resolve_missing(&resolver, Duration::from_secs(1), TOPIC_ROUTE, "t"),
            "deduplicated"
        );
        assert!(store.is_resolving(TOPIC_ROUTE, "t"));
        let first = timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.names, vec!["t".to_owned()]);
        timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(!store.is_resolving(TOPIC_ROUTE, "t"));
        assert!(store.get(TOPIC_ROUTE, "t").is_some());
        assert!(
            !store.resolve_missing(&resolver, Duration::from_secs(1), TOPIC_ROUTE, "t"),
            "already present"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn resolver_timeout_releases_the_name() {
        let store = Arc::new(Store::new());
        let mut rx = store.subscribe();
        let resolver: Arc<dyn Resolver> = Arc::new(Slow(Duration::from_secs(60), Some("x")));
        store.resolve_missing(&resolver, Duration::from_millis(100), TOPIC_ROUTE, "t");
        let change = timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(change.names, vec!["t".to_owned()]);
        assert!(!store.is_resolving(TOPIC_ROUTE, "t"));
        assert!(store.get(TOPIC_ROUTE, "t").is_none());
    }
}
