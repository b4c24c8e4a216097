//! The host's client of husk-agent (husk-protocol). One connection; a
//! reader thread routes the agent's events to the process they are about,
//! so several processes run and stream at once. The client owns the stream
//! and its reader thread: dropping it closes the one and joins the other.

use husk_protocol::{
    check_hello, read_frame, write_frame, Event, ProtocolError, Request, StartRequest, Stream,
    VERSION,
};
use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent could not do what was asked; its message says why.
    #[error("in the guest: {0}")]
    Guest(String),
    #[error("a process with id {0:?} is already running")]
    Duplicate(String),
    #[error("the agent connection ended")]
    Gone,
    #[error("the agent did not answer within {0:?}")]
    Timeout(Duration),
}

type Routes = Arc<Mutex<HashMap<String, Sender<Event>>>>;

pub struct AgentClient {
    writer: Arc<Mutex<UnixStream>>,
    routes: Routes,
    /// Events about no process (shutdown, errors without an id).
    control: Mutex<Receiver<Event>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// Set by the reader thread when the connection ends.
    closed: Arc<std::sync::atomic::AtomicBool>,
    kernel: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl AgentClient {
    /// Says hello until the agent answers (or `deadline` passes) and checks
    /// its protocol version. A virtio-serial port drops what the host sends
    /// before the guest has opened it, so the hello is repeated, each time
    /// with a new nonce, and answers to earlier ones are skipped.
    pub fn connect(mut stream: UnixStream, deadline: Instant) -> Result<Self, ProtocolError> {
        let mut nonce = 0u64;
        let mut resend = Instant::now();
        let kernel = loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(ProtocolError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the agent did not answer",
                )));
            }
            if now >= resend {
                nonce += 1;
                write_frame(
                    &mut stream,
                    &Request::Hello {
                        version: VERSION,
                        nonce,
                        time_unix_ms: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()
                            .map(|d| d.as_millis() as u64),
                    },
                )?;
                resend = now + Duration::from_millis(250);
            }
            let wait = resend
                .min(deadline)
                .saturating_duration_since(Instant::now());
            stream.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
            match read_frame(&mut stream) {
                Ok(answer) => {
                    if let Some(kernel) = check_hello(answer, nonce)? {
                        break kernel;
                    }
                }
                Err(ProtocolError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        };
        stream.set_read_timeout(None)?;
        let routes: Routes = Arc::default();
        let (control_tx, control) = channel();
        let mut input = stream.try_clone()?;
        let r = routes.clone();
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let closed_by_reader = closed.clone();
        let reader = std::thread::spawn(move || {
            while let Ok(ev) = read_frame::<Event>(&mut input) {
                let id = match &ev {
                    Event::Started { id, .. }
                    | Event::Output { id, .. }
                    | Event::Exited { id, .. } => Some(id.clone()),
                    Event::Error { id, .. } => id.clone(),
                    _ => None,
                };
                let last = matches!(ev, Event::Exited { .. });
                match id {
                    Some(id) => {
                        let mut routes = lock(&r);
                        if let Some(tx) = routes.get(&id) {
                            let _ = tx.send(ev);
                        }
                        if last {
                            routes.remove(&id);
                        }
                    }
                    None => {
                        let _ = control_tx.send(ev);
                    }
                }
            }
            // The connection ended: every waiting process hears it.
            closed_by_reader.store(true, std::sync::atomic::Ordering::SeqCst);
            lock(&r).clear();
        });
        Ok(AgentClient {
            writer: Arc::new(Mutex::new(stream)),
            routes,
            control: Mutex::new(control),
            reader: Some(reader),
            closed,
            kernel,
        })
    }

    /// The guest kernel's release, as the agent reported it.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    /// Whether the connection has ended (the guest powered off or died).
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Starts a process in the guest and waits for the agent to confirm.
    pub fn start(&self, req: StartRequest) -> Result<Process, AgentError> {
        let id = req.id.clone();
        let (tx, rx) = channel();
        {
            let mut routes = lock(&self.routes);
            if routes.contains_key(&id) {
                return Err(AgentError::Duplicate(id));
            }
            routes.insert(id.clone(), tx);
        }
        let sent = write_frame(&mut *lock(&self.writer), &Request::Start(Box::new(req)));
        let first = sent.map_err(AgentError::from).and_then(|()| {
            rx.recv_timeout(Duration::from_secs(30))
                .map_err(|e| match e {
                    RecvTimeoutError::Timeout => AgentError::Timeout(Duration::from_secs(30)),
                    RecvTimeoutError::Disconnected => AgentError::Gone,
                })
        });
        match first {
            Ok(Event::Started { pid, user, .. }) => Ok(Process {
                id,
                pid,
                user,
                events: rx,
                writer: self.writer.clone(),
            }),
            Ok(Event::Error { message, .. }) => {
                lock(&self.routes).remove(&id);
                Err(AgentError::Guest(message))
            }
            Ok(other) => {
                lock(&self.routes).remove(&id);
                Err(ProtocolError::Unexpected(format!("{other:?}")).into())
            }
            Err(e) => {
                lock(&self.routes).remove(&id);
                Err(e)
            }
        }
    }

    /// Configures the guest's NIC; returns the interface's name.
    pub fn configure_network(
        &self,
        cfg: husk_protocol::NetworkConfig,
    ) -> Result<String, AgentError> {
        write_frame(&mut *lock(&self.writer), &Request::Network(cfg))?;
        let limit = Duration::from_secs(30);
        match lock(&self.control).recv_timeout(limit) {
            Ok(Event::NetworkReady { interface }) => Ok(interface),
            Ok(Event::Error { message, .. }) => Err(AgentError::Guest(message)),
            Ok(other) => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
            Err(RecvTimeoutError::Timeout) => Err(AgentError::Timeout(limit)),
            Err(RecvTimeoutError::Disconnected) => Err(AgentError::Gone),
        }
    }

    /// Applies the pod-wide settings (sysctls) in the guest.
    pub fn configure_pod(&self, cfg: husk_protocol::PodConfig) -> Result<(), AgentError> {
        write_frame(&mut *lock(&self.writer), &Request::Pod(cfg))?;
        let limit = Duration::from_secs(30);
        match lock(&self.control).recv_timeout(limit) {
            Ok(Event::PodReady) => Ok(()),
            Ok(Event::Error { message, .. }) => Err(AgentError::Guest(message)),
            Ok(other) => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
            Err(RecvTimeoutError::Timeout) => Err(AgentError::Timeout(limit)),
            Err(RecvTimeoutError::Disconnected) => Err(AgentError::Gone),
        }
    }

    /// Makes pod volumes ready in the guest for containers to mount. The
    /// requests go out at once and the agent answers them in order, so the
    /// guest works through them without waiting for the host in between.
    pub fn add_volumes(&self, reqs: Vec<husk_protocol::VolumeRequest>) -> Result<(), AgentError> {
        // One batch of control requests at a time: its answers are the
        // next control events.
        let control = lock(&self.control);
        let names: Vec<String> = reqs.iter().map(|r| r.name.clone()).collect();
        {
            let mut w = lock(&self.writer);
            for r in reqs {
                write_frame(&mut *w, &Request::Volume(r))?;
            }
        }
        let limit = Duration::from_secs(30);
        let mut first_error = None;
        for name in names {
            match control.recv_timeout(limit) {
                Ok(Event::VolumeReady { name: n }) if n == name => {}
                Ok(Event::Error { message, .. }) => {
                    first_error.get_or_insert(AgentError::Guest(message));
                }
                Ok(other) => {
                    first_error
                        .get_or_insert(ProtocolError::Unexpected(format!("{other:?}")).into());
                }
                Err(RecvTimeoutError::Timeout) => return Err(AgentError::Timeout(limit)),
                Err(RecvTimeoutError::Disconnected) => return Err(AgentError::Gone),
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Replaces the files of a configMap or secret volume in the guest.
    pub fn update_files(
        &self,
        name: &str,
        files: Vec<husk_protocol::File>,
    ) -> Result<(), AgentError> {
        let control = lock(&self.control);
        write_frame(
            &mut *lock(&self.writer),
            &Request::UpdateFiles {
                name: name.to_owned(),
                files,
            },
        )?;
        let limit = Duration::from_secs(30);
        match control.recv_timeout(limit) {
            Ok(Event::VolumeReady { name: got }) if got == name => Ok(()),
            Ok(Event::Error { message, .. }) => Err(AgentError::Guest(message)),
            Ok(other) => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
            Err(RecvTimeoutError::Timeout) => Err(AgentError::Timeout(limit)),
            Err(RecvTimeoutError::Disconnected) => Err(AgentError::Gone),
        }
    }

    /// Changes the limits of the running container whose first process is
    /// `id`.
    pub fn update(&self, id: &str, limits: husk_protocol::Limits) -> Result<(), AgentError> {
        let control = lock(&self.control);
        write_frame(
            &mut *lock(&self.writer),
            &Request::Update {
                id: id.to_owned(),
                limits,
            },
        )?;
        let limit = Duration::from_secs(10);
        match control.recv_timeout(limit) {
            Ok(Event::Updated { id: got }) if got == id => Ok(()),
            Ok(Event::Error { message, .. }) => Err(AgentError::Guest(message)),
            Ok(other) => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
            Err(RecvTimeoutError::Timeout) => Err(AgentError::Timeout(limit)),
            Err(RecvTimeoutError::Disconnected) => Err(AgentError::Gone),
        }
    }

    /// Resource usage of the guest and of each running container.
    pub fn stats(&self) -> Result<husk_protocol::GuestStats, AgentError> {
        let control = lock(&self.control);
        write_frame(&mut *lock(&self.writer), &Request::Stats)?;
        let limit = Duration::from_secs(10);
        match control.recv_timeout(limit) {
            Ok(Event::Stats(s)) => Ok(s),
            Ok(Event::Error { message, .. }) => Err(AgentError::Guest(message)),
            Ok(other) => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
            Err(RecvTimeoutError::Timeout) => Err(AgentError::Timeout(limit)),
            Err(RecvTimeoutError::Disconnected) => Err(AgentError::Gone),
        }
    }

    /// Asks the guest to kill what runs, sync and power off; the VM ends
    /// after the answer.
    pub fn shutdown(&self) -> Result<(), AgentError> {
        write_frame(&mut *lock(&self.writer), &Request::Shutdown)?;
        let limit = Duration::from_secs(10);
        loop {
            match lock(&self.control).recv_timeout(limit) {
                Ok(Event::ShuttingDown) => return Ok(()),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(AgentError::Timeout(limit)),
                Err(RecvTimeoutError::Disconnected) => return Err(AgentError::Gone),
            }
        }
    }
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        let _ = lock(&self.writer).shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// A process running in the guest.
pub struct Process {
    id: String,
    pid: u32,
    /// Who it runs as, as the agent resolved it.
    pub user: Option<husk_protocol::ProcessUser>,
    events: Receiver<Event>,
    writer: Arc<Mutex<UnixStream>>,
}

/// Sends signals to one process in the guest.
#[derive(Clone)]
pub struct Signaller {
    id: String,
    writer: Arc<Mutex<UnixStream>>,
}

impl Signaller {
    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        let req = Request::Signal {
            id: self.id.clone(),
            signal,
        };
        Ok(write_frame(&mut *lock(&self.writer), &req)?)
    }
}

/// How a process ended, with all it wrote.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Finished {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Process {
    /// Its pid inside the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn write_stdin(&self, data: &[u8], eof: bool) -> Result<(), AgentError> {
        let req = Request::Stdin {
            id: self.id.clone(),
            data: data.to_vec(),
            eof,
        };
        Ok(write_frame(&mut *lock(&self.writer), &req)?)
    }

    pub fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.signaller().signal(signal)
    }

    /// A handle that writes this process's stdin from another thread.
    pub fn stdin_writer(&self) -> impl Fn(&[u8], bool) -> Result<(), AgentError> + Send + Sync {
        let (id, writer) = (self.id.clone(), self.writer.clone());
        move |data: &[u8], eof: bool| {
            let req = Request::Stdin {
                id: id.clone(),
                data: data.to_vec(),
                eof,
            };
            Ok(write_frame(&mut *lock(&writer), &req)?)
        }
    }

    /// A handle that resizes this process's terminal from another thread.
    pub fn resizer(
        &self,
    ) -> impl Fn(husk_protocol::TtySize) -> Result<(), AgentError> + Send + Sync {
        let (id, writer) = (self.id.clone(), self.writer.clone());
        move |size| {
            let req = Request::Resize {
                id: id.clone(),
                size,
            };
            Ok(write_frame(&mut *lock(&writer), &req)?)
        }
    }

    /// A handle that signals this process from another thread.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            id: self.id.clone(),
            writer: self.writer.clone(),
        }
    }

    /// The next event (Output, Exited or Error), waiting up to `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Result<Event, AgentError> {
        self.events.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => AgentError::Timeout(timeout),
            RecvTimeoutError::Disconnected => AgentError::Gone,
        })
    }

    /// Collects the output until the process ends (or `timeout` passes).
    pub fn wait(&self, timeout: Duration) -> Result<Finished, AgentError> {
        let deadline = Instant::now() + timeout;
        let mut f = Finished::default();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_event(left)? {
                Event::Output { stream, data, .. } => match stream {
                    Stream::Stdout => f.stdout.extend(data),
                    Stream::Stderr => f.stderr.extend(data),
                },
                Event::Exited { code, signal, .. } => {
                    f.code = code;
                    f.signal = signal;
                    return Ok(f);
                }
                Event::Error { message, .. } => return Err(AgentError::Guest(message)),
                other => return Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
            }
        }
    }
}
