//! A file system that can lose what was not synced: a power cut for tests.
//!
//! [`LosingFs::mount`] mounts (FUSE, in this process) a pass-through view
//! of a backing directory. Every write goes through to the backing file at
//! once, but the bytes it overwrote, and the file's length at its last
//! `fsync`/`fdatasync`, are kept in memory until the file is synced.
//! [`Mounted::cut`] then puts every file back as it was at its last sync:
//! what the page cache held and the disk did not is gone, as after a power
//! cut. (A process killed with SIGKILL loses nothing of what it wrote,
//! since the kernel still holds it, so SIGKILL alone cannot tell a missing
//! fsync from a present one.)
//!
//! Names are held to POSIX as strictly: a create, unlink, mkdir, rmdir or
//! rename is durable only once its directory is fsynced (ext4 is kinder:
//! an fsync of a new file commits its name too). Until then the cut takes
//! it back, newest first: a created name goes, a removed or replaced file
//! comes back (kept meanwhile as a hard link in a stash beside the backing
//! directory), a renamed one returns to its old name. A rename counts as
//! its destination directory's. Unsynced writes are lost whole, or
//! ([`Mounted::cut_with`], [`Tear::Random`]) all but a random prefix of
//! each file's tail, to the byte: a torn last record. What is not
//! modelled: a disk that reorders writes (a later one kept, an earlier
//! lost), hard links, special files, extended attributes.
//!
//! Files named in `spare` (the test's own logs, not the system's data)
//! keep what was written to them.
//!
//! Mounting needs root (or CAP_SYS_ADMIN) and `/dev/fuse`; the test
//! machines have both (the disk-full tests mount a tmpfs the same way).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};

/// What the kernel may cache of names and attributes: nothing, so that
/// every size it sees is the backing file's.
const TTL: Duration = Duration::ZERO;

const ENOENT: i32 = 2;
const EIO: i32 = 5;
const EBADF: i32 = 9;
const EINVAL: i32 = 22;
const ENOSYS: i32 = 38;
const EOPNOTSUPP: i32 = 95;

/// A file's writes since its last sync.
struct Unsynced {
    /// Its length at the last sync.
    synced_len: u64,
    /// What each write (or truncation) overwrote: offset and old bytes,
    /// in order.
    overwritten: Vec<(u64, Vec<u8>)>,
}

/// What the file system and [`Mounted::cut`] share.
#[derive(Default)]
struct State {
    /// Inode → backing path (the root is inode 1). Inodes are the backing
    /// files' own, so a rename keeps them; an unlinked or replaced file's
    /// path is its link in the stash (the same inode), so that its handles
    /// still work and a cut still undoes its unsynced writes.
    paths: HashMap<u64, PathBuf>,
    /// Open files: handle → (inode, backing file).
    open: HashMap<u64, (u64, File)>,
    next_fh: u64,
    /// Files written since their last sync, by inode.
    unsynced: HashMap<u64, Unsynced>,
    /// Whether a cut happened: every request after it fails (the machine
    /// is off).
    off: bool,
    /// Changes to names not yet made durable by an fsync of their
    /// directory, in order, each with that directory's path.
    names: Vec<(PathBuf, NameOp)>,
    /// Where files a pending unlink or rename took away are kept (hard
    /// links), so that a cut can bring them back.
    stash: PathBuf,
    next_stash: u64,
}

/// A change to a directory's entries.
enum NameOp {
    /// `path` was made (a file or a directory).
    Created(PathBuf),
    /// `path` was removed: a file, kept at `stash`, or an empty directory.
    Removed {
        path: PathBuf,
        stash: Option<PathBuf>,
    },
    /// `from` was renamed to `to`, whose file before is kept at `stash`.
    Renamed {
        from: PathBuf,
        to: PathBuf,
        stash: Option<PathBuf>,
    },
}

impl State {
    /// Keeps a hard link to the file at `path` in the stash.
    fn stash(&mut self, path: &Path) -> io::Result<PathBuf> {
        self.next_stash += 1;
        let kept = self.stash.join(self.next_stash.to_string());
        fs::hard_link(path, &kept)?;
        Ok(kept)
    }

