//! tern patch (see vendor/README.md): ported to rustls 0.23, with the
//! server configuration taken from a [`crate::TlsSource`] at each accept (so
//! a renewed certificate applies to the next connection without a restart).
//! No handshake happens on the accept thread: `accept` only creates the
//! session, and the handshake runs on the connection's own thread, at its
//! first read. The handshake must be done within [`HANDSHAKE_TIME`] of the
//! accept (a client trickling its hello would otherwise hold the thread for
//! as long as it likes, each byte within the read timeout).
use crate::connection::Connection;
use crate::util::refined_tcp_stream::Stream as RefinedStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::error::Error;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// How long a client has, from its accept, to complete the TLS handshake.
const HANDSHAKE_TIME: Duration = Duration::from_secs(10);

type Owned = rustls::StreamOwned<rustls::ServerConnection, Socket>;

/// The socket under TLS, whose reads fail once the handshake deadline is
/// past (until the handshake is done and the deadline cleared).
pub(crate) struct Socket {
    conn: Connection,
    handshake_until: Option<Instant>,
}

impl Socket {
    fn peer_addr(&mut self) -> std::io::Result<Option<SocketAddr>> {
        self.conn.peer_addr()
    }

    fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.conn.set_read_timeout(timeout)
    }

    fn shutdown(&self, how: Shutdown) -> std::io::Result<()> {
        self.conn.shutdown(how)
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.handshake_until.is_some_and(|d| Instant::now() > d) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "TLS handshake too slow",
            ));
        }
        self.conn.read(buf)
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.conn.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.conn.flush()
    }
}

/// A wrapper around an owned Rustls connection and corresponding stream.
///
/// Uses an internal Mutex to permit disparate reader & writer threads to access the stream independently.
pub(crate) struct RustlsStream(Arc<Mutex<Owned>>);

impl RustlsStream {
    /// A poisoned lock (a panic on another thread of this connection) still
    /// gives the stream: the connection is then closed by its error path.
    fn lock(&self) -> MutexGuard<'_, Owned> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn peer_addr(&mut self) -> std::io::Result<Option<SocketAddr>> {
        self.lock().sock.peer_addr()
    }

    pub(crate) fn set_read_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.lock().sock.set_read_timeout(timeout)
    }

    /// Shutting down the write half first sends TLS's close_notify, so that
    /// the client can tell the end of the answer from a cut connection.
    pub(crate) fn shutdown(&mut self, how: Shutdown) -> std::io::Result<()> {
        let mut stream = self.lock();
        if matches!(how, Shutdown::Write | Shutdown::Both) {
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
        stream.sock.shutdown(how)
    }
}

impl Clone for RustlsStream {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl Read for RustlsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut stream = self.lock();
        let n = stream.read(buf)?;
        if !stream.conn.is_handshaking() {
            stream.sock.handshake_until = None;
        }
        Ok(n)
    }
}

impl Write for RustlsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.lock().flush()
    }
}

pub(crate) struct RustlsContext(crate::TlsSource);

impl RustlsContext {
    pub(crate) fn from_source(source: crate::TlsSource) -> Self {
        Self(source)
    }

    pub(crate) fn from_pem(
        certificates: Vec<u8>,
        private_key: Zeroizing<Vec<u8>>,
    ) -> Result<Self, Box<dyn Error + Send + Sync>> {
        let certificate_chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&certificates).collect::<Result<_, _>>()?;
        if certificate_chain.is_empty() {
            return Err("Couldn't extract certificate chain from config.".into());
        }
        let private_key = PrivateKeyDer::from_pem_slice(&private_key)?;
        let tls_conf = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certificate_chain, private_key)?;
        let tls_conf = Arc::new(tls_conf);
        Ok(Self(Arc::new(move || tls_conf.clone())))
    }

    pub(crate) fn accept(
        &self,
        stream: Connection,
    ) -> Result<RustlsStream, Box<dyn Error + Send + Sync + 'static>> {
        let connection = rustls::ServerConnection::new((self.0)())?;
        let socket = Socket {
            conn: stream,
            handshake_until: Some(Instant::now() + HANDSHAKE_TIME),
        };
        Ok(RustlsStream(Arc::new(Mutex::new(rustls::StreamOwned::new(
            connection, socket,
        )))))
    }
}

impl From<RustlsStream> for RefinedStream {
    fn from(stream: RustlsStream) -> Self {
        Self::Https(stream)
    }
}
