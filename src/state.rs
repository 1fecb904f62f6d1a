//! The server's state, in one place that both transports, the engine and the health reporting read: whether the
//! model is loaded, whether graceful shutdown has begun, and how many model workers can run batches. Every change
//! is published on a watch channel, so that whoever follows it (gRPC health, the `clipserve_ready` gauge) reacts
//! at once instead of polling.

use tokio::sync::watch;

use crate::error::{Error, Reason};

/// A snapshot of the server's state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// Every model worker has loaded and warmed up its model.
    pub loaded: bool,
    /// Graceful shutdown has begun: new work is refused, admitted work completes.
    pub draining: bool,
    /// Model workers currently able to run batches.
    pub healthy_workers: usize,
}

impl Status {
    /// True while new work is accepted: loaded, at least one model worker able to run batches, not draining.
    pub fn is_ready(&self) -> bool {
        self.loaded && !self.draining && self.healthy_workers > 0
    }

    /// Why new work is refused now, if it is.
    pub fn refusal(&self) -> Option<Error> {
        if self.draining {
            Some(Error::new(Reason::ShuttingDown, "server is shutting down"))
        } else if !self.loaded {
            Some(Error::new(Reason::NotReady, "model is not loaded yet"))
        } else if self.healthy_workers == 0 {
            Some(Error::new(Reason::NoModelWorker, "no model worker is available right now"))
        } else {
            None
        }
    }
}

/// The shared, observable server state.
#[derive(Debug)]
pub struct ServerState {
    status: watch::Sender<Status>,
}

impl Default for ServerState {
    fn default() -> Self {
        ServerState { status: watch::Sender::new(Status::default()) }
    }
}

impl ServerState {
    /// The state now.
    pub fn status(&self) -> Status {
        *self.status.borrow()
    }

    /// See [`Status::is_ready`].
    pub fn is_ready(&self) -> bool {
        self.status().is_ready()
    }

    /// True once graceful shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.status().draining
    }

    /// A receiver that sees every change from now on.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Marks the model loaded and warmed up.
    pub fn set_loaded(&self) {
        self.status.send_if_modified(|s| !std::mem::replace(&mut s.loaded, true));
    }

    /// Refuses new work from now on (graceful shutdown).
    pub fn start_draining(&self) {
        self.status.send_if_modified(|s| !std::mem::replace(&mut s.draining, true));
    }

    /// A model worker became able to run batches (started, or replaced its model instance).
    pub fn worker_up(&self) {
        self.status.send_modify(|s| s.healthy_workers += 1);
    }

    /// A model worker stopped being able to run batches (it panicked, or stopped).
    pub fn worker_down(&self) {
        self.status.send_modify(|s| s.healthy_workers = s.healthy_workers.saturating_sub(1));
    }

    /// Model workers currently able to run batches.
    pub fn healthy_workers(&self) -> usize {
        self.status().healthy_workers
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_follows_loading_workers_and_draining_and_each_change_is_signalled() {
        let state = ServerState::default();
        let mut rx = state.subscribe();
        assert_eq!(state.status().refusal().unwrap().reason(), Reason::NotReady);
        state.worker_up();
        assert!(rx.has_changed().unwrap());
        state.set_loaded();
        assert!(rx.borrow_and_update().is_ready());
        state.worker_down();
        assert!(rx.has_changed().unwrap());
        assert!(!rx.borrow_and_update().is_ready());
        assert_eq!(state.status().refusal().unwrap().reason(), Reason::NoModelWorker);
        state.worker_up();
        state.start_draining();
        rx.changed().await.unwrap();
        assert!(!rx.borrow_and_update().is_ready());
        assert_eq!(state.status().refusal().unwrap().reason(), Reason::ShuttingDown);
        state.start_draining();
        assert!(!rx.has_changed().unwrap(), "draining twice changes nothing");
    }
}