    /// Records a change to the names in `path`'s directory.
    fn name_op(&mut self, path: &Path, op: NameOp) {
        let dir = path.parent().unwrap_or(path).to_path_buf();
        self.names.push((dir, op));
    }

    /// The open file `fh`.
    fn handle(&self, fh: Option<u64>) -> Option<&File> {
        fh.and_then(|fh| self.open.get(&fh)).map(|(_, f)| f)
    }
}

/// What [`Mounted::cut`] put back.
#[derive(Debug, Default)]
pub struct Lost {
    /// Files with writes since their last sync.
    pub files: Vec<FileCut>,
    /// Bytes past the synced length, and bytes overwritten, undone.
    pub bytes: u64,
    /// Bytes past the synced length kept ([`Tear::Random`]).
    pub kept: u64,
    /// Changes to names undone (no fsync of their directory).
    pub names: usize,
}

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "undid {} bytes and kept {} past the last sync, in {:?}, and undid {} changes to names",
            self.bytes, self.kept, self.files, self.names
        )
    }
}

/// Puts a name back as it was before `op`.
fn undo(op: &NameOp) -> io::Result<()> {
    match op {
        NameOp::Created(path) => match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(path),
            Ok(_) => fs::remove_file(path),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        },
        NameOp::Removed { path, stash } => match stash {
            Some(kept) => fs::hard_link(kept, path),
            None => fs::create_dir(path),
        },
        NameOp::Renamed { from, to, stash } => {
            fs::rename(to, from)?;
            match stash {
                Some(kept) => fs::hard_link(kept, to),
                None => Ok(()),
            }
        }
    }
}

impl std::fmt::Debug for NameOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NameOp::Created(p) => write!(f, "create {}", p.display()),
            NameOp::Removed { path, .. } => write!(f, "remove {}", path.display()),
            NameOp::Renamed { from, to, .. } => {
                write!(f, "rename {} to {}", from.display(), to.display())
            }
        }
    }
}

/// What a cut did to one file.
#[derive(Debug)]
pub struct FileCut {
    /// Its backing path.
    pub path: PathBuf,
    /// Bytes it had past its synced length.
    pub tail: u64,
    /// How many of them are kept.
    pub kept: u64,
}

impl FileCut {
    /// Part of its tail is kept, and part is not: its last write is torn
    /// or some of its writes are gone.
    pub fn torn(&self) -> bool {
        0 < self.kept && self.kept < self.tail
    }
}

/// What a cut leaves of the bytes written past a file's synced length.
#[derive(Clone, Copy, Debug)]
pub enum Tear {
    /// Nothing.
    Whole,
    /// A random prefix, from none of them to all, byte-exact: the disk
    /// wrote part of what the page cache held before the power went, and
    /// the last record written may be torn. (Overwrites of synced bytes
    /// are always undone.) The seed makes the choice repeatable.
    Random(u64),
}

/// Power-cut tests at most one at a time: each runs its FUSE file system
/// on one thread, under RocksDB or SQLite, on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Holds [`ONE_AT_A_TIME`] (a test that panicked while holding it does
/// not stop the others).
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    lock(&ONE_AT_A_TIME)
}

/// The file system (on the FUSE session's thread).
struct LosingFs {
    root: PathBuf,
    state: Arc<Mutex<State>>,
    /// File names whose writes are kept.
    spare: Vec<String>,
}

/// A mounted [`LosingFs`]; unmounted on drop (without a cut).
pub struct Mounted {
    state: Arc<Mutex<State>>,
    _stash: tempfile::TempDir,
    session: Option<fuser::BackgroundSession>,
    /// The mount point.
    pub path: PathBuf,
}

