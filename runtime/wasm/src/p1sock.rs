//! Preopened listening sockets for WASI p1 modules, as `wasmtime run
//! --tcplisten` gives them: each declared port is a listening TCP socket at
//! fd 3, 4, … that the guest serves with `sock_accept`, `fd_read`/`sock_recv`,
//! `fd_write`/`sock_send`, `sock_shutdown`, `poll_oneoff` and `fd_close`.
//!
//! wasmtime-wasi's p1 layer has no sockets (its `sock_*` calls answer
//! ENOTSOCK) and its descriptor table is private, so this module interposes:
//! - every socket fd is backed by a placeholder descriptor in wasmtime-wasi's
//!   table (an empty read-only directory), so fd numbers are allocated in one
//!   place and never collide; the first preopens are these placeholders;
//! - every p1 function that takes an fd is shadowed in the linker: calls on a
//!   socket fd are served here, all others go to wasmtime-wasi unchanged
//!   through a tiny trampoline module that imports the guest's memory (the
//!   original functions read guest memory from their caller's `memory`
//!   export, so they must be called from wasm that exports it);
//! - new placeholders for accepted connections are opened by a second tiny
//!   module with its own memory.
//!
//! `fd_prestat_get` on a socket answers success with a tag that is not
//! "dir", so wasi-libc skips it and still finds the volumes after it.

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use wasmtime::{Caller, Extern, Func, Instance, Linker, Module, Store, Val, ValType};

/// The p1 import module.
const WASI: &str = "wasi_snapshot_preview1";
/// Where the original p1 functions stay reachable for the trampoline.
const INNER: &str = "husk_wasi_inner";

/// Guest path of the placeholder preopens. Never seen by the guest: every
/// call on their fds is served by this module.
pub(crate) const PLACEHOLDER_GUEST_PATH: &str = "/.husk-socket";

// WASI errno values.
const SUCCESS: i32 = 0;
const EAGAIN: i32 = 6;
const EBADF: i32 = 8;
const ECONNRESET: i32 = 15;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const EIO: i32 = 29;
const ENOTCONN: i32 = 53;
const ENOTDIR: i32 = 54;
const ENOTSUP: i32 = 58;
const EPIPE: i32 = 64;
const ESPIPE: i32 = 70;

const FDFLAGS_NONBLOCK: u32 = 1 << 2;
const FILETYPE_SOCKET_STREAM: u8 = 6;
/// Largest single read or write served in one call.
const MAX_IO: usize = 1 << 20;

/// What a shadowed function does when one of its fds is a socket.
#[derive(Clone, Copy, Debug)]
enum Op {
    Close,
    FdstatGet,
    FdstatSetFlags,
    FilestatGet,
    Read,
    Write,
    Recv,
    Send,
    Accept,
    Shutdown,
    Renumber,
    PrestatGet,
    Poll,
    /// Not meaningful on a socket: answer this errno.
    Errno(i32),
}

