//! Who is attached to a CRI container's process (CRI Attach, `kubectl
//! attach`): its output goes to them too, and they write its stdin and
//! resize its terminal. One hub per container, in both sandbox kinds: the
//! VM sandbox connects it to the agent's process, the wasm sandbox to the
//! guest's stdin pipe and output pumps.

use std::sync::Mutex;

#[derive(Default)]
pub(crate) struct AttachHub {
    listeners: Mutex<Vec<std::sync::mpsc::Sender<crate::ExecMsg>>>,
    stdin: Mutex<Option<crate::StdinWriter>>,
    resize: Mutex<Option<crate::Resizer>>,
}

/// The hubs of a pod's manifest containers, by name, made on first use and
/// kept across restarts.
#[derive(Default)]
pub(crate) struct Hubs(Mutex<std::collections::HashMap<String, std::sync::Arc<AttachHub>>>);

impl Hubs {
    pub(crate) fn get(&self, name: &str) -> std::sync::Arc<AttachHub> {
        locked(&self.0).entry(name.to_owned()).or_default().clone()
    }
}

pub(crate) fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl AttachHub {
    /// The process started: its stdin (and terminal, if it has one) are
    /// there to use.
    pub(crate) fn connect(&self, stdin: crate::StdinWriter, resize: Option<crate::Resizer>) {
        *locked(&self.stdin) = Some(stdin);
        *locked(&self.resize) = resize;
    }

    /// Whether anyone is attached.
    pub(crate) fn attached(&self) -> bool {
        !locked(&self.listeners).is_empty()
    }

    pub(crate) fn publish(&self, m: crate::ExecMsg) {
        locked(&self.listeners).retain(|l| l.send(m.clone()).is_ok());
    }

    /// The process ended with `m`: the last message to everyone attached.
    pub(crate) fn close(&self, m: crate::ExecMsg) {
        self.publish(m);
        locked(&self.listeners).clear();
        *locked(&self.stdin) = None;
        *locked(&self.resize) = None;
    }

    /// A new attach to container `id`: its output from now on; stdin only
    /// when the container was created with it (`stdin`), and with
    /// `stdin_once` the first attach's end ends it. Leaving does not end
    /// the process.
    pub(crate) fn attach(
        self: &std::sync::Arc<Self>,
        id: &str,
        stdin: bool,
        stdin_once: bool,
    ) -> crate::ExecSession {
        let (tx, rx) = std::sync::mpsc::channel();
        locked(&self.listeners).push(tx);
        let (h, cid, allowed) = (self.clone(), id.to_owned(), stdin);
        // The end of an attached client's input ends the container's stdin
        // only with stdin_once (as containerd does): otherwise others may
        // attach and write after it.
        let stdin: crate::StdinWriter = Box::new(move |d: &[u8], eof: bool| {
            if !allowed {
                return Err(format!("container {cid} was created without stdin"));
            }
            if d.is_empty() && eof && !stdin_once {
                return Ok(());
            }
            match &*locked(&h.stdin) {
                Some(w) => w(d, eof && stdin_once),
                None => Err(format!("container {cid} has ended")),
            }
        });
        let h = self.clone();
        let resize: crate::Resizer = Box::new(move |s| match &*locked(&h.resize) {
            Some(r) => r(s),
            None => Ok(()),
        });
        let (h, once) = (self.clone(), stdin_once);
        let kill: crate::Killer = Box::new(move || {
            if once {
                if let Some(w) = &*locked(&h.stdin) {
                    let _ = w(&[], true);
                }
            }
        });
        crate::ExecSession {
            output: rx,
            stdin,
            resize,
            kill,
        }
    }
}

/// The manifest's container `name` (`husk attach`), which must be running.
pub(crate) fn running_container<'a>(
    plan: &'a crate::pod::PodPlan,
    status: &crate::state::PodStatus,
    name: &str,
) -> Result<&'a crate::pod::ContainerPlan, crate::Failure> {
    let c = plan
        .all_containers()
        .find(|c| c.name == name)
        .ok_or_else(|| crate::Failure::no_container(name))?;
    let running = status
        .all_containers()
        .any(|s| s.name == name && matches!(s.state, crate::state::ContainerState::Running { .. }));
    if !running {
        return Err(crate::Failure::new(
            crate::Code::FailedPrecondition,
            format!("container {name} is not running"),
        ));
    }
    Ok(c)
}

/// Writes to a guest's stdin pipe (a dup of it, so that a write that
/// blocks on a full pipe holds no lock); `eof` closes the pipe, which is
/// the guest's SIGTERM, as stopping the container does.
pub(crate) fn pipe_writer(stdin: crate::wasm::supervisor::StdinSlot) -> crate::StdinWriter {
    Box::new(move |data: &[u8], eof: bool| {
        let fd = {
            let mut slot = stdin.lock().unwrap_or_else(|p| p.into_inner());
            if eof && data.is_empty() {
                slot.take();
                return Ok(());
            }
            match slot.as_ref() {
                Some(fd) => fd.try_clone().map_err(|e| format!("stdin: {e}"))?,
                None => return Err("the container's stdin is closed".into()),
            }
        };
        std::io::Write::write_all(&mut std::fs::File::from(fd), data)
            .map_err(|e| format!("stdin: {e}"))?;
        if eof {
            stdin.lock().unwrap_or_else(|p| p.into_inner()).take();
        }
        Ok(())
    })
}

/// A reader that also hands what it reads to the container's attached
/// clients (the wasm sandbox's output pumps read through it).
pub(crate) struct Tee<R> {
    pub(crate) inner: R,
    pub(crate) hub: std::sync::Arc<AttachHub>,
    pub(crate) stderr: bool,
}

impl<R: std::io::Read> std::io::Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        // Output nobody is attached to is not copied (the common case).
        if n > 0 && self.hub.attached() {
            let data = buf[..n].to_vec();
            self.hub.publish(if self.stderr {
                crate::ExecMsg::Stderr { data }
            } else {
                crate::ExecMsg::Stdout { data }
            });
        }
        Ok(n)
    }
}
