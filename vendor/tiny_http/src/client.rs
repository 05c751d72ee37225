use ascii::AsciiString;

use std::io::Error as IoError;
use std::io::Result as IoResult;
use std::io::{BufRead, BufReader, BufWriter, ErrorKind, Read, Write};

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::{HTTPVersion, Method};
use crate::util::RefinedTcpStream;
use crate::util::{SequentialReader, SequentialReaderBuilder, SequentialWriterBuilder};
use crate::Request;

/// A ClientConnection is an object that will store a socket to a client
/// and return Request objects.
pub struct ClientConnection {
    // address of the client
    remote_addr: IoResult<Option<SocketAddr>>,

    // sequence of Readers to the stream, so that the data is not read in
    //  the wrong order
    source: SequentialReaderBuilder<BufReader<RefinedTcpStream>>,

    // sequence of Writers to the stream, to avoid writing response #2 before
    //  response #1
    sink: SequentialWriterBuilder<BufWriter<RefinedTcpStream>>,

    // Reader to read the next header from
    next_header_source: SequentialReader<BufReader<RefinedTcpStream>>,

    // set to true if we know that the previous request is the last one
    no_more_requests: bool,

    // true if the connection goes through SSL
    secure: bool,

    // tern patch (see vendor/README.md): raised by a request that is done
    // with its body unread (see `Request::unread`); the connection then
    // closes instead of reading the rest of the body as a request.
    unread: Arc<AtomicBool>,
}

/// tern patch (see vendor/README.md): the lingering close waits at most this
/// long in all for the client to stop sending...
const LINGER_TIME: Duration = Duration::from_secs(2);
/// ...and throws away at most this many bytes: as many as tern's largest
/// JSON body, so that one refused unread (401, 503) is taken whole.
const LINGER_BYTES: usize = 8 << 20;

/// tern patch (see vendor/README.md): a request's line and headers must all
/// arrive within this time of its first byte (plus, at worst, one read
/// timeout for the byte that comes too late), however they trickle in.
const HEAD_TIME: Duration = Duration::from_secs(10);

/// Error that can happen when reading a request.
#[derive(Debug)]
enum ReadError {
    WrongRequestLine,
    WrongHeader(HTTPVersion),
    /// the client sent an unrecognized `Expect` header
    ExpectationFailed(HTTPVersion),
    ReadIoError(IoError),
}

impl ClientConnection {
    /// Creates a new `ClientConnection` that takes ownership of the `TcpStream`.
    pub fn new(
        write_socket: RefinedTcpStream,
        mut read_socket: RefinedTcpStream,
    ) -> ClientConnection {
        let remote_addr = read_socket.peer_addr();
        let secure = read_socket.secure();

        let mut source = SequentialReaderBuilder::new(BufReader::with_capacity(1024, read_socket));
        let first_header = source.next().unwrap();

        ClientConnection {
            source,
            sink: SequentialWriterBuilder::new(BufWriter::with_capacity(1024, write_socket)),
            remote_addr,
            next_header_source: first_header,
            no_more_requests: false,
            secure,
            unread: Arc::new(AtomicBool::new(false)),
        }
    }

    /// true if the connection is HTTPS
    pub fn secure(&self) -> bool {
        self.secure
    }

    /// Reads the next line from self.next_header_source.
    ///
    /// Reads until `CRLF` is reached. The next read will start
    ///  at the first byte of the new line.
    fn read_next_line(&mut self, deadline: &mut Option<Instant>) -> IoResult<AsciiString> {
        // tern patch (see vendor/README.md).
        const MAX_LINE: usize = 64 * 1024;
        let mut buf = Vec::new();
        let mut prev_byte_was_cr = false;

        loop {
            let byte = self.next_header_source.by_ref().bytes().next();
            // tern patch (see vendor/README.md): the whole head must arrive
            // within HEAD_TIME of its first byte.
            match deadline {
                None => *deadline = Some(Instant::now() + HEAD_TIME),
                Some(d) if Instant::now() > *d => {
                    return Err(IoError::new(ErrorKind::TimedOut, "request head too slow"))
                }
                Some(_) => {}
            }

            let byte = match byte {
                Some(b) => b?,
                None => return Err(IoError::new(ErrorKind::ConnectionAborted, "Unexpected EOF")),
            };

            if byte == b'\n' && prev_byte_was_cr {
                buf.pop(); // removing the '\r'
                return AsciiString::from_ascii(buf)
                    .map_err(|_| IoError::new(ErrorKind::InvalidInput, "Header is not in ASCII"));
            }

            prev_byte_was_cr = byte == b'\r';

            // tern patch (see vendor/README.md): bound a header line.
            if buf.len() >= MAX_LINE {
                return Err(IoError::new(ErrorKind::InvalidData, "header line too long"));
            }
            buf.push(byte);
        }
    }