/// Every p1 function that takes an fd, where its fds are, and what it does
/// on a socket.
const SHADOWED: &[(&str, &[usize], Op)] = &[
    ("fd_advise", &[0], Op::Errno(ESPIPE)),
    ("fd_allocate", &[0], Op::Errno(ESPIPE)),
    ("fd_close", &[0], Op::Close),
    ("fd_datasync", &[0], Op::Errno(EINVAL)),
    ("fd_fdstat_get", &[0], Op::FdstatGet),
    ("fd_fdstat_set_flags", &[0], Op::FdstatSetFlags),
    ("fd_fdstat_set_rights", &[0], Op::Errno(ENOTSUP)),
    ("fd_filestat_get", &[0], Op::FilestatGet),
    ("fd_filestat_set_size", &[0], Op::Errno(EINVAL)),
    ("fd_filestat_set_times", &[0], Op::Errno(EINVAL)),
    ("fd_pread", &[0], Op::Errno(ESPIPE)),
    ("fd_prestat_get", &[0], Op::PrestatGet),
    ("fd_prestat_dir_name", &[0], Op::Errno(ENOTDIR)),
    ("fd_pwrite", &[0], Op::Errno(ESPIPE)),
    ("fd_read", &[0], Op::Read),
    ("fd_readdir", &[0], Op::Errno(ENOTDIR)),
    ("fd_renumber", &[0, 1], Op::Renumber),
    ("fd_seek", &[0], Op::Errno(ESPIPE)),
    ("fd_sync", &[0], Op::Errno(EINVAL)),
    ("fd_tell", &[0], Op::Errno(ESPIPE)),
    ("fd_write", &[0], Op::Write),
    ("path_create_directory", &[0], Op::Errno(ENOTDIR)),
    ("path_filestat_get", &[0], Op::Errno(ENOTDIR)),
    ("path_filestat_set_times", &[0], Op::Errno(ENOTDIR)),
    ("path_link", &[0, 4], Op::Errno(ENOTDIR)),
    ("path_open", &[0], Op::Errno(ENOTDIR)),
    ("path_readlink", &[0], Op::Errno(ENOTDIR)),
    ("path_remove_directory", &[0], Op::Errno(ENOTDIR)),
    ("path_rename", &[0, 3], Op::Errno(ENOTDIR)),
    ("path_symlink", &[2], Op::Errno(ENOTDIR)),
    ("path_unlink_file", &[0], Op::Errno(ENOTDIR)),
    ("poll_oneoff", &[], Op::Poll),
    ("sock_accept", &[0], Op::Accept),
    ("sock_recv", &[0], Op::Recv),
    ("sock_send", &[0], Op::Send),
    ("sock_shutdown", &[0], Op::Shutdown),
];

#[derive(Debug)]
enum Sock {
    Listener(TcpListener),
    Stream(TcpStream),
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Listener(l) => l.as_raw_fd(),
            Sock::Stream(s) => s.as_raw_fd(),
        }
    }
}

/// Registers `sock` with the tokio reactor.
fn register(sock: Sock) -> io::Result<AsyncFd<Sock>> {
    // SAFETY: `sock` owns its descriptor (a std TcpListener or TcpStream);
    // it stays open until the AsyncFd drops `sock`, and `as_raw_fd` always
    // returns that same descriptor.
    unsafe { AsyncFd::register(sock) }.map_err(io::Error::from)
}

struct Entry {
    sock: Arc<AsyncFd<Sock>>,
    nonblock: bool,
}

/// The socket side of a p1 guest's store: its socket fds and the two helper
/// instances.
#[derive(Default)]
pub(crate) struct P1Sockets {
    map: HashMap<u32, Entry>,
    tramp: Option<Instance>,
    helper: Option<Instance>,
}

/// Store data that carries [`P1Sockets`].
pub(crate) trait SockHost: Send + 'static {
    fn socks(&mut self) -> &mut P1Sockets;
}

impl P1Sockets {
    /// Binds `0.0.0.0:PORT` for each port (in the calling thread's netns),
    /// as fds 3, 4, … in order.
    pub(crate) fn listen(ports: &[u16]) -> Result<Self, String> {
        let mut socks = P1Sockets::default();
        for (i, port) in ports.iter().enumerate() {
            let l = TcpListener::bind(("0.0.0.0", *port)).map_err(|e| {
                format!("containerPort {port}: cannot listen on 0.0.0.0:{port}: {e}")
            })?;
            l.set_nonblocking(true)
                .map_err(|e| format!("containerPort {port}: {e}"))?;
            let afd =
                register(Sock::Listener(l)).map_err(|e| format!("containerPort {port}: {e}"))?;
            socks.map.insert(
                3 + i as u32,
                Entry {
                    sock: Arc::new(afd),
                    nonblock: false,
                },
            );
        }
        Ok(socks)
    }

    /// Number of socket fds.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }
}

/// The two helper modules, compiled once per engine.
pub(crate) struct Helpers {
    tramp: Module,
    helper: Module,
}

fn wat_types(ty: &wasmtime::FuncType) -> (String, String) {
    let names = |it: &mut dyn Iterator<Item = ValType>| {
        it.map(|t| match t {
            ValType::I64 => "i64",
            ValType::F32 => "f32",
            ValType::F64 => "f64",
            _ => "i32",
        })
        .collect::<Vec<_>>()
        .join(" ")
    };
    (names(&mut ty.params()), names(&mut ty.results()))
}

