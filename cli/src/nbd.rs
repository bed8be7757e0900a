//! An NBD server (fixed newstyle handshake, structured replies, base:allocation block status) for
//! the daemon's volumes. Written from the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md).
//!
//! Invariants: nothing a client sends is trusted: option and request lengths are bounded before any
//! allocation, unknown options get `NBD_REP_ERR_UNSUP`, bad requests get the protocol's error and the
//! connection goes on; only a broken framing (bad magic, oversized payload we cannot skip) closes it.
//! A reply to a write is sent only after the pool holds the data, so FLUSH (which commits the pool's
//! txg) covers every write acknowledged before it; FUA writes commit before their reply.
//! Volume I/O is synchronous and runs on tokio's blocking pool; the network side is async.

// The NBD protocol is big-endian on the wire (on-disk structures stay little-endian).
#![allow(clippy::big_endian_bytes)]

use crate::nbd_limits::{Charge, Limits};
use cairn_dataset::{DatasetError, Volume};
use cairn_vdev::file::AlignedBuf;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Semaphore};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CFLAG_FIXED_NEWSTYLE: u32 = 1;
const CFLAG_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;
const TF_SEND_DF: u16 = 128;
const TF_CAN_MULTI_CONN: u16 = 256;
const TF_SEND_FAST_ZERO: u16 = 2048;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const CMDF_FUA: u16 = 1;
const CMDF_NO_HOLE: u16 = 2;
const CMDF_DF: u16 = 4;
const CMDF_REQ_ONE: u16 = 8;
const CMDF_FAST_ZERO: u16 = 16;

/// How long a closing connection may take to send the replies of requests in flight while the daemon
/// stops (or the connection is told to stop).
const DRAIN_AT_STOP: std::time::Duration = std::time::Duration::from_secs(5);

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_TYPE_NONE: u16 = 0;
const REPLY_TYPE_OFFSET_DATA: u16 = 1;
const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
const REPLY_TYPE_ERROR: u16 = 0x8001;

const STATE_HOLE: u32 = 1;
const STATE_ZERO: u32 = 2;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const ESHUTDOWN: u32 = 108;

/// Largest payload of a read or write.
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Largest option payload a client may send during the handshake.
const MAX_OPTION: u32 = 64 << 10;
/// Requests served at once per connection.
const MAX_INFLIGHT: usize = 64;
const BASE_ALLOCATION: &str = "base:allocation";
/// Read data smaller than this goes out copied into the reply batch; larger is written as it is.
const INLINE_MAX: usize = 64 << 10;

const META_ID: u32 = 1;
/// `qemu:dirty-bitmap:` state flag: the extent changed.
const STATE_DIRTY: u32 = 1;
/// A block status reply describes at most this many extents...
const MAX_STATUS_EXTENTS: usize = 4096;
/// ...and looks at most this many allocated blocks (its cost is bounded on any volume size).
const MAX_STATUS_BLOCKS: usize = 4096;
/// The largest block status chunk (header, context id, extents), charged per selected context.
const MAX_STATUS_CHUNK: usize = 20 + 4 + 8 * MAX_STATUS_EXTENTS;
/// Options a refused client may send before it is closed.
const MAX_REFUSED_OPTIONS: usize = 16;

/// What the server needs from the daemon.
pub trait Exports: Send + Sync + 'static {
    /// Names of every export (POOL/VOLUME).
    fn list(&self) -> Vec<String>;
    /// Open an export for a connection.
    fn open(&self, name: &str) -> Result<Arc<Volume>, String>;
    /// A connection starts or stops serving `name` (for busy checks on export/destroy).
    fn attach(&self, name: &str, conn: u64, stop: watch::Sender<bool>);
    fn detach(&self, conn: u64);
}

fn map_err(e: &DatasetError, write: bool) -> u32 {
    match e {
        DatasetError::ReadOnly => EPERM,
        DatasetError::NoSpace => ENOSPC,
        DatasetError::OutOfRange { .. } if write => ENOSPC,
        DatasetError::OutOfRange { .. } | DatasetError::Invalid(_) => EINVAL,
        DatasetError::Pool(cairn_pool::PoolError::Unavailable(_)) => ESHUTDOWN,
        _ => EIO,
    }
}

