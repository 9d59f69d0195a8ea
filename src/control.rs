//! Operator controls shared by the gateway and the workers: which routes are paused.

use std::collections::BTreeSet;
use std::sync::RwLock;

/// Paused routes: workers do not take their jobs, which wait in the queue with their attempts
/// untouched.
#[derive(Debug, Default)]
pub struct RouteControl {
    paused: RwLock<BTreeSet<String>>,
}

impl RouteControl {
    pub fn new(paused: impl IntoIterator<Item = String>) -> Self {
        Self {
            paused: RwLock::new(paused.into_iter().collect()),
        }
    }

    pub fn is_paused(&self, route: &str) -> bool {
        self.paused.read().expect("control lock").contains(route)
    }

    pub fn paused(&self) -> Vec<String> {
        self.paused
            .read()
            .expect("control lock")
            .iter()
            .cloned()
            .collect()
    }

    /// Returns whether the state changed.
    pub fn set_paused(&self, route: &str, paused: bool) -> bool {
        let mut set = self.paused.write().expect("control lock");
        if paused {
            set.insert(route.to_owned())
        } else {
            set.remove(route)
        }
    }
}
