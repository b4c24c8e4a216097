//! CRI container events (GetContainerEvents, the kubelet's evented PLEG).
//!
//! A pod's records are written by its monitor (a container's exit) and by
//! huskd (create, start, remove), so events come from comparing
//! observations of every sandbox and container: one every 200 ms while
//! anyone is subscribed, and one before and after every call that changes
//! a sandbox or container ([`Guard`]), so that a container created, run
//! and removed between two ticks is still seen at each step. Nothing runs
//! while nobody is subscribed.

use crate::runtime::{container_state, nanos, to_container_status, to_sandbox_status};
use crate::store::{Huskd, SandboxView};
use k8s_cri::v1 as cri;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::broadcast;

/// How often the records are looked at while anyone is subscribed.
const POLL: Duration = Duration::from_millis(200);
/// Events kept for a subscriber that is behind; one further behind misses
/// some (and the kubelet relists).
const BACKLOG: usize = 1024;

/// Every sandbox's readiness and every container's state, by id.
#[derive(Default)]
pub(crate) struct Seen {
    sandboxes: HashMap<String, bool>,
    containers: HashMap<String, i32>,
}

fn seen(views: &[SandboxView]) -> Seen {
    let mut s = Seen::default();
    for sb in views {
        s.sandboxes.insert(sb.id().to_owned(), sb.ready());
        for c in sb.containers() {
            s.containers.insert(c.id.clone(), container_state(sb, c));
        }
    }
    s
}

/// The subscribers and the last observation.
pub struct Events {
    tx: broadcast::Sender<cri::ContainerEventResponse>,
    /// None while nobody is subscribed.
    last: Mutex<Option<Seen>>,
    /// A polling thread runs (at most one).
    polling: AtomicBool,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(BACKLOG).0,
            last: Mutex::new(None),
            polling: AtomicBool::new(false),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Events {
    /// Looks at the records and sends what changed since the last look.
    fn observe(&self, huskd: &Huskd) {
        let mut last = lock(&self.last);
        if self.tx.receiver_count() == 0 {
            *last = None;
            return;
        }
        let views = huskd.sandboxes();
        if let Some(prev) = last.as_ref() {
            for ev in events_between(prev, &views) {
                let _ = self.tx.send(ev);
            }
        }
        *last = Some(seen(&views));
    }
}

/// Observes around a changing call, when anyone is subscribed: on entry
/// (what the monitors changed since) and when dropped (what the call
/// changed). Only on huskd's multi-threaded runtime.
pub struct Guard<'a>(&'a Huskd);

impl<'a> Guard<'a> {
    pub fn new(huskd: &'a Huskd) -> Self {
        if huskd.events.tx.receiver_count() > 0 {
            tokio::task::block_in_place(|| huskd.events.observe(huskd));
        }
        Guard(huskd)
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if self.0.events.tx.receiver_count() > 0 {
            tokio::task::block_in_place(|| self.0.events.observe(self.0));
        }
    }
}

type Item = Result<cri::ContainerEventResponse, tonic::Status>;

/// The polling thread: observes while anyone is subscribed. On its way
/// out it gives up `polling`, then looks once more: a subscriber that came
/// in between found the flag still set and started no thread, so this one
/// carries on for it (unless another took the flag meanwhile).
fn poll(h: &Huskd) {
    loop {
        std::thread::sleep(POLL);
        if h.events.tx.receiver_count() > 0 {
            h.events.observe(h);
            continue;
        }
        h.events.polling.store(false, Ordering::SeqCst);
        if h.events.tx.receiver_count() == 0 || h.events.polling.swap(true, Ordering::SeqCst) {
            return;
        }
    }
}