/// Mounts a view of `backing` at `at` (both existing directories); the
/// writes to files named in `spare` survive a cut.
pub fn mount(backing: &Path, at: &Path, spare: &[&str]) -> io::Result<Mounted> {
    let root = backing.canonicalize()?;
    let at = at.canonicalize()?;
    // Beside the backing directory (hard links need its file system),
    // outside the view.
    let stash = tempfile::tempdir_in(root.parent().unwrap_or(&root))?;
    let state = Arc::new(Mutex::new(State {
        stash: stash.path().to_path_buf(),
        ..State::default()
    }));
    lock(&state).paths.insert(fuser::FUSE_ROOT_ID, root.clone());
    let fs = LosingFs {
        root,
        state: state.clone(),
        spare: spare.iter().map(|s| s.to_string()).collect(),
    };
    let options = [
        MountOption::FSName("tern-losingfs".into()),
        MountOption::RW,
        MountOption::NoDev,
        MountOption::NoSuid,
    ];
    let session = fuser::spawn_mount2(fs, &at, &options)?;
    Ok(Mounted {
        state,
        session: Some(session),
        path: at,
        _stash: stash,
    })
}

fn lock<T>(state: &Mutex<T>) -> MutexGuard<'_, T> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Mounted {
    /// The power cut: every request from now on fails, every file is put
    /// back as it was at its last sync, and the file system is unmounted.
    /// Stop the processes using it first (a SIGKILL): a write after the cut
    /// would fail anyway, but one racing it could land.
    pub fn cut(self) -> Lost {
        self.cut_with(Tear::Whole)
    }

    /// [`Mounted::cut`], with `tear` deciding what is left of each file's
    /// bytes past its synced length.
    pub fn cut_with(mut self, tear: Tear) -> Lost {
        let mut rng = match tear {
            Tear::Whole => None,
            Tear::Random(seed) => Some(StdRng::seed_from_u64(seed)),
        };
        let lost = {
            let mut st = lock(&self.state);
            st.off = true;
            st.open.clear();
            let mut lost = Lost::default();
            let mut unsynced: Vec<(u64, Unsynced)> = st.unsynced.drain().collect();
            unsynced.sort_by_key(|(ino, _)| *ino);
            for (ino, u) in unsynced {
                let Some(path) = st.paths.get(&ino) else {
                    continue; // a file the file system never named
                };
                let f = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .unwrap_or_else(|e| panic!("cut: open {}: {e}", path.display()));
                for (offset, old) in u.overwritten.iter().rev() {
                    lost.bytes += old.len() as u64;
                    f.write_all_at(old, *offset).expect("cut: restore");
                }
                let tail = f
                    .metadata()
                    .map(|m| m.len())
                    .unwrap_or(0)
                    .saturating_sub(u.synced_len);
                let keep = rng.as_mut().map_or(0, |r| r.random_range(0..=tail));
                f.set_len(u.synced_len + keep).expect("cut: truncate");
                lost.bytes += tail - keep;
                lost.kept += keep;
                lost.files.push(FileCut {
                    path: path.clone(),
                    tail,
                    kept: keep,
                });
            }
            // Then the names no directory fsync made durable, newest first.
            let names = std::mem::take(&mut st.names);
            lost.names = names.len();
            for (_, op) in names.into_iter().rev() {
                undo(&op).unwrap_or_else(|e| panic!("cut: undo {op:?}: {e}"));
            }
            lost
        };
        self.unmount();
        lost
    }

    /// Bytes written since their file's last sync (past its synced length,
    /// or over synced bytes), in the files whose backing path `pick` takes.
    pub fn unsynced_bytes(&self, pick: impl Fn(&Path) -> bool) -> u64 {
        let st = lock(&self.state);
        st.unsynced
            .iter()
            .filter_map(|(ino, u)| Some((st.paths.get(ino)?, u)))
            .filter(|(path, _)| pick(path))
            .map(|(path, u)| {
                let len = path.metadata().map(|m| m.len()).unwrap_or(0);
                len.saturating_sub(u.synced_len)
                    + u.overwritten
                        .iter()
                        .map(|(_, b)| b.len() as u64)
                        .sum::<u64>()
            })
            .sum()
    }

    /// Detaches the mount (lazily: a process still holding a file there
    /// must not keep this waiting), then lets the session's thread end
    /// (fuser's own unmount then finds nothing mounted there).
    fn unmount(&mut self) {
        if let Some(session) = self.session.take() {
            let detached = rustix::mount::unmount(&self.path, rustix::mount::UnmountFlags::DETACH);
            drop(session);
            if let Err(e) = detached {
                if !std::thread::panicking() {
                    panic!("unmount {}: {e}", self.path.display());
                }
            }
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.unmount();
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(EIO)
}

fn attr(m: &fs::Metadata) -> FileAttr {
    let time = |s: i64, ns: i64| {
        if s >= 0 {
            UNIX_EPOCH + Duration::new(s as u64, ns as u32)
        } else {
            UNIX_EPOCH
        }
    };
    let kind = if m.is_dir() {
        FileType::Directory
    } else if m.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::RegularFile
    };
    FileAttr {
        ino: m.ino(),
        size: m.size(),
        blocks: m.blocks(),
        atime: time(m.atime(), m.atime_nsec()),
        mtime: time(m.mtime(), m.mtime_nsec()),
        ctime: time(m.ctime(), m.ctime_nsec()),
        crtime: time(m.ctime(), m.ctime_nsec()),
        kind,
        perm: (m.mode() & 0o7777) as u16,
        nlink: m.nlink() as u32,
        uid: m.uid(),
        gid: m.gid(),
        rdev: m.rdev() as u32,
        blksize: m.blksize() as u32,
        flags: 0,
    }
}

