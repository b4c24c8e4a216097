//! `husk cp [-c CONTAINER] SRC DEST`, one of them `POD:PATH`: copies a
//! file or a directory out of a running container or into it, as
//! `docker cp` does (into DEST when it is a directory, otherwise as DEST).
//! The container needs no tar of its own: husk-agent packs and unpacks
//! inside the container's root and mounts, as root; what comes out of a
//! guest is unpacked on the host with [`husk_protocol::copy::unpack`],
//! which trusts none of it. `POD:PATH` - writes the tar to stdout.

use super::exec::stream;
use super::{fail, running_pod, EXIT_FAILURE, EXIT_USAGE};
use husk_sandbox::state::Roots;
use husk_sandbox::{ExecSpec, Tool};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct CpArgs {
    /// Container (default: the pod's first container).
    #[arg(short, long)]
    container: Option<String>,
    /// What to copy: a local path, or POD:PATH.
    src: String,
    /// Where to: a local path (- for a tar on stdout), or POD:PATH.
    dest: String,
}

/// `POD:PATH` (a colon before any slash); a path inside the container is
/// taken from its root.
fn remote(arg: &str) -> Option<(&str, String)> {
    let (pod, path) = arg.split_once(':')?;
    if pod.is_empty() || pod.contains('/') {
        return None;
    }
    let path = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    };
    Some((pod, path))
}

pub fn run(roots: &Roots, a: CpArgs) -> i32 {
    let (pod, remote_path, local, out) = match (remote(&a.src), remote(&a.dest)) {
        (Some((pod, p)), None) => (pod, p, a.dest.clone(), true),
        (None, Some((pod, p))) => (pod, p, a.src.clone(), false),
        _ => {
            return fail(
                EXIT_USAGE,
                "cp: give one POD:PATH and one local path, e.g. `husk cp web:/etc/hostname .`",
            )
        }
    };
    if !out && local == "-" {
        return fail(
            EXIT_USAGE,
            "cp: copying from stdin is not supported; name a local file or directory",
        );
    }
    if !out {
        if let Err(e) = std::fs::symlink_metadata(&local) {
            return fail(EXIT_FAILURE, format!("cp: {local}: {e}"));
        }
    }
    let v = match running_pod(roots, pod, a.container.as_deref()) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let socket = roots.pod(&v.record.id).socket();
    let name = v.record.plan.name.clone();
    let r = if out {
        copy_out(&socket, a.container, remote_path, &local)
    } else {
        copy_in(&socket, a.container, remote_path, Path::new(&local))
    };
    match r {
        Ok(()) => 0,
        Err(e) => fail(EXIT_FAILURE, format!("pod {name}: cp: {e}")),
    }
}

/// The tool's exit and what it said, as a result.
fn checked(code: Result<i32, String>, stderr: Vec<u8>) -> Result<(), String> {
    match code? {
        0 => Ok(()),
        n => {
            let msg = String::from_utf8_lossy(&stderr).trim().to_owned();
            Err(if msg.is_empty() {
                format!("the copy failed in the container (exit {n})")
            } else {
                format!("in the container: {msg}")
            })
        }
    }
}

fn copy_out(
    socket: &Path,
    container: Option<String>,
    path: String,
    local: &str,
) -> Result<(), String> {
    let spec = ExecSpec {
        copy: Some(Tool::TarOut { path }),
        ..Default::default()
    };
    let mut err = Vec::new();
    if local == "-" {
        let code = stream(
            socket,
            container,
            spec,
            None,
            &mut std::io::stdout(),
            &mut err,
            false,
        );
        return checked(code, err);
    }
    let dest = PathBuf::from(local);
    let (r, w) = std::io::pipe().map_err(|e| e.to_string())?;
    let unpacker = std::thread::spawn(move || husk_protocol::copy::unpack(r, &dest));
    let mut w = Feed {
        pipe: w,
        broken: false,
    };
    let code = stream(socket, container, spec, None, &mut w, &mut err, false);
    let broken = w.broken;
    drop(w);
    let unpacked = unpacker
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the unpacking thread panicked")));
    // What went wrong first: the host's unpacking when it stopped reading
    // (the stream then failed on the pipe), otherwise the container's or
    // the stream's (the archive then ends early).
    match (code, unpacked) {
        (_, Err(e)) if broken => Err(format!("{local}: {e}")),
        (Ok(0), Err(e)) => Err(format!("{local}: {e}")),
        (code, _) => checked(code, err),
    }
}

/// The pipe to the unpacker, noting whether it stopped reading.
struct Feed {
    pipe: std::io::PipeWriter,
    broken: bool,
}

impl std::io::Write for Feed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let r = self.pipe.write(buf);
        self.broken |= r.is_err();
        r
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.pipe.flush()
    }
}

fn copy_in(
    socket: &Path,
    container: Option<String>,
    path: String,
    local: &Path,
) -> Result<(), String> {
    let spec = ExecSpec {
        copy: Some(Tool::TarIn { path }),
        ..Default::default()
    };
    let (r, w) = std::io::pipe().map_err(|e| e.to_string())?;
    let src = local.to_path_buf();
    let packer = std::thread::spawn(move || husk_protocol::copy::pack(&src, w));
    let mut err = Vec::new();
    let code = stream(
        socket,
        container,
        spec,
        Some(Box::new(r)),
        &mut std::io::sink(),
        &mut err,
        false,
    );
    let packed = packer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("the packing thread panicked")));
    packed.map_err(|e| format!("{}: {e}", local.display()))?;
    checked(code, err)
}

#[cfg(test)]
mod tests {
    use super::remote;

    #[test]
    fn pod_paths_are_told_from_local_ones() {
        assert_eq!(remote("web:/etc/hosts"), Some(("web", "/etc/hosts".into())));
        assert_eq!(remote("web:tmp/x"), Some(("web", "/tmp/x".into())));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/abs/a:b"), None);
        assert_eq!(remote(":x"), None);
        assert_eq!(remote("plain"), None);
    }
}
