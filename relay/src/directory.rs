//! Who is online now: registered agents by identity, and the names they expose. In memory
//! only; ownership of names is [`crate::names`]'s business, this only says who answers.
//!
//! Generic over what is kept per agent so that the bookkeeping is tested without QUIC.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use p2ptun::proto::Fingerprint;

struct Entry<T> {
    registration: u64,
    names: Vec<String>,
    agent: Arc<T>,
}

/// Online agents, one registration per identity.
pub struct Directory<T> {
    agents: HashMap<Fingerprint, Entry<T>>,
    by_name: HashMap<String, Fingerprint>,
}

impl<T> Default for Directory<T> {
    fn default() -> Self {
        Directory {
            agents: HashMap::new(),
            by_name: HashMap::new(),
        }
    }
}

impl<T> std::fmt::Debug for Directory<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory")
            .field("agents", &self.agents.len())
            .field("names", &self.by_name.len())
            .finish()
    }
}

impl<T> Directory<T> {
    /// Puts `agent` online under `fingerprint` with `names`; `registration` tells this
    /// registration apart from later ones of the same identity. Returns the registration it
    /// replaces, if the identity was online already (an agent that reconnected).
    pub fn insert(
        &mut self,
        fingerprint: Fingerprint,
        registration: u64,
        names: Vec<String>,
        agent: Arc<T>,
    ) -> Option<Arc<T>> {
        let old = self.take(&fingerprint);
        for name in &names {
            // Names are claimed per identity, so no other identity can be listed under one.
            self.by_name.insert(name.clone(), fingerprint);
        }
        self.agents.insert(
            fingerprint,
            Entry {
                registration,
                names,
                agent,
            },
        );
        old
    }

    /// Replaces the names `fingerprint` is online under, if `registration` is still its
    /// current one. Returns whether it did.
    pub fn set_names(
        &mut self,
        fingerprint: &Fingerprint,
        registration: u64,
        names: Vec<String>,
    ) -> bool {
        let Some(entry) = self.agents.get_mut(fingerprint) else {
            return false;
        };
        if entry.registration != registration {
            return false;
        }
        let old = std::mem::replace(&mut entry.names, names.clone());
        for name in old {
            if self.by_name.get(&name) == Some(fingerprint) {
                self.by_name.remove(&name);
            }
        }
        for name in names {
            self.by_name.insert(name, *fingerprint);
        }
        true
    }

    /// Takes `fingerprint` offline if `registration` is still its current one (a replaced
    /// registration ending must not take its successor offline). Returns whether it did.
    pub fn remove(&mut self, fingerprint: &Fingerprint, registration: u64) -> bool {
        match self.agents.get(fingerprint) {
            Some(entry) if entry.registration == registration => {
                self.take(fingerprint);
                true
            }
            _ => false,
        }
    }

    fn take(&mut self, fingerprint: &Fingerprint) -> Option<Arc<T>> {
        let entry = self.agents.remove(fingerprint)?;
        for name in &entry.names {
            if self.by_name.get(name) == Some(fingerprint) {
                self.by_name.remove(name);
            }
        }
        Some(entry.agent)
    }

    /// The online agent exposing `name`.
    pub fn exposing(&self, name: &str) -> Option<Arc<T>> {
        let fp = self.by_name.get(name)?;
        self.agents.get(fp).map(|e| Arc::clone(&e.agent))
    }

    /// Every name exposed right now.
    pub fn names(&self) -> HashSet<String> {
        self.by_name.keys().cloned().collect()
    }

    /// Every online agent with the names it exposes (for the status page).
    pub fn list(&self) -> Vec<(Fingerprint, Vec<String>, Arc<T>)> {
        self.agents
            .iter()
            .map(|(fp, e)| (*fp, e.names.clone(), Arc::clone(&e.agent)))
            .collect()
    }

    /// Agents online.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// Whether nobody is online.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(n: u8) -> Fingerprint {
        Fingerprint([n; 32])
    }

    #[test]
    fn a_reconnect_replaces_and_the_old_end_does_not_unlist() {
        let mut dir = Directory::default();
        assert!(dir
            .insert(
                fp(1),
                1,
                vec!["home".into(), "web".into()],
                Arc::new("first")
            )
            .is_none());
        assert_eq!(dir.exposing("home").as_deref(), Some(&"first"));
        let old = dir.insert(fp(1), 2, vec!["home".into()], Arc::new("second"));
        assert_eq!(old.as_deref(), Some(&"first"));
        assert_eq!(dir.exposing("home").as_deref(), Some(&"second"));
        assert!(dir.exposing("web").is_none());
        assert_eq!(dir.names(), HashSet::from(["home".to_string()]));
        let listed = dir.list();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            (listed[0].0, &listed[0].1),
            (fp(1), &vec!["home".to_string()])
        );
        // The first connection ends after being replaced: nothing changes.
        assert!(!dir.remove(&fp(1), 1));
        assert_eq!(dir.len(), 1);
        assert!(dir.remove(&fp(1), 2));
        assert!(dir.exposing("home").is_none());
        assert!(dir.is_empty());
    }

    #[test]
    fn new_names_replace_the_old_only_for_the_current_registration() {
        let mut dir = Directory::default();
        dir.insert(fp(1), 1, vec!["home".into(), "web".into()], Arc::new("a"));
        assert!(
            !dir.set_names(&fp(1), 0, vec!["mail".into()]),
            "a stale registration"
        );
        assert!(
            !dir.set_names(&fp(2), 1, vec!["mail".into()]),
            "an agent not online"
        );
        assert_eq!(dir.names().len(), 2);
        assert!(dir.set_names(&fp(1), 1, vec!["web".into(), "mail".into()]));
        assert!(dir.exposing("home").is_none());
        assert_eq!(dir.exposing("mail").as_deref(), Some(&"a"));
        assert_eq!(
            dir.names(),
            HashSet::from(["web".to_string(), "mail".to_string()])
        );
        assert!(dir.remove(&fp(1), 1));
        assert!(dir.names().is_empty());
    }
}
