//! Drives an agent's kubernetes source from the same manifests the file source reads.
//!
//! A [`KubeMirror`] owns a [`FakeApi`] and makes it hold exactly the objects of a manifest directory
//! ([`KubeMirror::sync`]): new objects are created, changed ones replaced, missing ones deleted, so every edit a
//! test makes to its [`crate::manifest::SourceDir`] becomes the add, modify or delete event a real API server
//! would send. Each pod of the mirrored node also gets what kubelet would have made for it: a kubepods cgroup
//! for the UID the API server gave it, with a sandbox process in the pod's network namespace (see
//! [`crate::kubepods`]), which is how the agent finds the pod's netns on a node. The manifests'
//! `sinew.dev/netns` annotations are passed on unchanged: the kubernetes source must ignore them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::fake_api::FakeApi;
use crate::kubepods::{Driver, Layout, Pause, PodCgroup, Qos};

/// `(apiVersion, kind, namespace, name)`.
type Key = (String, String, Option<String>, String);

/// A fake API server mirroring a manifest directory, and the sandboxes of one node's pods.
pub struct KubeMirror {
    /// The API server (tests can also apply, delete, deny and compact on it directly).
    pub api: FakeApi,
    kubeconfig: PathBuf,
    node: String,
    cgroup_root: PathBuf,
    applied: BTreeMap<Key, Value>,
    /// Sandboxes by pod UID (the pause process is dropped before its cgroup).
    sandboxes: BTreeMap<String, (Pause, PodCgroup)>,
}

impl std::fmt::Debug for KubeMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeMirror")
            .field("api", &self.api.url())
            .field("objects", &self.applied.len())
            .field("sandboxes", &self.sandboxes.len())
            .finish()
    }
}

impl KubeMirror {
    /// Starts the API server and writes its kubeconfig into `work_dir`. Pods of `node` get sandboxes below
    /// `cgroup_root` (the node's cgroup root, where the agent looks for kubepods).
    pub fn start(node: &str, cgroup_root: &Path, work_dir: &Path) -> Result<KubeMirror> {
        let api = FakeApi::start()?;
        let kubeconfig = work_dir.join(format!("kubeconfig-{node}"));
        api.write_kubeconfig(&kubeconfig)?;
        Ok(KubeMirror {
            api,
            kubeconfig,
            node: node.to_string(),
            cgroup_root: cgroup_root.to_path_buf(),
            applied: BTreeMap::new(),
            sandboxes: BTreeMap::new(),
        })
    }

    /// The kubeconfig an agent's `--kubeconfig` takes.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Makes the API server hold exactly the objects in `dir`'s `*.yaml` files (a `List` counts as its items).
    pub fn sync(&mut self, dir: &Path) -> Result<()> {
        let wanted = read_objects(dir)?;
        for (key, obj) in &wanted {
            if self.applied.get(key) == Some(obj) {
                continue;
            }
            self.api.apply(obj.clone());
            if key.1 == "Pod" {
                self.ensure_sandbox(key, obj)?;
            }
        }
        let gone: Vec<Key> = self
            .applied
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if key.1 == "Pod"
                && let Some(uid) = self.uid(&key)
            {
                self.sandboxes.remove(&uid);
            }
            self.api.delete(&key.0, &key.1, key.2.as_deref(), &key.3);
        }
        self.applied = wanted;
        Ok(())
    }

    /// The UID the API server gave an object.
    fn uid(&self, key: &Key) -> Option<String> {
        self.api
            .get(&key.0, &key.1, key.2.as_deref(), &key.3)
            .and_then(|o| o["metadata"]["uid"].as_str().map(str::to_string))
    }

    /// A sandbox for a pod of this node that has a netns, as kubelet would have made before the pod got an IP.
    fn ensure_sandbox(&mut self, key: &Key, obj: &Value) -> Result<()> {
        if obj["spec"]["nodeName"].as_str() != Some(self.node.as_str()) {
            return Ok(());
        }
        let Some(netns) = obj["metadata"]["annotations"]["sinew.dev/netns"].as_str() else {
            return Ok(());
        };
        let uid = self
            .uid(key)
            .with_context(|| format!("the API server gave pod {} no uid", key.3))?;
        if self.sandboxes.contains_key(&uid) {
            return Ok(());
        }
        let cgroup = PodCgroup::create(
            &self.cgroup_root,
            &uid,
            Layout::new(Driver::Systemd, Qos::BestEffort),
        )?;
        let pause = cgroup.spawn_pause(Path::new(netns))?;
        self.sandboxes.insert(uid, (pause, cgroup));
        Ok(())
    }
}

/// Every object of the `*.yaml` files in `dir`, by key.
fn read_objects(dir: &Path) -> Result<BTreeMap<Key, Value>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    let mut out = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file)?;
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .with_context(|| format!("parsing {}", file.display()))?;
            let items = match v["kind"].as_str() {
                Some("List") => v["items"].as_array().cloned().unwrap_or_default(),
                Some(_) => vec![v],
                None => continue,
            };
            for item in items {
                let key = (
                    item["apiVersion"].as_str().unwrap_or("v1").to_string(),
                    item["kind"].as_str().unwrap_or_default().to_string(),
                    match item["kind"].as_str() {
                        Some("Namespace") => None,
                        _ => Some(
                            item["metadata"]["namespace"]
                                .as_str()
                                .unwrap_or("default")
                                .to_string(),
                        ),
                    },
                    item["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                );
                out.insert(key, item);
            }
        }
    }
    Ok(out)
}
