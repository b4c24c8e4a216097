//! The host's client of husk-agent: one connection, requests answered in
//! order (husk-protocol). It owns nothing but the stream it was given.

use husk_protocol::{
    check_hello, read_frame, write_frame, ExecRequest, ExecResult, ProtocolError, Request,
    Response, VERSION,
};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

pub struct AgentClient<S: Read + Write> {
    stream: S,
    kernel: String,
}

impl AgentClient<UnixStream> {
    /// Says hello until the agent answers (or `deadline` passes) and checks
    /// its protocol version. A virtio-serial port drops what the host sends
    /// before the guest has opened it, so the hello is repeated, each time
    /// with a new nonce, and answers to earlier ones are skipped.
    pub fn connect(mut stream: UnixStream, deadline: Instant) -> Result<Self, ProtocolError> {
        let mut nonce = 0u64;
        let mut resend = Instant::now();
        loop {
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
                    },
                )?;
                resend = now + Duration::from_millis(250);
            }
            stream.set_read_timeout(Some(
                resend
                    .min(deadline)
                    .saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))?;
            match read_frame(&mut stream) {
                Ok(answer) => {
                    if let Some(kernel) = check_hello(answer, nonce)? {
                        stream.set_read_timeout(None)?;
                        return Ok(AgentClient { stream, kernel });
                    }
                }
                Err(ProtocolError::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl<S: Read + Write> AgentClient<S> {
    /// The guest kernel's release, as the agent reported it.
    pub fn kernel(&self) -> &str {
        &self.kernel
    }

    fn call(&mut self, req: &Request) -> Result<Response, ProtocolError> {
        write_frame(&mut self.stream, req)?;
        read_frame(&mut self.stream)
    }

    /// Runs a process in the guest to its end.
    pub fn exec(&mut self, req: ExecRequest) -> Result<ExecResult, AgentError> {
        match self.call(&Request::Exec(req))? {
            Response::Exited(r) => Ok(r),
            Response::Error { message } => Err(AgentError::Guest(message)),
            other => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
        }
    }

    /// Asks the guest to sync and power off; the VM ends after the answer.
    pub fn shutdown(mut self) -> Result<(), AgentError> {
        match self.call(&Request::Shutdown)? {
            Response::ShuttingDown => Ok(()),
            other => Err(ProtocolError::Unexpected(format!("{other:?}")).into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The agent could not do what was asked; its message says why.
    #[error("in the guest: {0}")]
    Guest(String),
}