    /// Reads a request from the stream.
    /// Blocks until the header has been read.
    fn read(&mut self) -> Result<Request, ReadError> {
        // tern patch (see vendor/README.md).
        const MAX_HEADERS: usize = 128;
        let mut deadline = None;
        let (method, path, version, headers) = {
            // reading the request line
            let (method, path, version) = {
                let line = self
                    .read_next_line(&mut deadline)
                    .map_err(ReadError::ReadIoError)?;

                parse_request_line(
                    line.as_str().trim(), // TODO: remove this conversion
                )?
            };

            // getting all headers
            let headers = {
                let mut headers = Vec::new();
                loop {
                    let line = self
                        .read_next_line(&mut deadline)
                        .map_err(ReadError::ReadIoError)?;

                    if line.is_empty() {
                        break;
                    };
                    // tern patch (see vendor/README.md): bound the header count.
                    if headers.len() >= MAX_HEADERS {
                        return Err(ReadError::WrongHeader(version));
                    }
                    headers.push(match FromStr::from_str(line.as_str().trim()) {
                        // TODO: remove this conversion
                        Ok(h) => h,
                        _ => return Err(ReadError::WrongHeader(version)),
                    });
                }

                headers
            };

            (method, path, version, headers)
        };

        // building the writer for the request
        let writer = self.sink.next().unwrap();

        // follow-up for next potential request
        let mut data_source = self.source.next().unwrap();
        std::mem::swap(&mut self.next_header_source, &mut data_source);

        // building the next reader
        let request = crate::request::new_request(
            self.secure,
            method,
            path,
            version.clone(),
            headers,
            *self.remote_addr.as_ref().unwrap(),
            data_source,
            writer,
        )
        .map_err(|e| {
            use crate::request;
            match e {
                request::RequestCreationError::CreationIoError(e) => ReadError::ReadIoError(e),
                request::RequestCreationError::ExpectationFailed => {
                    ReadError::ExpectationFailed(version)
                }
            }
        })?;

        // return the request
        Ok(request)
    }
}

impl Iterator for ClientConnection {
    type Item = Request;

    /// Blocks until the next Request is available.
    /// Returns None when no new Requests will come from the client.
    ///
    /// tern patch (see vendor/README.md): every response after which the
    /// connection closes carries `Connection: close`, and where the client
    /// may still be sending, the close is a lingering one
    /// (`close_lingering`). A request whose body was read to its end keeps
    /// the connection open; one whose body was not closes it.
    fn next(&mut self) -> Option<Request> {
        use crate::{Response, StatusCode};

        // The previous request gives the connection back when it is done
        // with its body (at once if it had none or it was buffered).
        self.next_header_source.wait_turn();
        if self.unread.load(Ordering::Acquire) {
            self.close_lingering();
            return None;
        }

        // the client sent a "connection: close" header in this previous request
        //  or is using HTTP 1.0, meaning that no new request will come
        if self.no_more_requests {
            return None;
        }

        // Idle between requests: a client that closes, or sends nothing
        // within the read timeout, is closed at once, with no answer (a 408
        // would be read as the answer to the request it sends next) and no
        // lingering (nothing of a request is left unread).
        loop {
            match self.next_header_source.wait_turn().fill_buf() {
                Ok([]) => return None,
                Ok(_) => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }

        let rq = match self.read() {
            Ok(rq) => rq,
            Err(e) => {
                let (status, version) = match e {
                    ReadError::WrongRequestLine => (400, HTTPVersion(1, 1)),
                    ReadError::WrongHeader(ver) => (400, ver),
                    // request timeout
                    ReadError::ReadIoError(ref err) if err.kind() == ErrorKind::TimedOut => {
                        (408, HTTPVersion(1, 1))
                    }
                    // TODO: should be recoverable, but needs handling in case of body
                    ReadError::ExpectationFailed(ver) => (417, ver),
                    ReadError::ReadIoError(_) => {
                        self.close_lingering();
                        return None;
                    }
                };
                // We don't know where the next request would start: this
                // answer is the last on the connection.
                let writer = self.sink.next().unwrap();
                Response::new_empty(StatusCode(status))
                    .print(writer, version, &[], status == 417, None, true)
                    .ok();
                self.close_lingering();
                return None;
            }
        };

        // checking HTTP version; the request may have a body of unknown
        // framing, so the answer is the last on the connection
        if *rq.http_version() > (1, 1) {
            // Through the request's own writer: a new one would wait for it.
            let writer = rq.into_writer();
            Response::from_string("This server only supports HTTP versions 1.0 and 1.1")
                .with_status_code(StatusCode(505))
                .print(writer, HTTPVersion(1, 1), &[], false, None, true)
                .ok();
            self.close_lingering();
            return None;
        }

        Some(self.admit(rq))
    }
}

impl ClientConnection {
    /// Notes whether the client will send more after `rq`, and ties `rq` to
    /// this connection.
    fn admit(&mut self, rq: Request) -> Request {
        // updating the status of the connection
        let connection_header = rq
            .headers()
            .iter()
            .find(|h| h.field.equiv("Connection"))
            .map(|h| h.value.as_str());

        let lowercase = connection_header.map(|h| h.to_ascii_lowercase());

        match lowercase {
            Some(ref val) if val.contains("close") => self.no_more_requests = true,
            Some(ref val) if val.contains("upgrade") => self.no_more_requests = true,
            Some(ref val)
                if !val.contains("keep-alive") && *rq.http_version() == HTTPVersion(1, 0) =>
            {
                self.no_more_requests = true
            }
            None if *rq.http_version() == HTTPVersion(1, 0) => self.no_more_requests = true,
            _ => (),
        };

        rq.with_connection(self.unread.clone(), self.no_more_requests)
    }