impl LosingFs {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// The backing path of `name` in directory `parent`.
    fn child(st: &State, parent: u64, name: &OsStr) -> Option<PathBuf> {
        st.paths.get(&parent).map(|p| p.join(name))
    }

    /// Looks `path` up and remembers its inode; the root's is 1.
    fn entry(&self, st: &mut State, path: PathBuf) -> io::Result<FileAttr> {
        let m = fs::symlink_metadata(&path)?;
        let mut a = attr(&m);
        if path == self.root {
            a.ino = fuser::FUSE_ROOT_ID;
        } else {
            st.paths.insert(a.ino, path);
        }
        Ok(a)
    }

    /// Whether writes to `path` survive a cut.
    fn spared(&self, path: &Path) -> bool {
        path.file_name()
            .is_some_and(|n| self.spare.iter().any(|s| n == s.as_str()))
    }

    /// Records what a write of `len` bytes at `offset` to `f` (inode `ino`)
    /// will overwrite: nothing for a spared file.
    fn before_write(
        &self,
        st: &mut State,
        ino: u64,
        f: &File,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let Some(path) = st.paths.get(&ino) else {
            return Ok(());
        };
        if self.spared(path) {
            return Ok(());
        }
        let size = f.metadata()?.len();
        let u = st.unsynced.entry(ino).or_insert(Unsynced {
            synced_len: size,
            overwritten: Vec::new(),
        });
        let end = size.min(offset.saturating_add(len));
        if offset < end {
            let mut old = vec![0; (end - offset) as usize];
            f.read_exact_at(&mut old, offset)?;
            u.overwritten.push((offset, old));
        }
        Ok(())
    }
}