/// A new subscriber: the events after this call, until it goes away.
pub fn subscribe(huskd: &Arc<Huskd>) -> std::io::Result<tokio::sync::mpsc::Receiver<Item>> {
    let events = &huskd.events;
    let mut rx = tokio::task::block_in_place(|| {
        // What is there now is the starting point for this subscriber
        // (the others get what changed before it joined).
        let mut last = lock(&events.last);
        let views = huskd.sandboxes();
        if let Some(prev) = last.as_ref() {
            for ev in events_between(prev, &views) {
                let _ = events.tx.send(ev);
            }
        }
        *last = Some(seen(&views));
        events.tx.subscribe()
    });
    if !events.polling.swap(true, Ordering::SeqCst) {
        let h = huskd.clone();
        let spawned = std::thread::Builder::new()
            .name("cri-events".into())
            .spawn(move || poll(&h));
        if let Err(e) = spawned {
            events.polling.store(false, Ordering::SeqCst);
            return Err(e);
        }
    }
    let (tx, out) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let got = tokio::select! {
                got = rx.recv() => got,
                // The subscriber went away: dropping rx unsubscribes, and
                // the last one gone stops the polling.
                () = tx.closed() => return,
            };
            let ev = match got {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("a container event subscriber fell {n} events behind");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    });
    Ok(out)
}

/// The events between two observations, in the order they happened for
/// each id: a sandbox or container that is new was created (and started,
/// when it runs or ran), one that ended stopped, one that is gone was
/// deleted. A sandbox's events carry its id as the container id, as
/// containerd's do for its pause container. Containers whose monitor is
/// gone (UNKNOWN) make no event.
fn events_between(prev: &Seen, views: &[SandboxView]) -> Vec<cri::ContainerEventResponse> {
    use cri::ContainerEventType as T;
    let now = nanos(Some(chrono::Utc::now()));
    let event = |id: &str, kind: T, sb: Option<&SandboxView>| cri::ContainerEventResponse {
        container_id: id.to_owned(),
        container_event_type: kind as i32,
        created_at: now,
        pod_sandbox_status: sb.map(to_sandbox_status),
        containers_statuses: sb
            .map(|sb| {
                sb.containers()
                    .iter()
                    .map(|c| to_container_status(sb, c))
                    .collect()
            })
            .unwrap_or_default(),
    };
    let (created, running, exited) = (
        cri::ContainerState::ContainerCreated as i32,
        cri::ContainerState::ContainerRunning as i32,
        cri::ContainerState::ContainerExited as i32,
    );
    let mut out = Vec::new();
    let mut live_containers = HashSet::new();
    for sb in views {
        let id = sb.id();
        match (prev.sandboxes.get(id), sb.ready()) {
            (None, ready) => {
                out.push(event(id, T::ContainerCreatedEvent, Some(sb)));
                if ready {
                    out.push(event(id, T::ContainerStartedEvent, Some(sb)));
                }
            }
            (Some(true), false) => out.push(event(id, T::ContainerStoppedEvent, Some(sb))),
            _ => {}
        }
        for c in sb.containers() {
            live_containers.insert(c.id.as_str());
            let cur = container_state(sb, c);
            let mut at = match prev.containers.get(&c.id) {
                Some(p) => *p,
                None => {
                    out.push(event(&c.id, T::ContainerCreatedEvent, Some(sb)));
                    created
                }
            };
            if at == created && (cur == running || (cur == exited && c.started_at.is_some())) {
                out.push(event(&c.id, T::ContainerStartedEvent, Some(sb)));
                at = running;
            }
            if (at == running || at == created) && cur == exited {
                out.push(event(&c.id, T::ContainerStoppedEvent, Some(sb)));
            }
        }
    }
    let live_sandboxes: HashSet<&str> = views.iter().map(|v| v.id()).collect();
    for id in prev.containers.keys() {
        if !live_containers.contains(id.as_str()) {
            let sb = views.iter().find(|v| id.starts_with(v.id()));
            out.push(event(id, T::ContainerDeletedEvent, sb));
        }
    }
    for id in prev.sandboxes.keys() {
        if !live_sandboxes.contains(id.as_str()) {
            out.push(event(id, T::ContainerDeletedEvent, None));
        }
    }
    out
}
