//! Fault injection, for tests over the wire only: `clipserve serve --inject-faults SPEC` (a hidden flag, with no
//! environment variable, that logs a loud warning at start) makes chosen forward passes panic, fail or stall,
//! model reloads fail, or gRPC handlers panic, so that worker replacement, error answers and readiness are tested
//! against the real model and server.
//!
//! SPEC is a `;`-separated list of `KIND[:after=K][,count=N][,ms=MS]`: the fault hits events K+1 to K+N (default
//! K = 0, N = 1), counted from readiness across all workers:
//! - `model-panic`, `model-error`, `model-stall` (sleeps `ms`, then runs): forward passes (warm-ups excluded);
//! - `model-reload-fail`: attempts at reloading the model after a panic;
//! - `grpc-panic`: `Embed` calls (the handler panics).
//!
//! Example: `model-error:after=1;model-panic:after=3;model-reload-fail`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The forward pass panics (the worker replaces its model instance).
    ModelPanic,
    /// The forward pass returns an error (its items are answered INTERNAL, MODEL_FAILURE).
    ModelError,
    /// The forward pass sleeps this long before it runs.
    ModelStall(Duration),
    /// Reloading the model after a panic fails.
    ReloadFail,
    /// The `Embed` handler panics.
    GrpcPanic,
}

/// One fault: its kind and which events it hits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    /// Events let through before the first hit.
    pub after: u64,
    /// Events hit.
    pub count: u64,
}

impl Fault {
    /// True when the `n`-th event (1-based) is hit.
    fn hits(&self, n: u64) -> bool {
        n > self.after && n - self.after <= self.count
    }
}

/// The faults to inject, parsed from `--inject-faults`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    pub faults: Vec<Fault>,
}

impl FaultPlan {
    /// Parses SPEC (see the module documentation).
    pub fn parse(spec: &str) -> Result<FaultPlan, String> {
        let mut faults = Vec::new();
        for part in spec.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, options) = part.split_once(':').unwrap_or((part, ""));
            let (mut after, mut count, mut ms) = (0u64, 1u64, None);
            for option in options.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                let (key, value) = option.split_once('=').ok_or_else(|| format!("{option:?}: expected KEY=VALUE"))?;
                let value: u64 = value.parse().map_err(|_| format!("{option:?}: not a number"))?;
                match key {
                    "after" => after = value,
                    "count" => count = value,
                    "ms" => ms = Some(value),
                    _ => return Err(format!("{key:?}: unknown option (after, count, ms)")),
                }
            }
            let kind = match kind.trim() {
                "model-panic" => FaultKind::ModelPanic,
                "model-error" => FaultKind::ModelError,
                "model-stall" => FaultKind::ModelStall(Duration::from_millis(
                    ms.ok_or_else(|| "model-stall needs ms=MILLISECONDS".to_string())?,
                )),
                "model-reload-fail" => FaultKind::ReloadFail,
                "grpc-panic" => FaultKind::GrpcPanic,
                other => {
                    return Err(format!(
                    "{other:?}: unknown fault (model-panic, model-error, model-stall, model-reload-fail, grpc-panic)"
                ))
                }
            };
            if ms.is_some() && !matches!(kind, FaultKind::ModelStall(_)) {
                return Err(format!("{part:?}: ms applies to model-stall only"));
            }
            faults.push(Fault { kind, after, count });
        }
        if faults.is_empty() {
            return Err("no fault given".into());
        }
        Ok(FaultPlan { faults })
    }
}

/// A plan being carried out: counts the events each kind of fault is keyed on.
#[derive(Debug)]
pub struct Faults {
    plan: FaultPlan,
    batches: AtomicU64,
    reloads: AtomicU64,
    calls: AtomicU64,
}

impl Faults {
    /// Starts carrying out `plan`, saying so loudly.
    pub fn new(plan: FaultPlan) -> Faults {
        tracing::warn!(
            faults = ?plan.faults,
            "FAULT INJECTION IS ON (--inject-faults): this server will fail on purpose; for tests only"
        );
        Faults { plan, batches: AtomicU64::new(0), reloads: AtomicU64::new(0), calls: AtomicU64::new(0) }
    }

    fn hit(&self, counter: &AtomicU64, kinds: impl Fn(FaultKind) -> bool) -> (u64, Vec<FaultKind>) {
        let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
        let hits = self.plan.faults.iter().filter(|f| kinds(f.kind) && f.hits(n)).map(|f| f.kind).collect();
        (n, hits)
    }

    /// Called before each forward pass: stalls, panics or fails it as planned.
    pub fn before_forward_pass(&self) -> anyhow::Result<()> {
        let (n, hits) = self.hit(&self.batches, |k| {
            matches!(k, FaultKind::ModelPanic | FaultKind::ModelError | FaultKind::ModelStall(_))
        });
        for kind in hits {
            match kind {
                FaultKind::ModelStall(d) => {
                    tracing::warn!(batch = n, "injected fault: stalling the forward pass for {d:?}");
                    std::thread::sleep(d);
                }
                FaultKind::ModelPanic => panic!("injected fault: the model panics on forward pass {n}"),
                FaultKind::ModelError => anyhow::bail!("injected fault: the model fails forward pass {n}"),
                FaultKind::ReloadFail | FaultKind::GrpcPanic => {}
            }
        }
        Ok(())
    }

    /// Called before each attempt at reloading the model: fails it as planned.
    pub fn before_reload(&self) -> anyhow::Result<()> {
        let (n, hits) = self.hit(&self.reloads, |k| k == FaultKind::ReloadFail);
        anyhow::ensure!(hits.is_empty(), "injected fault: reload attempt {n} fails");
        Ok(())
    }

    /// Called at the start of each `Embed` handler: panics as planned.
    pub fn before_embed_call(&self) {
        let (n, hits) = self.hit(&self.calls, |k| k == FaultKind::GrpcPanic);
        if !hits.is_empty() {
            panic!("injected fault: the Embed handler panics on call {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs() {
        let plan = FaultPlan::parse("model-error:after=1; model-panic:after=3,count=2;model-reload-fail").unwrap();
        assert_eq!(
            plan.faults,
            vec![
                Fault { kind: FaultKind::ModelError, after: 1, count: 1 },
                Fault { kind: FaultKind::ModelPanic, after: 3, count: 2 },
                Fault { kind: FaultKind::ReloadFail, after: 0, count: 1 },
            ]
        );
        let stall = FaultPlan::parse("model-stall:ms=250").unwrap();
        assert_eq!(stall.faults[0].kind, FaultKind::ModelStall(Duration::from_millis(250)));
        for bad in ["", "model-melt", "model-stall", "model-panic:after", "model-panic:after=x", "grpc-panic:ms=3"] {
            assert!(FaultPlan::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn faults_hit_the_planned_events_only() {
        let faults = Faults::new(FaultPlan::parse("model-error:after=1;model-reload-fail:after=1,count=2").unwrap());
        let outcomes: Vec<bool> = (0..4).map(|_| faults.before_forward_pass().is_ok()).collect();
        assert_eq!(outcomes, [true, false, true, true]);
        let reloads: Vec<bool> = (0..4).map(|_| faults.before_reload().is_ok()).collect();
        assert_eq!(reloads, [true, false, false, true]);
        faults.before_embed_call(); // no grpc-panic planned
        let panics = Faults::new(FaultPlan::parse("model-panic").unwrap());
        assert!(std::panic::catch_unwind(|| panics.before_forward_pass()).is_err());
        assert!(panics.before_forward_pass().is_ok());
    }
}