impl Filesystem for LosingFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some(path) = Self::child(&st, parent, name) else {
            return reply.error(ENOENT);
        };
        match self.entry(&mut st, path) {
            Ok(a) => reply.entry(&TTL, &a, 0),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, fh: Option<u64>, reply: ReplyAttr) {
        let st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let m = match (st.handle(fh), st.paths.get(&ino)) {
            (Some(f), _) => f.metadata(),
            (None, Some(p)) => fs::symlink_metadata(p),
            (None, None) => return reply.error(ENOENT),
        };
        match m {
            Ok(m) => {
                let mut a = attr(&m);
                a.ino = ino;
                reply.attr(&TTL, &a)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let path = st.paths.get(&ino).cloned();
        let open = st.handle(fh).map(File::try_clone).transpose();
        let result = (|| -> io::Result<File> {
            let f = match (open?, &path) {
                (Some(f), _) => f,
                (None, Some(p)) => OpenOptions::new().read(true).write(true).open(p)?,
                (None, None) => return Err(io::Error::from_raw_os_error(ENOENT)),
            };
            if let Some(size) = size {
                let len = f.metadata()?.len();
                self.before_write(&mut st, ino, &f, size, len.saturating_sub(size))?;
                f.set_len(size)?;
            }
            if let Some(mode) = mode {
                f.set_permissions(fs::Permissions::from_mode(mode & 0o7777))?;
            }
            if let Some(t) = mtime {
                let t = match t {
                    TimeOrNow::SpecificTime(t) => t,
                    TimeOrNow::Now => SystemTime::now(),
                };
                f.set_modified(t)?;
            }
            Ok(f)
        })();
        match result.and_then(|f| f.metadata()) {
            Ok(m) => {
                let mut a = attr(&m);
                a.ino = ino;
                reply.attr(&TTL, &a)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mkdir(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some(path) = Self::child(&st, parent, name) else {
            return reply.error(ENOENT);
        };
        let made = fs::DirBuilder::new()
            .mode(mode & !umask & 0o7777)
            .create(&path);
        match made.and_then(|()| self.entry(&mut st, path)) {
            Ok(a) => {
                let path = st.paths[&a.ino].clone();
                st.name_op(&path.clone(), NameOp::Created(path));
                reply.entry(&TTL, &a, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some(path) = Self::child(&st, parent, name) else {
            return reply.error(ENOENT);
        };
        let ino = fs::symlink_metadata(&path).map(|m| m.ino());
        let stash = match st.stash(&path) {
            Ok(kept) => kept,
            Err(e) => return reply.error(errno(&e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => {
                if let Ok(ino) = ino {
                    st.paths.insert(ino, stash.clone());
                }
                let stash = Some(stash);
                st.name_op(&path.clone(), NameOp::Removed { path, stash });
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some(path) = Self::child(&st, parent, name) else {
            return reply.error(ENOENT);
        };
        let ino = fs::symlink_metadata(&path).map(|m| m.ino());
        match fs::remove_dir(&path) {
            Ok(()) => {
                if let Ok(ino) = ino {
                    st.paths.remove(&ino);
                }
                let stash = None;
                st.name_op(&path.clone(), NameOp::Removed { path, stash });
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        if flags != 0 {
            // RENAME_NOREPLACE, RENAME_EXCHANGE: not offered.
            return reply.error(EINVAL);
        }
        let (Some(from), Some(to)) = (
            Self::child(&st, parent, name),
            Self::child(&st, newparent, newname),
        ) else {
            return reply.error(ENOENT);
        };
        let moved = fs::symlink_metadata(&from).map(|m| m.ino()).ok();
        let at_to = fs::symlink_metadata(&to).map(|m| m.ino()).ok();
        // A rename onto itself, or onto another link of the same file,
        // changes nothing.
        let noop = at_to.is_some() && at_to == moved;
        let replaced = at_to.filter(|_| !noop);
        let stash = match replaced {
            Some(_) if to.is_file() => match st.stash(&to) {
                Ok(kept) => Some(kept),
                Err(e) => return reply.error(errno(&e)),
            },
            _ => None,
        };
        if let Err(e) = fs::rename(&from, &to) {
            return reply.error(errno(&e));
        }
        if let Some(ino) = replaced {
            match &stash {
                Some(kept) => st.paths.insert(ino, kept.clone()),
                None => st.paths.remove(&ino), // an empty directory
            };
        }
        if !noop {
            let op = NameOp::Renamed {
                from: from.clone(),
                to: to.clone(),
                stash,
            };
            st.name_op(&to, op);
        }
        // The renamed entry and, for a directory, everything under it.
        for p in st.paths.values_mut() {
            if let Ok(rest) = p.strip_prefix(&from) {
                *p = if rest.as_os_str().is_empty() {
                    to.clone()
                } else {
                    to.join(rest)
                };
            }
        }
        reply.ok()
    }

    fn link(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _newparent: u64,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(EOPNOTSUPP)
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some(path) = st.paths.get(&ino).cloned() else {
            return reply.error(ENOENT);
        };
        let access = flags & 0o3; // O_ACCMODE
                                  // O_TRUNC needs nothing here: without FUSE_ATOMIC_O_TRUNC (fuser
                                  // does not ask for it) the kernel sends a SETATTR to size 0.
                                  // Writes come with their offset (O_APPEND's too): never open the
                                  // backing file for appending, or every pwrite would land at its end.
        let opened = OpenOptions::new().read(true).write(access != 0).open(&path);
        match opened {
            Ok(f) => {
                st.next_fh += 1;
                let fh = st.next_fh;
                st.open.insert(fh, (ino, f));
                reply.opened(fh, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some(path) = Self::child(&st, parent, name) else {
            return reply.error(ENOENT);
        };
        let existed = path.exists();
        let spared = self.spared(&path);
        let opened = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .create_new(flags & 0o200 != 0) // O_EXCL
            .mode(mode & !umask & 0o7777)
            .open(&path);
        let f = match opened {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        match self.entry(&mut st, path) {
            Ok(a) => {
                if !existed && !spared {
                    let path = st.paths[&a.ino].clone();
                    st.name_op(&path.clone(), NameOp::Created(path));
                }
                if !existed && !spared {
                    // A new file has no synced bytes.
                    st.unsynced.insert(
                        a.ino,
                        Unsynced {
                            synced_len: 0,
                            overwritten: Vec::new(),
                        },
                    );
                }
                st.next_fh += 1;
                let fh = st.next_fh;
                st.open.insert(fh, (a.ino, f));
                reply.created(&TTL, &a, 0, fh, 0)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some((_, f)) = st.open.get(&fh) else {
            return reply.error(EBADF);
        };
        let mut buf = vec![0; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match f.read_at(&mut buf[got..], offset as u64 + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return reply.error(errno(&e)),
            }
        }
        reply.data(&buf[..got])
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some((ino, f)) = st.open.get(&fh) else {
            return reply.error(EBADF);
        };
        let (ino, f) = match f.try_clone() {
            Ok(f) => (*ino, f),
            Err(e) => return reply.error(errno(&e)),
        };
        let offset = offset as u64;
        let written = self
            .before_write(&mut st, ino, &f, offset, data.len() as u64)
            .and_then(|()| f.write_all_at(data, offset));
        match written {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _lock_owner: u64,
        reply: ReplyEmpty,
    ) {
        reply.ok()
    }

    fn release(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        fh: u64,
        _flags: i32,
        _lock_owner: Option<u64>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.state().open.remove(&fh);
        reply.ok()
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        // On the disk now. (The backing file needs no fsync of its own: the
        // test's machine does not lose power.)
        st.unsynced.remove(&ino);
        reply.ok()
    }

    fn opendir(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        if st.paths.contains_key(&ino) {
            reply.opened(0, 0)
        } else {
            reply.error(ENOENT)
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        let Some(dir) = st.paths.get(&ino) else {
            return reply.error(ENOENT);
        };
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) => return reply.error(errno(&e)),
        };
        let mut all = vec![
            (ino, FileType::Directory, ".".into()),
            (ino, FileType::Directory, "..".into()),
        ];
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            all.push((m.ino(), attr(&m).kind, e.file_name()));
        }
        for (i, (ino, kind, name)) in all.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, i as i64 + 1, kind, &name) {
                break;
            }
        }
        reply.ok()
    }

    fn fsyncdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let mut st = self.state();
        if st.off {
            return reply.error(EIO);
        }
        // Every change to its names is durable now.
        if let Some(dir) = st.paths.get(&ino).cloned() {
            st.names.retain(|(d, _)| *d != dir);
        }
        reply.ok()
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        match rustix::fs::statvfs(&self.root) {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e.raw_os_error()),
        }
    }

    fn fallocate(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _offset: i64,
        _length: i64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // RocksDB preallocates WAL and SST space when it can, and goes on
        // without when it cannot.
        reply.error(EOPNOTSUPP)
    }

    fn access(&mut self, _req: &Request<'_>, _ino: u64, _mask: i32, reply: ReplyEmpty) {
        reply.error(ENOSYS)
    }
}
