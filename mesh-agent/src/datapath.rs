//! The agent's handle on the kernel datapath, shared by the reconcile loop (writer) and admin/metrics (readers):
//! the reconciler with its maps, and the desired state it last applied (which names each frontend).

use mesh_common::ServiceCounters;

use crate::{
    ebpf::reconcile::{Changes, ReconcileError, Reconciler},
    state::{DesiredState, Frontend, ServiceEntry},
};

pub struct Datapath {
    reconciler: Reconciler,
    applied: DesiredState,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("services", &self.applied.services.len())
            .finish()
    }
}

impl Datapath {
    pub fn new(reconciler: Reconciler) -> Self {
        Self {
            reconciler,
            applied: DesiredState::default(),
        }
    }

    /// Applies a desired state; on success it becomes the state that names the kernel's entries.
    pub fn apply(&mut self, desired: DesiredState) -> Result<Changes, ReconcileError> {
        let changes = self.reconciler.apply(&desired)?;
        self.applied = desired;
        Ok(changes)
    }

    /// Kernel counters of every applied service.
    pub fn service_counters(&self) -> Vec<(Frontend, ServiceEntry, ServiceCounters)> {
        self.applied
            .services
            .iter()
            .filter_map(|(f, e)| {
                let id = self.reconciler.service_id(f)?;
                Some((*f, e.clone(), self.reconciler.counters(id)))
            })
            .collect()
    }

    pub fn reconciler(&self) -> &Reconciler {
        &self.reconciler
    }
}
