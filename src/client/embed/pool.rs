//! One `--server`: an address (a stream to it), or a name resolved again and again, with a stream per address it
//! has. A headless Kubernetes Service answers a name with one address per ready pod: new pods get streams at the
//! next resolution, and the stream of a pod that left drains (no new messages, the ones in flight answered) and
//! ends.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::driver::{backoff, drive, Problem, Shared};

/// Resolves a host name and port to addresses.
pub type Resolver =
    Arc<dyn Fn(String, u16) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send>> + Send + Sync>;

/// The system's resolver (getaddrinfo, as every other program on the machine resolves names).
pub fn system_resolver() -> Resolver {
    Arc::new(|host, port| {
        Box::pin(async move {
            let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port)).await?.collect();
            addrs.sort();
            addrs.dedup();
            Ok(addrs)
        })
    })
}

/// What a `--server` names.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    /// An address (or a URL this client cannot take apart: the transport reports what is wrong with it).
    Fixed(String),
    /// A host name, resolved to addresses; each address is reached as `scheme://address`.
    Name { scheme: String, host: String, port: u16 },
}

fn target(server: &str) -> Target {
    let Ok(url) = url::Url::parse(server) else { return Target::Fixed(server.to_string()) };
    match (url.host(), url.port_or_known_default()) {
        (Some(url::Host::Domain(host)), Some(port)) if url.path() == "/" || url.path().is_empty() => {
            Target::Name { scheme: url.scheme().to_string(), host: host.to_string(), port }
        }
        _ => Target::Fixed(server.to_string()),
    }
}

/// Sends to one `--server` until no work is left; gives up (returning the last problem) when it cannot be reached.
pub(super) async fn serve(server: String, shared: Arc<Shared>, resolver: Resolver) -> Result<(), Problem> {
    match target(&server) {
        Target::Fixed(url) => {
            // Never retired: the sender lives as long as the driver.
            let (_keep, retire) = watch::channel(false);
            drive(url, None, shared, retire).await
        }
        Target::Name { scheme, host, port } => serve_name(&scheme, &host, port, shared, resolver).await,
    }
}

/// A name: a driver per address it resolves to. Addresses that leave the name are retired; addresses given up
/// are not tried again while the name still returns them. The name is given up when every address it returns is
/// given up, or when it has returned none (or could not be resolved) `--retries` times in a row.
async fn serve_name(
    scheme: &str,
    host: &str,
    port: u16,
    shared: Arc<Shared>,
    resolver: Resolver,
) -> Result<(), Problem> {
    let (exits_tx, mut exits) = mpsc::unbounded_channel::<(SocketAddr, Result<(), Problem>)>();
    let mut live: HashMap<SocketAddr, watch::Sender<bool>> = HashMap::new();
    let mut given_up: HashSet<SocketAddr> = HashSet::new();
    let mut last = Problem::new("UNAVAILABLE", "", format!("{host} resolved to no address"));
    let mut empty_rounds = 0u32;
    let mut over = shared.over.subscribe();
    let interval = shared.args.resolve_interval;
    loop {
        if shared.is_over() {
            break;
        }
        match resolver(host.to_string(), port).await {
            Ok(addrs) => {
                given_up.retain(|a| addrs.contains(a));
                for (a, retire) in &live {
                    // Retired when it leaves the name; taken back if it returns while its stream drains.
                    retire.send_replace(!addrs.contains(a));
                }
                let new: Vec<SocketAddr> =
                    addrs.iter().filter(|a| !live.contains_key(a) && !given_up.contains(a)).copied().collect();
                for a in &new {
                    let (retire_tx, retire) = watch::channel(false);
                    let url = format!("{scheme}://{a}");
                    tracing::info!(server = %host, address = %a, "streaming to a new address");
                    let (shared, exits, a, name) = (shared.clone(), exits_tx.clone(), *a, host.to_string());
                    tokio::spawn(async move {
                        let r = drive(url, Some(name), shared, retire).await;
                        let _ = exits.send((a, r));
                    });
                    live.insert(a, retire_tx);
                }
                if live.is_empty() && !addrs.is_empty() {
                    // Every address the name has was tried --retries times.
                    return Err(last);
                }
            }
            Err(e) => last = Problem::new("UNAVAILABLE", "", format!("cannot resolve {host}: {e}")),
        }
        if live.is_empty() {
            empty_rounds += 1;
            if empty_rounds >= shared.args.retries {
                return Err(last);
            }
            shared_pause(&mut over, backoff(empty_rounds)).await;
            continue;
        }
        empty_rounds = 0;
        // Until the next resolution: note drivers that end (a retired address, or one given up).
        let next = tokio::time::Instant::now() + interval;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => break,
                _ = over.wait_for(|o| *o) => break,
                exit = exits.recv() => {
                    let Some((a, r)) = exit else { break };
                    live.remove(&a);
                    if let Err(p) = r {
                        given_up.insert(a);
                        last = p;
                    }
                    if live.is_empty() {
                        break;
                    }
                }
            }
        }
    }
    // The run is over: the drivers end on their own.
    drop(exits_tx);
    while let Some((a, _)) = exits.recv().await {
        live.remove(&a);
    }
    Ok(())
}

async fn shared_pause(over: &mut watch::Receiver<bool>, d: std::time::Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = over.wait_for(|o| *o) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_resolved_and_addresses_are_not() {
        assert_eq!(target("http://127.0.0.1:50051"), Target::Fixed("http://127.0.0.1:50051".into()));
        assert_eq!(target("http://[::1]:50051"), Target::Fixed("http://[::1]:50051".into()));
        assert_eq!(
            target("http://clipserve-grpc.ml.svc.cluster.local:50051"),
            Target::Name { scheme: "http".into(), host: "clipserve-grpc.ml.svc.cluster.local".into(), port: 50051 }
        );
        assert_eq!(
            target("http://localhost"),
            Target::Name { scheme: "http".into(), host: "localhost".into(), port: 80 }
        );
        assert_eq!(target("not a url"), Target::Fixed("not a url".into()));
    }
}
