//! Whether this host can serve: what `GET /readyz` answers.
//!
//! `/healthz` is liveness: the process answers. `/readyz` says 200 only once the host has
//! - applied the replicated log up to the leader's commit index as it was when the host
//!   started (a linearizable read: the host has seen every write acknowledged before then),
//! - recorded the bootstrap (the first admin on a new cluster, this host's record, the demo
//!   image), failed the operations a previous run left unfinished and re-adopted its VMs,
//!
//! and is not isolated from the cluster or stopping. Before that it answers 503 with the
//! phase it is in, so scripts, service managers and load balancers can wait for it.

use std::sync::{Arc, Mutex};

/// Where a host is on its way to serving.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Opening the replicated state, waiting for a leader.
    Starting,
    /// A leader is known; applying the log up to its commit index.
    CatchingUp,
    /// Recording the bootstrap, re-adopting VMs.
    Bootstrapping,
    /// Serving.
    Ready,
    /// A graceful stop has begun.
    Stopping,
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::CatchingUp => "catching_up",
            Phase::Bootstrapping => "bootstrapping",
            Phase::Ready => "ready",
            Phase::Stopping => "stopping",
        }
    }

    /// What a waiting client is told.
    pub fn explain(&self) -> &'static str {
        match self {
            Phase::Starting => "opening the replicated state and waiting for a Raft leader",
            Phase::CatchingUp => "applying the replicated log up to the leader's commit index",
            Phase::Bootstrapping => {
                "recording this host and the bootstrap (admin user, demo image) and \
                 re-adopting VMs"
            }
            Phase::Ready => "ready",
            Phase::Stopping => "this host is stopping",
        }
    }
}

/// Shared between the start-up sequence (which moves it forward) and `/readyz`.
#[derive(Clone)]
pub struct Readiness(Arc<Mutex<Phase>>);

impl Default for Readiness {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(Phase::Starting)))
    }
}

impl Readiness {
    pub fn set(&self, phase: Phase) {
        let mut p = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // A host that began to stop never goes back to serving.
        if *p != Phase::Stopping {
            tracing::debug!(phase = phase.as_str(), "readiness");
            *p = phase;
        }
    }

    pub fn phase(&self) -> Phase {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopping_host_stays_stopping() {
        let r = Readiness::default();
        assert_eq!(r.phase(), Phase::Starting);
        r.set(Phase::Ready);
        assert_eq!(r.phase(), Phase::Ready);
        r.set(Phase::Stopping);
        r.set(Phase::Ready);
        assert_eq!(r.phase(), Phase::Stopping);
    }
}