async fn send_opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    typ: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await
}

async fn send_opt_err<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    typ: u32,
    msg: &str,
) -> std::io::Result<()> {
    send_opt_reply(w, opt, typ, msg.as_bytes()).await
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The transmission flags of an export. A read-only one offers no writing commands (TRIM,
/// WRITE_ZEROES, FUA), as nbdkit's; they would only get EPERM.
fn tflags(v: &Volume) -> u16 {
    let base = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN;
    if v.readonly() {
        base | TF_READ_ONLY
    } else {
        base | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO
    }
}

/// Parse `u32 len, name, ...rest` and return (name, rest offset).
fn parse_name(data: &[u8]) -> Option<(String, usize)> {
    let n = be32(data, 0)? as usize;
    let name = data.get(4..4 + n)?;
    Some((String::from_utf8(name.to_vec()).ok()?, 4 + n))
}

/// The export for `name`; the empty name means the only export, if there is exactly one.
fn resolve(exports: &dyn Exports, name: &str) -> Result<(String, Arc<Volume>), String> {
    let name = if name.is_empty() {
        let all = exports.list();
        match all.as_slice() {
            [one] => one.clone(),
            [] => return Err("no exports".into()),
            _ => return Err("no default export: name one of the exports".into()),
        }
    } else {
        name.trim_start_matches('/').to_string()
    };
    exports.open(&name).map(|v| (name, v))
}

struct Negotiated {
    name: String,
    vol: Arc<Volume>,
    structured: bool,
    /// Selected metadata contexts; context id = position + 1.
    meta: Arc<Vec<Meta>>,
}

/// A metadata context BLOCK_STATUS answers for.
#[derive(Clone, Debug, PartialEq)]
enum Meta {
    /// `base:allocation`: holes and data.
    Alloc,
    /// `qemu:dirty-bitmap:SNAP`: blocks changed since snapshot SNAP of the volume (qemu's
    /// incremental backup reads this name).
    Dirty(String),
}

const DIRTY_PREFIX: &str = "qemu:dirty-bitmap:";

impl Meta {
    fn name(&self) -> String {
        match self {
            Meta::Alloc => BASE_ALLOCATION.to_string(),
            Meta::Dirty(s) => format!("{DIRTY_PREFIX}{s}"),
        }
    }
}

/// The contexts of `vol` that `queries` select (all of them for LIST without queries; for
/// LIST, `base:` and `qemu:` / `qemu:dirty-bitmap:` select every context in that namespace).
fn select_meta(vol: &Volume, queries: &[String], list: bool) -> Vec<Meta> {
    let mut all = vec![Meta::Alloc];
    all.extend(vol.snapshot_names().into_iter().map(Meta::Dirty));
    if queries.is_empty() {
        return if list { all } else { Vec::new() };
    }
    let mut out: Vec<Meta> = Vec::new();
    for q in queries {
        for m in &all {
            let n = m.name();
            let hit = n == *q
                || (list
                    && (q == "base:" && *m == Meta::Alloc
                        || (q == "qemu:" || q == DIRTY_PREFIX) && matches!(m, Meta::Dirty(_))));
            if hit && !out.contains(m) {
                out.push(m.clone());
            }
        }
    }
    out
}

fn greeting() -> Vec<u8> {
    let mut hello = Vec::new();
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    hello
}

/// The handshake. `Ok(None)`: the client left or aborted.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    exports: &dyn Exports,
) -> std::io::Result<Option<Negotiated>> {
    s.write_all(&greeting()).await?;
    let cflags = s.read_u32().await?;
    if cflags & !(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES) != 0 {
        return Ok(None);
    }
    let no_zeroes = cflags & CFLAG_NO_ZEROES != 0;
    let mut structured = false;
    let mut meta: Vec<Meta> = Vec::new();
    loop {
        if s.read_u64().await? != IHAVEOPT {
            return Ok(None);
        }
        let opt = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION {
            // Skip it without allocating it, then refuse.
            tokio::io::copy(&mut (&mut *s).take(len as u64), &mut tokio::io::sink()).await?;
            send_opt_err(s, opt, REP_ERR_TOO_BIG, "option too large").await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Ok((name, vol)) = resolve(exports, &name) else {
                    // The protocol has no error reply here: close.
                    return Ok(None);
                };
                let mut b = Vec::new();
                b.extend_from_slice(&vol.size().to_be_bytes());
                b.extend_from_slice(&tflags(&vol).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                return Ok(Some(Negotiated {
                    name,
                    vol,
                    structured,
                    meta: Arc::new(meta),
                }));
            }
            OPT_ABORT => {
                let _ = send_opt_reply(s, opt, REP_ACK, &[]).await;
                return Ok(None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_opt_err(s, opt, REP_ERR_INVALID, "LIST takes no data").await?;
                    continue;
                }
                for n in exports.list() {
                    let mut d = (n.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(n.as_bytes());
                    send_opt_reply(s, opt, REP_SERVER, &d).await?;
                }
                send_opt_reply(s, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = parse_name(&data).and_then(|(name, at)| {
                    let n = be16(&data, at)? as usize;
                    if data.len() != at + 2 + 2 * n {
                        return None;
                    }
                    let reqs: Vec<u16> =
                        (0..n).filter_map(|i| be16(&data, at + 2 + 2 * i)).collect();
                    Some((name, reqs))
                });
                let Some((name, reqs)) = parsed else {
                    send_opt_err(s, opt, REP_ERR_INVALID, "malformed INFO/GO request").await?;
                    continue;
                };
                let (name, vol) = match resolve(exports, &name) {
                    Ok(x) => x,
                    Err(e) => {
                        send_opt_err(s, opt, REP_ERR_UNKNOWN, &format!("export '{name}': {e}"))
                            .await?;
                        continue;
                    }
                };
                let mut d = INFO_EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&vol.size().to_be_bytes());
                d.extend_from_slice(&tflags(&vol).to_be_bytes());
                send_opt_reply(s, opt, REP_INFO, &d).await?;
                if reqs.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    send_opt_reply(s, opt, REP_INFO, &d).await?;
                }
                let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                d.extend_from_slice(&1u32.to_be_bytes());
                d.extend_from_slice(&(vol.block_size() as u32).to_be_bytes());
                d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                send_opt_reply(s, opt, REP_INFO, &d).await?;
                send_opt_reply(s, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(Some(Negotiated {
                        name,
                        vol,
                        structured,
                        meta: Arc::new(meta),
                    }));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    send_opt_err(s, opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data").await?;
                    continue;
                }
                structured = true;
                send_opt_reply(s, opt, REP_ACK, &[]).await?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let parsed = parse_name(&data).and_then(|(name, mut at)| {
                    let n = be32(&data, at)?;
                    at += 4;
                    let mut qs = Vec::new();
                    for _ in 0..n {
                        let l = be32(&data, at)? as usize;
                        let q = data.get(at + 4..at + 4 + l)?;
                        qs.push(String::from_utf8(q.to_vec()).ok()?);
                        at += 4 + l;
                    }
                    (at == data.len()).then_some((name, qs))
                });
                let Some((name, queries)) = parsed else {
                    send_opt_err(s, opt, REP_ERR_INVALID, "malformed meta context request").await?;
                    continue;
                };
                if opt == OPT_SET_META_CONTEXT && !structured {
                    send_opt_err(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        "negotiate structured replies first",
                    )
                    .await?;
                    continue;
                }
                let vol = match resolve(exports, &name) {
                    Ok((_, v)) => v,
                    Err(e) => {
                        send_opt_err(s, opt, REP_ERR_UNKNOWN, &format!("export '{name}': {e}"))
                            .await?;
                        continue;
                    }
                };
                let list = opt == OPT_LIST_META_CONTEXT;
                let v2 = vol.clone();
                let q2 = queries.clone();
                let selected = tokio::task::spawn_blocking(move || select_meta(&v2, &q2, list))
                    .await
                    .unwrap_or_default();
                for (i, m) in selected.iter().enumerate() {
                    // LIST answers with id 0 (ids mean nothing there); SET with the real ids.
                    let id = if list { 0 } else { i as u32 + META_ID };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(m.name().as_bytes());
                    send_opt_reply(s, opt, REP_META_CONTEXT, &d).await?;
                }
                if !list {
                    meta = selected;
                }
                send_opt_reply(s, opt, REP_ACK, &[]).await?;
            }
            _ => {
                send_opt_err(s, opt, REP_ERR_UNSUP, "option not supported").await?;
            }
        }
    }
}

fn simple_reply(cookie: u64, error: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// A structured reply chunk's header, for a payload of `len` bytes.
fn chunk_head(cookie: u64, flags: u16, typ: u16, len: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    b.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    b.extend_from_slice(&typ.to_be_bytes());
    b.extend_from_slice(&cookie.to_be_bytes());
    b.extend_from_slice(&(len as u32).to_be_bytes());
    b
}

fn chunk(cookie: u64, flags: u16, typ: u16, payload: &[u8]) -> Vec<u8> {
    let mut b = chunk_head(cookie, flags, typ, payload.len());
    b.extend_from_slice(payload);
    b
}

/// What a request produced.
enum Out {
    /// Nothing but success.
    Done,
    /// Read data.
    Read(AlignedBuf),
    /// Block status payloads, one per metadata context.
    Status(Vec<Vec<u8>>),
}

/// A reply on its way out: header bytes (with any small payload), then read data sent as it is.
struct Reply {
    head: Vec<u8>,
    body: Option<AlignedBuf>,
    /// The request's bytes charged to the connection's budget, released once the reply is written.
    charge: Charge,
}

impl Reply {
    fn charged(mut self, charge: Charge) -> Reply {
        self.charge = charge;
        self
    }
}

/// The reply to a request: success (with read data or block status) or an error.
fn reply(structured: bool, cookie: u64, result: Result<Out, (u32, String)>, offset: u64) -> Reply {
    let head = |head| Reply {
        head,
        body: None,
        charge: Charge::default(),
    };
    match (structured, result) {
        (false, Ok(Out::Read(data))) => Reply {
            head: simple_reply(cookie, 0, &[]),
            body: Some(data),
            charge: Charge::default(),
        },
        (false, Ok(_)) => head(simple_reply(cookie, 0, &[])),
        (false, Err((e, _))) => head(simple_reply(cookie, e, &[])),
        (true, Ok(Out::Read(data))) => {
            let mut h = chunk_head(
                cookie,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                8 + data.len(),
            );
            h.extend_from_slice(&offset.to_be_bytes());
            Reply {
                head: h,
                body: Some(data),
                charge: Charge::default(),
            }
        }
        (true, Ok(Out::Status(ps))) => {
            let mut h = Vec::new();
            for (i, p) in ps.iter().enumerate() {
                let flags = if i + 1 == ps.len() {
                    REPLY_FLAG_DONE
                } else {
                    0
                };
                h.extend(chunk(cookie, flags, REPLY_TYPE_BLOCK_STATUS, p));
            }
            head(h)
        }
        (true, Ok(Out::Done)) => head(chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, &[])),
        (true, Err((e, msg))) => {
            let msg = &msg.as_bytes()[..msg.len().min(4096)];
            let mut p = e.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg);
            head(chunk(cookie, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, &p))
        }
    }
}

struct Req {
    flags: u16,
    typ: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

/// Check a request against the export; `Err` is the NBD error to reply with.
fn validate(r: &Req, size: u64, readonly: bool, meta: bool) -> Result<(), (u32, String)> {
    let bad = |m: &str| Err((EINVAL, m.to_string()));
    let allowed = match r.typ {
        CMD_READ => CMDF_DF | CMDF_FUA,
        CMD_WRITE => CMDF_FUA,
        CMD_FLUSH => 0,
        CMD_TRIM => CMDF_FUA,
        CMD_WRITE_ZEROES => CMDF_FUA | CMDF_NO_HOLE | CMDF_FAST_ZERO,
        CMD_BLOCK_STATUS => CMDF_REQ_ONE,
        _ => return bad("unknown command"),
    };
    if r.flags & !allowed != 0 {
        return bad("flag not valid for this command");
    }
    if r.typ == CMD_FLUSH {
        return Ok(());
    }
    if r.typ == CMD_BLOCK_STATUS && !meta {
        return bad("no metadata context negotiated");
    }
    if r.len == 0 {
        return bad("zero length");
    }
    if matches!(r.typ, CMD_READ | CMD_WRITE) && r.len > MAX_PAYLOAD {
        return Err((
            EINVAL,
            format!(
                "request of {} bytes is over the {} limit",
                r.len, MAX_PAYLOAD
            ),
        ));
    }
    let end = r.offset.checked_add(r.len as u64);
    if end.is_none_or(|e| e > size) {
        let e = if matches!(r.typ, CMD_WRITE | CMD_WRITE_ZEROES) {
            ENOSPC
        } else {
            EINVAL
        };
        return Err((e, "request beyond the end of the export".into()));
    }
    if readonly && matches!(r.typ, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
        return Err((EPERM, "export is read-only".into()));
    }
    Ok(())
}

/// Execute one request on the volume (blocking).
fn execute(vol: &Volume, r: &Req, data: &[u8], meta: &[Meta]) -> Result<Out, (u32, String)> {
    let fua = r.flags & CMDF_FUA != 0;
    let w = |e: DatasetError| (map_err(&e, true), e.to_string());
    let rd = |e: DatasetError| (map_err(&e, false), e.to_string());
    match r.typ {
        CMD_READ => {
            let mut buf = AlignedBuf::take(r.len as usize);
            match vol.read(r.offset, buf.as_mut_slice()) {
                Ok(()) => Ok(Out::Read(buf)),
                Err(e) => {
                    buf.give();
                    Err(rd(e))
                }
            }
        }
        CMD_WRITE => {
            vol.write(r.offset, data).map_err(w)?;
            if fua {
                vol.flush().map_err(w)?;
            }
            Ok(Out::Done)
        }
        CMD_FLUSH => {
            vol.flush().map_err(w)?;
            Ok(Out::Done)
        }
        CMD_TRIM | CMD_WRITE_ZEROES => {
            if r.typ == CMD_TRIM {
                vol.trim(r.offset, r.len as u64).map_err(w)?;
            } else {
                vol.write_zeroes(r.offset, r.len as u64).map_err(w)?;
            }
            if fua {
                vol.flush().map_err(w)?;
            }
            Ok(Out::Done)
        }
        CMD_BLOCK_STATUS => {
            // One chunk per selected context. A prefix of the range is a valid answer: the client
            // asks again from where it ends.
            let mut chunks = Vec::new();
            for (i, m) in meta.iter().enumerate() {
                let (ext, flag_of): (_, fn(bool) -> u32) = match m {
                    Meta::Alloc => (
                        vol.map(r.offset, r.len as u64, MAX_STATUS_BLOCKS)
                            .map_err(rd)?,
                        |a| if a { 0 } else { STATE_HOLE | STATE_ZERO },
                    ),
                    Meta::Dirty(snap) => (
                        vol.dirty_map(snap, r.offset, r.len as u64, MAX_STATUS_BLOCKS)
                            .map_err(rd)?,
                        |a| if a { STATE_DIRTY } else { 0 },
                    ),
                };
                let mut p = (i as u32 + META_ID).to_be_bytes().to_vec();
                for e in ext.iter().take(if r.flags & CMDF_REQ_ONE != 0 {
                    1
                } else {
                    MAX_STATUS_EXTENTS
                }) {
                    p.extend_from_slice(&(e.length as u32).to_be_bytes());
                    p.extend_from_slice(&flag_of(e.allocated).to_be_bytes());
                }
                chunks.push(p);
            }
            Ok(Out::Status(chunks))
        }
        _ => Err((EINVAL, "unknown command".into())),
    }
}

/// Bytes of payload a request will hold until its reply is written: the data of a READ or WRITE, the
/// largest block status answer for the selected contexts.
fn cost(r: &Req, contexts: usize) -> usize {
    match r.typ {
        CMD_READ | CMD_WRITE => r.len as usize,
        CMD_BLOCK_STATUS => contexts.saturating_mul(MAX_STATUS_CHUNK),
        _ => 0,
    }
}

/// Tell a client over the connection limit so: the greeting, then `NBD_REP_ERR_POLICY` with the reason
/// to each option (an `EXPORT_NAME` has no error reply: it is closed), within the handshake deadline.
pub async fn refuse_conn<S>(mut s: S, limits: Arc<Limits>, mut shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let why = format!(
        "too many connections: the server serves at most {} (serve --max-connections)",
        limits.max_connections
    );
    let talk = async {
        s.write_all(&greeting()).await?;
        s.read_u32().await?;
        for _ in 0..MAX_REFUSED_OPTIONS {
            if s.read_u64().await? != IHAVEOPT {
                break;
            }
            let opt = s.read_u32().await?;
            let len = s.read_u32().await?;
            if len > MAX_OPTION {
                break;
            }
            tokio::io::copy(&mut (&mut s).take(len as u64), &mut tokio::io::sink()).await?;
            match opt {
                OPT_EXPORT_NAME => break,
                OPT_ABORT => {
                    send_opt_reply(&mut s, opt, REP_ACK, &[]).await?;
                    break;
                }
                _ => send_opt_err(&mut s, opt, REP_ERR_POLICY, &why).await?,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    tokio::select! {
        _ = tokio::time::timeout(limits.handshake_timeout, talk) => {}
        _ = shutdown.changed() => {}
    }
    let _ = s.shutdown().await;
}

/// Writes `b`, failing with `TimedOut` when the socket takes no byte for `stall`: a client that does
/// not read its replies is closed then, which frees what its requests hold.
async fn write_all_progress<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut b: &[u8],
    stall: std::time::Duration,
) -> std::io::Result<()> {
    while !b.is_empty() {
        match tokio::time::timeout(stall, w.write(b)).await {
            Ok(Ok(0)) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(Ok(n)) => b = &b[n..],
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
    Ok(())
}

/// Sends the replies of one connection. Replies that are ready together go out in one write; large
/// read data is written from its own buffer (no copy), which then goes back for reuse. A reply's
/// charge is released when it is dropped, after its bytes were written (or copied into the batch,
/// which is bounded).
async fn reply_writer<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Reply>,
    limits: Arc<Limits>,
) {
    let stall = limits.reply_timeout;
    let mut batch: Vec<u8> = Vec::new();
    let mut res = Ok(());
    'out: while let Some(mut r) = rx.recv().await {
        loop {
            batch.extend_from_slice(&r.head);
            if let Some(body) = r.body.take() {
                if body.len() < INLINE_MAX {
                    batch.extend_from_slice(body.as_slice());
                    body.give();
                } else {
                    res = write_all_progress(&mut wr, &batch, stall).await;
                    if res.is_ok() {
                        res = write_all_progress(&mut wr, body.as_slice(), stall).await;
                    }
                    batch.clear();
                    body.give();
                    if res.is_err() {
                        break 'out;
                    }
                }
            }
            if batch.len() >= 1 << 20 {
                break;
            }
            match rx.try_recv() {
                Ok(more) => r = more,
                Err(_) => break,
            }
        }
        if !batch.is_empty() {
            res = write_all_progress(&mut wr, &batch, stall).await;
            if res.is_err() {
                break;
            }
        }
        batch.clear();
    }
    if res.is_err_and(|e| e.kind() == std::io::ErrorKind::TimedOut) {
        if let Some(n) = limits.stall_log.hit() {
            tracing::warn!(
                "nbd: closed {n} connection(s) that took no reply bytes for {stall:?} \
                 (serve --reply-timeout)"
            );
        }
    }
    // The reader sees the channel closed and stops reading requests.
    drop(rx);
    let _ = wr.shutdown().await;
}

/// Serve one client connection until it disconnects or `stop` fires.
pub async fn serve_conn<S>(
    mut s: S,
    exports: Arc<dyn Exports>,
    conn: u64,
    mut shutdown: watch::Receiver<bool>,
    limits: Arc<Limits>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let neg = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, handshake(&mut s, exports.as_ref())) => r,
        _ = shutdown.changed() => return,
    };
    let neg = match neg {
        Ok(Ok(Some(neg))) => neg,
        Ok(_) => return,
        Err(_) => {
            if let Some(n) = limits.handshake_log.hit() {
                tracing::warn!(
                    "nbd: closed {n} connection(s) that did not finish the handshake within {:?}",
                    limits.handshake_timeout
                );
            }
            return;
        }
    };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    exports.attach(&neg.name, conn, stop_tx);
    let (rd, wr) = tokio::io::split(s);
    // Buffered: a request header is 28 bytes; one read brings in many of them.
    let mut rd = tokio::io::BufReader::with_capacity(256 << 10, rd);
    let (tx, rx) = mpsc::channel::<Reply>(MAX_INFLIGHT * 2);
    let writer = tokio::spawn(reply_writer(wr, rx, limits.clone()));
    let sem = Arc::new(Semaphore::new(MAX_INFLIGHT));
    let budget = limits.budget();
    let mut moved_payload = false;
    loop {
        let mut hdr = [0u8; 28];
        let got = tokio::select! {
            r = rd.read_exact(&mut hdr) => r.is_ok(),
            _ = shutdown.changed() => false,
            _ = stop_rx.changed() => false,
            _ = tx.closed() => false,
        };
        if !got {
            break;
        }
        let magic = u32::from_be_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        if magic != REQUEST_MAGIC {
            tracing::warn!("nbd connection {conn}: bad request magic {magic:#x}; closing");
            break;
        }
        let r = Req {
            flags: u16::from_be_bytes([hdr[4], hdr[5]]),
            typ: u16::from_be_bytes([hdr[6], hdr[7]]),
            cookie: u64::from_be_bytes(hdr[8..16].try_into().unwrap_or([0; 8])),
            offset: u64::from_be_bytes(hdr[16..24].try_into().unwrap_or([0; 8])),
            len: u32::from_be_bytes([hdr[24], hdr[25], hdr[26], hdr[27]]),
        };
        if r.typ == CMD_DISC {
            break;
        }
        let mut payload = AlignedBuf::default();
        let mut charge = Charge::default();
        if r.typ == CMD_WRITE {
            if r.len > MAX_PAYLOAD {
                // Cannot stay in sync without reading it; refuse and close.
                let _ = tx
                    .send(reply(
                        neg.structured,
                        r.cookie,
                        Err((EINVAL, "write too large".into())),
                        r.offset,
                    ))
                    .await;
                break;
            }
            // The payload is read only once the budget has room for it: a client that does not read
            // its replies is not read from either.
            charge = tokio::select! {
                c = budget.charge(r.len as usize) => c,
                _ = shutdown.changed() => break,
                _ = stop_rx.changed() => break,
                _ = tx.closed() => break,
            };
            moved_payload = true;
            payload = AlignedBuf::take(r.len as usize);
            // A client that sent part of a payload and stalls must not hold up a shutdown.
            let got = tokio::select! {
                r = rd.read_exact(payload.as_mut_slice()) => r.is_ok(),
                _ = shutdown.changed() => false,
                _ = stop_rx.changed() => false,
                _ = tx.closed() => false,
            };
            if !got {
                payload.give();
                break;
            }
        }
        // Size and read-only are read per request: `dataset set` changes them for connected clients
        // (the volume checks them again, under its lock, when it does the I/O).
        if let Err(e) = validate(&r, neg.vol.size(), neg.vol.readonly(), !neg.meta.is_empty()) {
            payload.give();
            let _ = tx
                .send(reply(neg.structured, r.cookie, Err(e), r.offset).charged(charge))
                .await;
            continue;
        }
        if r.typ != CMD_WRITE {
            // A READ's buffer is made only once its bytes are charged.
            charge = tokio::select! {
                c = budget.charge(cost(&r, neg.meta.len())) => c,
                _ = shutdown.changed() => break,
                _ = stop_rx.changed() => break,
                _ = tx.closed() => break,
            };
            moved_payload |= r.typ == CMD_READ;
        }
        let Ok(permit) = sem.clone().acquire_owned().await else {
            break;
        };
        let vol = neg.vol.clone();
        let tx = tx.clone();
        let structured = neg.structured;
        let meta = neg.meta.clone();
        tokio::spawn(async move {
            let (cookie, offset) = (r.cookie, r.offset);
            let res = tokio::task::spawn_blocking(move || {
                let res = execute(&vol, &r, payload.as_slice(), &meta);
                payload.give();
                res
            })
            .await
            .unwrap_or_else(|_| Err((EIO, "internal error".into())));
            let _ = tx
                .send(reply(structured, cookie, res, offset).charged(charge))
                .await;
            drop(permit);
        });
    }
    // Let requests in flight finish and their replies go out; when the daemon is stopping, a client
    // that does not read its replies gets a few seconds, not forever.
    let drain = async {
        let _ = sem.acquire_many(MAX_INFLIGHT as u32).await;
        drop(tx);
        let _ = writer.await;
    };
    tokio::pin!(drain);
    let stopping = *shutdown.borrow() || *stop_rx.borrow();
    if stopping {
        let _ = tokio::time::timeout(DRAIN_AT_STOP, drain).await;
    } else {
        tokio::select! {
            _ = &mut drain => {},
            _ = shutdown.changed() => {
                let _ = tokio::time::timeout(DRAIN_AT_STOP, drain).await;
            }
        }
    }
    exports.detach(conn);
    if moved_payload {
        // Buffers freed by this connection go back to the system.
        let _ = tokio::task::spawn_blocking(crate::nbd_limits::trim_allocator).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation() {
        let r = |typ, flags, offset, len| Req {
            flags,
            typ,
            cookie: 1,
            offset,
            len,
        };
        assert!(validate(&r(CMD_READ, 0, 0, 4096), 8192, false, false).is_ok());
        assert_eq!(
            validate(&r(CMD_READ, 0, 4096, 8192), 8192, false, false)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert_eq!(
            validate(&r(CMD_WRITE, 0, u64::MAX, 1), 8192, false, false)
                .unwrap_err()
                .0,
            ENOSPC
        );
        assert_eq!(
            validate(&r(CMD_WRITE, 0, 0, 1), 8192, true, false)
                .unwrap_err()
                .0,
            EPERM
        );
        assert_eq!(
            validate(&r(99, 0, 0, 1), 8192, false, false).unwrap_err().0,
            EINVAL
        );
        assert_eq!(
            validate(&r(CMD_WRITE, CMDF_DF, 0, 1), 8192, false, false)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert_eq!(
            validate(&r(CMD_BLOCK_STATUS, 0, 0, 1), 8192, false, false)
                .unwrap_err()
                .0,
            EINVAL
        );
        assert!(validate(&r(CMD_BLOCK_STATUS, 0, 0, 1), 8192, false, true).is_ok());
        assert!(validate(&r(CMD_FLUSH, 0, 0, 0), 8192, false, false).is_ok());
        assert_eq!(
            validate(&r(CMD_READ, 0, 0, MAX_PAYLOAD + 1), u64::MAX, false, false)
                .unwrap_err()
                .0,
            EINVAL
        );
    }

    #[test]
    fn reply_shapes() {
        let data = || {
            let mut b = AlignedBuf::zeroed(2);
            b.as_mut_slice().copy_from_slice(&[1, 2]);
            Ok(Out::Read(b))
        };
        let s = reply(false, 7, data(), 0);
        assert_eq!(&s.head[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(s.head.len(), 16);
        assert_eq!(s.body.unwrap().as_slice(), &[1, 2]);
        let c = reply(true, 7, data(), 4096);
        let h = &c.head;
        assert_eq!(&h[0..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_OFFSET_DATA);
        assert_eq!(u32::from_be_bytes([h[16], h[17], h[18], h[19]]), 10);
        assert_eq!(u64::from_be_bytes(h[20..28].try_into().unwrap()), 4096);
        assert_eq!(c.body.unwrap().as_slice(), &[1, 2]);
        let e = reply(true, 7, Err((EIO, "x".into())), 0).head;
        assert_eq!(u16::from_be_bytes([e[6], e[7]]), REPLY_TYPE_ERROR);
        assert_eq!(u32::from_be_bytes([e[20], e[21], e[22], e[23]]), EIO);
    }
}