    /// tern patch (see vendor/README.md): closes the connection so that a
    /// client still sending (a body the server did not read, or the rest of
    /// a refused request) still reads the answer. Closing a socket with
    /// unread input sends a reset, and a reset makes the client fail its
    /// write and discard the answer before reading it. So, as nginx does:
    /// write every answer, send the FIN, then read and discard what comes,
    /// until the client closes, for at most `LINGER_TIME` and
    /// `LINGER_BYTES` in all (a client trickling bytes cannot hold the
    /// thread longer), and only then close.
    fn close_lingering(&mut self) {
        // Waits for every response to be written, then the FIN.
        let mut writer = self.sink.next().unwrap();
        writer.with_inner(|w| {
            w.flush().ok();
            w.get_mut().shutdown_write();
        });

        let deadline = Instant::now() + LINGER_TIME;
        let reader = self.next_header_source.wait_turn();
        let mut buf = [0u8; 8192];
        let mut discarded = 0;
        while discarded < LINGER_BYTES {
            let left = deadline.saturating_duration_since(Instant::now());
            // Over TLS the timeout cannot be set: no lingering there.
            if left.is_zero() || reader.get_ref().set_read_timeout(left).is_err() {
                break;
            }
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => discarded += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }
}

/// Parses a "HTTP/1.1" string.
fn parse_http_version(version: &str) -> Result<HTTPVersion, ReadError> {
    let (major, minor) = match version {
        "HTTP/0.9" => (0, 9),
        "HTTP/1.0" => (1, 0),
        "HTTP/1.1" => (1, 1),
        "HTTP/2.0" => (2, 0),
        "HTTP/3.0" => (3, 0),
        _ => return Err(ReadError::WrongRequestLine),
    };

    Ok(HTTPVersion(major, minor))
}

/// Parses the request line of the request.
/// eg. GET / HTTP/1.1
fn parse_request_line(line: &str) -> Result<(Method, String, HTTPVersion), ReadError> {
    let mut parts = line.split(' ');

    let method = parts.next().and_then(|w| w.parse().ok());
    let path = parts.next().map(ToOwned::to_owned);
    let version = parts.next().and_then(|w| parse_http_version(w).ok());

    method
        .and_then(|method| Some((method, path?, version?)))
        .ok_or(ReadError::WrongRequestLine)
}

#[cfg(test)]
mod test {
    #[test]
    fn test_parse_request_line() {
        let (method, path, ver) = super::parse_request_line("GET /hello HTTP/1.1").unwrap();

        assert!(method == crate::Method::Get);
        assert!(path == "/hello");
        assert!(ver == crate::common::HTTPVersion(1, 1));

        assert!(super::parse_request_line("GET /hello").is_err());
        assert!(super::parse_request_line("qsd qsd qsd").is_err());
    }
}