/// Shadows the fd functions of the p1 imports in `linker` (which already has
/// wasmtime-wasi's p1 functions) and instantiates the placeholder helper.
/// Call [`attach_memory`] after the guest is instantiated.
pub(crate) async fn install<T: SockHost>(
    engine: &crate::WasmEngine,
    linker: &mut Linker<T>,
    store: &mut Store<T>,
) -> wasmtime::Result<()> {
    linker.alias_module(WASI, INNER)?;
    let mut types = Vec::new();
    for (name, _, _) in SHADOWED {
        let func = linker
            .get(&mut *store, WASI, name)
            .ok()
            .and_then(Extern::into_func)
            .ok_or_else(|| wasmtime::format_err!("wasmtime-wasi has no p1 function {name}"))?;
        types.push(func.ty(&*store));
    }
    let helpers = engine.p1_socket_helpers(|| {
        let mut tramp = String::from("(module (import \"env\" \"memory\" (memory 0))\n");
        let mut bodies = String::new();
        for ((name, _, _), ty) in SHADOWED.iter().zip(&types) {
            let (params, results) = wat_types(ty);
            tramp.push_str(&format!(
                "(import \"{INNER}\" \"{name}\" (func ${name} (param {params}) (result {results})))\n"
            ));
            let gets: String = (0..ty.params().len())
                .map(|i| format!("local.get {i} "))
                .collect();
            bodies.push_str(&format!(
                "(func (export \"{name}\") (param {params}) (result {results}) {gets} call ${name})\n"
            ));
        }
        tramp.push_str("(export \"memory\" (memory 0))\n");
        tramp.push_str(&bodies);
        tramp.push(')');
        let open_ty = &types[SHADOWED.iter().position(|s| s.0 == "path_open").unwrap_or(0)];
        let (params, results) = wat_types(open_ty);
        // path_open(dirfd, dirflags 0, path ".", len 1, oflags DIRECTORY,
        // rights FD_READ, inheriting 0, fdflags 0, out 8)
        let helper = format!(
            "(module (import \"{INNER}\" \"path_open\" (func $open (param {params}) (result {results})))
               (memory (export \"memory\") 1)
               (data (i32.const 0) \".\")
               (func (export \"placeholder\") (param $dir i32) (result i32) (local $e i32)
                 (local.set $e (call $open (local.get $dir) (i32.const 0) (i32.const 0) (i32.const 1)
                   (i32.const 2) (i64.const 2) (i64.const 0) (i32.const 0) (i32.const 8)))
                 (if (result i32) (local.get $e)
                   (then (i32.sub (i32.const 0) (local.get $e)))
                   (else (i32.load (i32.const 8))))))"
        );
        Ok(Helpers {
            tramp: Module::new(engine.engine(), &tramp)?,
            helper: Module::new(engine.engine(), &helper)?,
        })
    })?;
    let helper = linker
        .instantiate_async(&mut *store, &helpers.helper)
        .await?;
    store.data_mut().socks().helper = Some(helper);

    linker.allow_shadowing(true);
    for ((name, fds, op), ty) in SHADOWED.iter().zip(types) {
        let (name, fds, op): (&'static str, &'static [usize], Op) = (name, fds, *op);
        linker.func_new_async(WASI, name, ty, move |mut caller, params, results| {
            Box::new(async move {
                let errno = dispatch(&mut caller, name, fds, op, params, results).await?;
                if let Some(errno) = errno {
                    results[0] = Val::I32(errno);
                }
                Ok(())
            })
        })?;
    }
    linker.allow_shadowing(false);
    Ok(())
}

/// Instantiates the trampoline over the guest's memory.
pub(crate) async fn attach_memory<T: SockHost>(
    engine: &crate::WasmEngine,
    linker: &mut Linker<T>,
    store: &mut Store<T>,
    guest: &Instance,
) -> wasmtime::Result<()> {
    let memory = guest
        .get_export(&mut *store, "memory")
        .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))?;
    let helpers = engine
        .p1_helpers
        .get()
        .ok_or_else(|| wasmtime::format_err!("p1 socket helpers: install() was not called"))?;
    linker.allow_shadowing(true);
    linker.define(&*store, "env", "memory", memory)?;
    linker.allow_shadowing(false);
    let tramp = linker
        .instantiate_async(&mut *store, &helpers.tramp)
        .await?;
    store.data_mut().socks().tramp = Some(tramp);
    Ok(())
}

impl crate::WasmEngine {
    fn p1_socket_helpers(
        &self,
        make: impl FnOnce() -> wasmtime::Result<Helpers>,
    ) -> wasmtime::Result<&Helpers> {
        if let Some(h) = self.p1_helpers.get() {
            return Ok(h);
        }
        let h = make()?;
        Ok(self.p1_helpers.get_or_init(|| h))
    }
}

/// Forwards a call to wasmtime-wasi through the trampoline.
async fn pass<T: SockHost>(
    caller: &mut Caller<'_, T>,
    name: &str,
    params: &[Val],
    results: &mut [Val],
) -> wasmtime::Result<()> {
    let tramp =
        caller.data_mut().socks().tramp.ok_or_else(|| {
            wasmtime::format_err!("{name} called before the module was instantiated")
        })?;
    let func: Func = tramp
        .get_func(&mut *caller, name)
        .ok_or_else(|| wasmtime::format_err!("trampoline lacks {name}"))?;
    func.call_async(&mut *caller, params, results).await
}

fn arg(params: &[Val], i: usize) -> u32 {
    match params.get(i) {
        Some(Val::I32(v)) => *v as u32,
        Some(Val::I64(v)) => *v as u32,
        _ => 0,
    }
}

fn io_errno(e: &io::Error) -> i32 {
    match e.kind() {
        io::ErrorKind::WouldBlock => EAGAIN,
        io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => ECONNRESET,
        io::ErrorKind::BrokenPipe => EPIPE,
        io::ErrorKind::NotConnected => ENOTCONN,
        io::ErrorKind::InvalidInput => EINVAL,
        _ => EIO,
    }
}

fn memory<T: SockHost>(caller: &mut Caller<'_, T>) -> wasmtime::Result<wasmtime::Memory> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| wasmtime::format_err!("the module exports no memory"))
}

fn get_u32(mem: &[u8], at: u32) -> Option<u32> {
    let at = at as usize;
    mem.get(at..at + 4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
}

fn get_u64(mem: &[u8], at: u32) -> Option<u64> {
    let at = at as usize;
    mem.get(at..at + 8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
}

fn put(mem: &mut [u8], at: u32, bytes: &[u8]) -> Option<()> {
    let at = at as usize;
    mem.get_mut(at..at + bytes.len())?.copy_from_slice(bytes);
    Some(())
}

/// (address, length) of each iovec.
fn iovecs(mem: &[u8], at: u32, count: u32) -> Option<Vec<(u32, u32)>> {
    (0..count)
        .map(|i| {
            let base = at.checked_add(i.checked_mul(8)?)?;
            Some((get_u32(mem, base)?, get_u32(mem, base + 4)?))
        })
        .collect()
}

fn entry<T: SockHost>(caller: &mut Caller<'_, T>, fd: u32) -> Option<(Arc<AsyncFd<Sock>>, bool)> {
    caller
        .data_mut()
        .socks()
        .map
        .get(&fd)
        .map(|e| (e.sock.clone(), e.nonblock))
}

/// Runs `op` on the socket until it does not block (or once, for a
/// non-blocking fd).
async fn io_op<R>(
    sock: &AsyncFd<Sock>,
    nonblock: bool,
    write: bool,
    mut op: impl FnMut(&Sock) -> io::Result<R>,
) -> io::Result<R> {
    if nonblock {
        return op(sock.get_ref());
    }
    loop {
        let mut guard = if write {
            sock.writable().await?
        } else {
            sock.readable().await?
        };
        match guard.try_io(|s| op(s.get_ref())) {
            Ok(r) => return r,
            Err(_would_block) => continue,
        }
    }
}

async fn dispatch<T: SockHost>(
    caller: &mut Caller<'_, T>,
    name: &'static str,
    fds: &[usize],
    op: Op,
    params: &[Val],
    results: &mut [Val],
) -> wasmtime::Result<Option<i32>> {
    if let Op::Poll = op {
        return poll_oneoff(caller, params, results).await;
    }
    let socket_fd = fds
        .iter()
        .map(|&i| arg(params, i))
        .find(|fd| caller.data_mut().socks().map.contains_key(fd));
    let Some(fd) = socket_fd else {
        pass(caller, name, params, results).await?;
        return Ok(None);
    };
    let mem = memory(caller)?;
    Ok(Some(match op {
        Op::Errno(e) => e,
        Op::Poll => unreachable!("handled above"),
        Op::Close => {
            caller.data_mut().socks().map.remove(&fd);
            pass(caller, name, params, results).await?;
            return Ok(None);
        }
        Op::Renumber => {
            let (from, to) = (arg(params, 0), arg(params, 1));
            pass(caller, name, params, results).await?;
            if matches!(results[0], Val::I32(SUCCESS)) {
                let map = &mut caller.data_mut().socks().map;
                map.remove(&to);
                if let Some(e) = map.remove(&from) {
                    map.insert(to, e);
                }
            }
            return Ok(None);
        }
        Op::PrestatGet => {
            // A tag that is not "dir": wasi-libc skips it and goes on.
            let at = arg(params, 1);
            match put(mem.data_mut(&mut *caller), at, &[1, 0, 0, 0, 0, 0, 0, 0]) {
                Some(()) => SUCCESS,
                None => EFAULT,
            }
        }
        Op::FdstatGet => {
            let nonblock = entry(caller, fd).is_some_and(|(_, nb)| nb);
            let mut stat = [0u8; 24];
            stat[0] = FILETYPE_SOCKET_STREAM;
            let flags: u16 = if nonblock { FDFLAGS_NONBLOCK as u16 } else { 0 };
            stat[2..4].copy_from_slice(&flags.to_le_bytes());
            let rights: u64 = (1 << 30) - 1;
            stat[8..16].copy_from_slice(&rights.to_le_bytes());
            stat[16..24].copy_from_slice(&rights.to_le_bytes());
            match put(mem.data_mut(&mut *caller), arg(params, 1), &stat) {
                Some(()) => SUCCESS,
                None => EFAULT,
            }
        }
        Op::FdstatSetFlags => {
            let flags = arg(params, 1);
            if let Some(e) = caller.data_mut().socks().map.get_mut(&fd) {
                e.nonblock = flags & FDFLAGS_NONBLOCK != 0;
            }
            SUCCESS
        }
        Op::FilestatGet => {
            let mut stat = [0u8; 64];
            stat[16] = FILETYPE_SOCKET_STREAM;
            stat[24] = 1;
            match put(mem.data_mut(&mut *caller), arg(params, 1), &stat) {
                Some(()) => SUCCESS,
                None => EFAULT,
            }
        }
        Op::Read | Op::Recv => {
            let (iov_at, iov_len) = (arg(params, 1), arg(params, 2));
            let flags = if let Op::Recv = op { arg(params, 3) } else { 0 };
            let (peek, waitall) = (flags & 1 != 0, flags & 2 != 0);
            let Some(iovs) = iovecs(mem.data(&*caller), iov_at, iov_len) else {
                return Ok(Some(EFAULT));
            };
            let want = iovs.iter().map(|v| v.1 as usize).sum::<usize>().min(MAX_IO);
            let Some((sock, nonblock)) = entry(caller, fd) else {
                return Ok(Some(EBADF));
            };
            if let Sock::Listener(_) = sock.get_ref() {
                return Ok(Some(ENOTCONN));
            }
            let mut buf = vec![0u8; want];
            let mut got = 0;
            while got < want {
                let r = io_op(&sock, nonblock && got == 0, false, |s| match s {
                    Sock::Stream(s) if peek => s.peek(&mut buf[got..]),
                    Sock::Stream(s) => (&mut &*s).read(&mut buf[got..]),
                    Sock::Listener(_) => Err(io::ErrorKind::NotConnected.into()),
                })
                .await;
                match r {
                    Ok(0) => break,
                    Ok(n) => got += n,
                    Err(e) if got == 0 => return Ok(Some(io_errno(&e))),
                    Err(_) => break,
                }
                if !waitall || peek {
                    break;
                }
            }
            let data = mem.data_mut(&mut *caller);
            let mut off = 0;
            for (at, len) in iovs {
                let n = (len as usize).min(got - off);
                if put(data, at, &buf[off..off + n]).is_none() {
                    return Ok(Some(EFAULT));
                }
                off += n;
                if off == got {
                    break;
                }
            }
            let (size_at, flags_at) = match op {
                Op::Recv => (arg(params, 4), Some(arg(params, 5))),
                _ => (arg(params, 3), None),
            };
            if put(data, size_at, &(got as u32).to_le_bytes()).is_none() {
                return Ok(Some(EFAULT));
            }
            if let Some(at) = flags_at {
                if put(data, at, &0u16.to_le_bytes()).is_none() {
                    return Ok(Some(EFAULT));
                }
            }
            SUCCESS
        }
        Op::Write | Op::Send => {
            let (iov_at, iov_len) = (arg(params, 1), arg(params, 2));
            let mut bytes = Vec::new();
            {
                let data = mem.data(&*caller);
                let Some(iovs) = iovecs(data, iov_at, iov_len) else {
                    return Ok(Some(EFAULT));
                };
                for (at, len) in iovs {
                    let Some(chunk) = data.get(at as usize..at as usize + len as usize) else {
                        return Ok(Some(EFAULT));
                    };
                    bytes.extend_from_slice(chunk);
                    if bytes.len() >= MAX_IO {
                        bytes.truncate(MAX_IO);
                        break;
                    }
                }
            }
            let Some((sock, nonblock)) = entry(caller, fd) else {
                return Ok(Some(EBADF));
            };
            let r = io_op(&sock, nonblock, true, |s| match s {
                Sock::Stream(s) => (&mut &*s).write(&bytes),
                Sock::Listener(_) => Err(io::ErrorKind::NotConnected.into()),
            })
            .await;
            let n = match r {
                Ok(n) => n,
                Err(e) => return Ok(Some(io_errno(&e))),
            };
            let at = match op {
                Op::Send => arg(params, 4),
                _ => arg(params, 3),
            };
            match put(mem.data_mut(&mut *caller), at, &(n as u32).to_le_bytes()) {
                Some(()) => SUCCESS,
                None => EFAULT,
            }
        }
        Op::Shutdown => {
            let Some((sock, _)) = entry(caller, fd) else {
                return Ok(Some(EBADF));
            };
            let how = match arg(params, 1) & 3 {
                1 => Shutdown::Read,
                2 => Shutdown::Write,
                3 => Shutdown::Both,
                _ => return Ok(Some(EINVAL)),
            };
            match sock.get_ref() {
                Sock::Stream(s) => match s.shutdown(how) {
                    Ok(()) => SUCCESS,
                    Err(e) => io_errno(&e),
                },
                Sock::Listener(_) => ENOTCONN,
            }
        }
        Op::Accept => {
            let flags = arg(params, 1);
            let Some((sock, nonblock)) = entry(caller, fd) else {
                return Ok(Some(EBADF));
            };
            let r = io_op(&sock, nonblock, false, |s| match s {
                Sock::Listener(l) => l.accept().map(|(s, _)| s),
                Sock::Stream(_) => Err(io::ErrorKind::InvalidInput.into()),
            })
            .await;
            let stream = match r {
                Ok(s) => s,
                Err(e) => return Ok(Some(io_errno(&e))),
            };
            if stream.set_nonblocking(true).is_err() {
                return Ok(Some(EIO));
            }
            let afd = register(Sock::Stream(stream))?;
            let helper = caller
                .data_mut()
                .socks()
                .helper
                .ok_or_else(|| wasmtime::format_err!("socket helper missing"))?;
            let place = helper
                .get_func(&mut *caller, "placeholder")
                .ok_or_else(|| wasmtime::format_err!("socket helper lacks placeholder"))?;
            let mut out = [Val::I32(0)];
            place
                .call_async(&mut *caller, &[Val::I32(fd as i32)], &mut out)
                .await?;
            let new_fd = match out[0] {
                Val::I32(v) if v >= 0 => v as u32,
                Val::I32(v) => return Ok(Some(-v)),
                _ => return Ok(Some(EIO)),
            };
            caller.data_mut().socks().map.insert(
                new_fd,
                Entry {
                    sock: Arc::new(afd),
                    nonblock: flags & FDFLAGS_NONBLOCK != 0,
                },
            );
            match put(
                mem.data_mut(&mut *caller),
                arg(params, 2),
                &new_fd.to_le_bytes(),
            ) {
                Some(()) => SUCCESS,
                None => EFAULT,
            }
        }
    }))
}

enum Sub {
    Sock {
        sock: Arc<AsyncFd<Sock>>,
        write: bool,
    },
    Clock(Pin<Box<tokio::time::Sleep>>),
    /// A non-socket fd in a poll that also waits on sockets: files are
    /// always ready.
    Ready,
}

/// `poll_oneoff`: passed through unless a subscription names a socket; then
/// served here (sockets by readiness, clocks by timers, other fds ready).
async fn poll_oneoff<T: SockHost>(
    caller: &mut Caller<'_, T>,
    params: &[Val],
    results: &mut [Val],
) -> wasmtime::Result<Option<i32>> {
    let (in_at, out_at, nsubs, nevents_at) = (
        arg(params, 0),
        arg(params, 1),
        arg(params, 2),
        arg(params, 3),
    );
    let mem = memory(caller)?;
    let mut raw = Vec::new();
    {
        let data = mem.data(&*caller);
        for i in 0..nsubs {
            let Some(base) = i.checked_mul(48).and_then(|o| in_at.checked_add(o)) else {
                return Ok(Some(EFAULT));
            };
            let (Some(userdata), Some(tag), Some(word), Some(timeout), Some(flags)) = (
                get_u64(data, base),
                data.get(base as usize + 8).copied(),
                get_u32(data, base + 16),
                get_u64(data, base + 24),
                get_u32(data, base + 40),
            ) else {
                return Ok(Some(EFAULT));
            };
            raw.push((userdata, tag, word, timeout, flags & 0xffff));
        }
    }
    let any_socket = raw
        .iter()
        .any(|&(_, tag, fd, _, _)| tag != 0 && caller.data_mut().socks().map.contains_key(&fd));
    if !any_socket {
        pass(caller, "poll_oneoff", params, results).await?;
        return Ok(None);
    }
    let mut subs = Vec::new();
    for &(_, tag, word, timeout, flags) in &raw {
        subs.push(match tag {
            0 => {
                // Relative timeouts are exact; an absolute one (flag 1) is
                // taken against the realtime clock, or as due at once for the
                // monotonic clock whose origin is wasmtime-wasi's.
                let wait = if flags & 1 == 0 {
                    Duration::from_nanos(timeout)
                } else if word == 0 {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default();
                    Duration::from_nanos(timeout).saturating_sub(now)
                } else {
                    Duration::ZERO
                };
                Sub::Clock(Box::pin(tokio::time::sleep(wait)))
            }
            1 | 2 => match entry(caller, word) {
                Some((sock, _)) => Sub::Sock {
                    sock,
                    write: tag == 2,
                },
                None => Sub::Ready,
            },
            _ => return Ok(Some(EINVAL)),
        });
    }
    if subs.is_empty() {
        return Ok(Some(EINVAL));
    }
    let ready: Vec<usize> = std::future::poll_fn(|cx| {
        let mut ready = Vec::new();
        for (i, sub) in subs.iter_mut().enumerate() {
            let now = match sub {
                Sub::Sock { sock, write: false } => sock.poll_read_ready(cx).is_ready(),
                Sub::Sock { sock, write: true } => sock.poll_write_ready(cx).is_ready(),
                Sub::Clock(sleep) => sleep.as_mut().poll(cx).is_ready(),
                Sub::Ready => true,
            };
            if now {
                ready.push(i);
            }
        }
        if ready.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(ready)
        }
    })
    .await;
    let data = mem.data_mut(&mut *caller);
    for (n, &i) in ready.iter().enumerate() {
        let (userdata, tag, _, _, _) = raw[i];
        let mut ev = [0u8; 32];
        ev[0..8].copy_from_slice(&userdata.to_le_bytes());
        ev[10] = tag;
        if tag != 0 {
            ev[16..24].copy_from_slice(&1u64.to_le_bytes());
        }
        if put(data, out_at + 32 * n as u32, &ev).is_none() {
            return Ok(Some(EFAULT));
        }
    }
    Ok(Some(
        match put(data, nevents_at, &(ready.len() as u32).to_le_bytes()) {
            Some(()) => SUCCESS,
            None => EFAULT,
        },
    ))
}
