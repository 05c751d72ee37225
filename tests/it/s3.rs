//! A real S3-compatible server for the tests: moto in server mode
//! (`python3 -m moto.server`) on 127.0.0.1 and a free port, with one
//! bucket. Killed by pid when dropped, also when a test panics. moto keeps
//! objects in memory (large ones in temporary files), so a restart starts
//! empty: [`Moto::restart`] makes the bucket again.
//!
//! moto accepts any credentials and does not check signatures of
//! presigned URLs; what the store itself refuses is tested elsewhere.
//!
//! Without moto the tests panic with a message saying how to install it:
//! `.ci/run` does (`pip install 'moto[server]'`).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::util::{request, reserve_port, wait_for};

/// The bucket every test server uses.
pub const BUCKET: &str = "tern-test";

/// Starts moto's server once the test says so: it imports moto (the slow
/// part), says `imported` on stdout, sends the rest of its stdout to the
/// log, and binds when a line comes on stdin. The test holds the port until
/// then, so no other test's listener can take it in between.
const LAUNCHER: &str = "\
import os, sys
import moto.server
sys.stdout.write('imported\\n')
sys.stdout.flush()
os.dup2(2, 1)
sys.stdin.readline()
moto.server.main(sys.argv[1:])
";

/// A moto server process.
pub struct Moto {
    /// `None` while stopped.
    child: Option<Child>,
    /// The port, bound and not listening (connections are refused), while
    /// no moto holds it: from start to each spawn, and while stopped.
    holder: Option<socket2::Socket>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its log file.
    log: std::path::PathBuf,
}

impl Moto {
    /// Starts moto on a free loopback port (log in `dir/moto.log`) and
    /// makes the bucket.
    pub fn start(dir: &Path) -> Moto {
        let probe = Command::new("python3")
            .args(["-c", "import moto.server"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        assert!(
            probe.is_ok_and(|s| s.success()),
            "moto is not installed: run `python3 -m pip install 'moto[server]'` \
             (.ci/run installs it); the s3 backend is tested against it"
        );
        let (holder, addr) = reserve_port(0);
        let mut moto = Moto {
            child: None,
            holder: Some(holder),
            addr,
            log: dir.join("moto.log"),
        };
        moto.spawn();
        moto
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("moto log");
        let mut child = Command::new("python3")
            .args(["-c", LAUNCHER, "-H", "127.0.0.1", "-p"])
            .arg(self.addr.port().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn python3 -m moto.server");
        let stdout = child.stdout.take().expect("moto's stdout");
        let mut stdin = child.stdin.take().expect("moto's stdin");
        self.child = Some(child);
        // The line, or EOF if python failed; a thread so that a hung
        // import is a timeout, not a hang.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let imported = rx.recv_timeout(Duration::from_secs(60));
        if imported.as_deref().map(str::trim) != Ok("imported") {
            self.fail(&format!("moto did not start ({imported:?})"));
        }
        // Free the port for moto alone, then let it bind.
        self.holder = None;
        if let Err(e) = stdin.write_all(b"go\n") {
            self.fail(&format!("moto exited before binding ({e})"));
        }
        let addr = self.addr;
        let started = std::panic::catch_unwind(|| {
            wait_for(Duration::from_secs(30), "moto to listen", || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                    .ok()
                    .map(|_| ())
            })
        });
        if started.is_err() {
            self.fail(&format!("moto did not listen on {addr}"));
        }
        let r = request("PUT", &format!("/{BUCKET}"))
            .header("Content-Length", "0")
            .send(self.addr);
        assert_eq!(r.status, 200, "creating the bucket: {}", r.text());
    }

    /// Panics with `what` and moto's log.
    fn fail(&self, what: &str) -> ! {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        panic!("{what}; its log:\n{text}");
    }

    /// The server flags that put a tern's files in this bucket.
    pub fn args(&self) -> Vec<String> {
        server_args(self.addr, "test-key", "test-secret")
    }

    /// Kills the server (an outage: connections are refused) and holds
    /// its port for [`Moto::restart`].
    pub fn stop(&mut self) {
        self.kill();
        self.holder = Some(reserve_port(self.addr.port()).0);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port, empty but for the bucket.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The keys in the bucket, sorted.
    pub fn keys(&self) -> Vec<String> {
        let r = request("GET", &format!("/{BUCKET}?list-type=2")).send(self.addr);
        assert_eq!(r.status, 200, "listing the bucket: {}", r.text());
        let text = r.text();
        let mut keys: Vec<String> = text
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_owned)
            .collect();
        keys.sort();
        keys
    }

    /// The size of object `key`, if it exists.
    pub fn size(&self, key: &str) -> Option<u64> {
        // Signed in name only: moto takes any signature, but answers an
        // anonymous request for a private object 403.
        let r = request("HEAD", &format!("/{BUCKET}/{key}"))
            .header("Authorization", "AWS test-key:unchecked")
            .send(self.addr);
        (r.status == 200).then(|| {
            r.header("content-length")
                .and_then(|v| v.parse().ok())
                .expect("a Content-Length")
        })
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.kill();
    }
}

/// s3rver (npm), the second S3-compatible server of the tests: unlike
/// moto it checks signatures, presigned URLs' included (and their expiry),
/// with its fixed credentials `S3RVER` / `S3RVER`. `.ci/run` installs it
/// under `~/.cache/tern/s3rver` (or where `TERN_S3RVER` points).
pub struct S3rver {
    child: Child,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl S3rver {
    /// Starts s3rver on a free loopback port with the bucket, its data in
    /// `dir/s3rver`.
    pub fn start(dir: &Path) -> S3rver {
        let bin = std::env::var_os("TERN_S3RVER")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let home = std::env::var_os("HOME").unwrap_or_default();
                Path::new(&home).join(".cache/tern/s3rver/node_modules/s3rver/bin/s3rver.js")
            });
        assert!(
            bin.exists(),
            "s3rver is not installed at {} (set TERN_S3RVER, or run \
             `npm install --prefix ~/.cache/tern/s3rver s3rver@3.7.1`, as .ci/run does)",
            bin.display()
        );
        let data = dir.join("s3rver");
        std::fs::create_dir_all(&data).expect("s3rver dir");
        let log_path = dir.join("s3rver.log");
        let log = std::fs::File::create(&log_path).expect("s3rver log");
        // Port 0: s3rver binds a free port itself and says which.
        let child = Command::new("node")
            .arg(&bin)
            .arg("-d")
            .arg(&data)
            .args(["-a", "127.0.0.1", "-p", "0"])
            .args(["--no-vhost-buckets", "--configure-bucket", BUCKET])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn node s3rver");
        let mut server = S3rver {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        server.addr = wait_for(Duration::from_secs(30), "s3rver to listen", || {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let addr = text.split("S3rver listening on ").nth(1)?.lines().next()?;
            Some(addr.trim().parse().expect("s3rver's address"))
        });
        server
    }

    /// The server flags that put a tern's files in its bucket.
    pub fn args(&self) -> Vec<String> {
        server_args(self.addr, "S3RVER", "S3RVER")
    }
}

impl Drop for S3rver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `tern serve` flags for the bucket of an S3 server at `addr`, with
/// these credentials.
fn server_args(addr: SocketAddr, key: &str, secret: &str) -> Vec<String> {
    [
        "--files-backend",
        "s3",
        "--s3-endpoint",
        &format!("http://{addr}"),
        "--s3-bucket",
        BUCKET,
        "--s3-path-style",
        "true",
        "--s3-access-key",
        key,
        "--s3-secret-key",
        secret,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}
