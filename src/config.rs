//! Configuration: raw settings (serde TOML file + `TERN_*` environment + `--flags`)
//! → one validated [`Config`], built once at startup and read-only afterwards.
//!
//! The parts, in the order a setting flows through them:
//!
//! - the key table (the `config_keys!` invocation): every key is
//!   declared once with its type, default, doc and environment variable. It generates
//!   [`Config`], the clap flags of [`ServeArgs`], the file reader and
//!   [`generate_config`], so the four cannot drift apart.
//! - [`ServeArgs`]: clap reads `--<key-with-dashes>` and `TERN_<KEY>` (a flag beats its
//!   variable) and keeps them as raw strings, so that parse errors can name the key.
//! - the file (`--config FILE`): parsed into a TOML table; each entry is decoded into its
//!   key's type with serde. An unknown key or a value of the wrong type is an error.
//! - [`Config::load`]: per key, the flag/env string (parsed), else the file's value, else
//!   the default; then [`Config::validate`] checks the ranges and the cross-key rules.
//!
//! Precedence: default < file < environment < flag. Every error names the key; nothing
//! ever falls back to a default silently.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Largest value a 4-byte protocol varint can carry, hence the largest `max_frame`.
const MAX_FRAME_LIMIT: u32 = (1 << 28) - 1;
/// Smallest accepted `max_frame`: room for a HELLO/WELCOME exchange and an error STATUS.
const MIN_FRAME: u32 = 1024;
/// Smallest accepted `conn_buffer`: below this a connection could stall mid-frame often.
const MIN_CONN_BUFFER: usize = 64 * 1024;

/// Text at the top of [`generate_config`]'s output.
const GENERATED_HEADER: &str = "\
# tern configuration, version 1 (printed by `tern generate-config`).
#
# Every key below shows its built-in default. Any key can also be set by an
# environment variable TERN_<KEY> (e.g. TERN_HTTP_LISTEN) or a flag
# --<key-with-dashes> (e.g. --http-listen). Precedence, lowest first:
# default < this file < environment < flag.
# An unknown key or a bad value stops the server with an error naming the key.
# Keys written commented out have defaults computed at startup.
";

/// Format of the log output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

impl LogFormat {
    /// The name used in the file, the environment and flags: `text` or `json`.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the configuration could not be built. Every variant names the file or the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file given with `--config` / `TERN_CONFIG`.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The file is not valid TOML; the message carries the line and a snippet.
    #[error("cannot parse config file {}: {message}", path.display())]
    Parse {
        /// The file given with `--config` / `TERN_CONFIG`.
        path: PathBuf,
        /// The TOML parser's message, with line, column and the offending line.
        message: String,
    },
    /// The file sets a key tern does not know (a typo, or a key from a newer version).
    #[error("unknown key {key:?} in {}{hint}", path.display())]
    UnknownKey {
        /// The key as written in the file.
        key: String,
        /// The file given with `--config` / `TERN_CONFIG`.
        path: PathBuf,
        /// ` (did you mean "..."?)` when a known key is close, else empty.
        hint: String,
    },
    /// A value could not be read as its key's type.
    #[error("{key}: invalid value {value} (from {origin}): expected {expected}")]
    Value {
        /// The key, as spelled in the file.
        key: &'static str,
        /// The offending value, quoted as given (or `<redacted>` for secrets).
        value: String,
        /// Where it came from: the file path, `TERN_<KEY>` or `--<key>`.
        origin: String,
        /// What a valid value looks like.
        expected: String,
    },
    /// The values parsed but break a rule (a range, or a relation between keys).
    #[error("{key}: {message}")]
    Invalid {
        /// The key whose value has to change.
        key: &'static str,
        /// What is wrong and what would be accepted.
        message: String,
    },
}

/// How one key's type is read from a flag/env string and from a TOML value, and how its
/// default is written into the generated file.
trait Value: Sized + DeserializeOwned {
    /// Placeholder for the flag's value in `--help`.
    const VALUE_NAME: &'static str;
    /// What a valid flag or environment string looks like, for error messages.
    fn expected() -> String;
    /// What a valid value in the TOML file looks like; differs where TOML has a type.
    fn expected_in_file() -> String {
        Self::expected()
    }
    /// Parses a flag or environment string; `None` when it is not a valid value.
    fn parse_str(raw: &str) -> Option<Self>;
    /// The value as TOML source text, for [`generate_config`].
    fn to_toml(&self) -> String;
    /// False only for an unset optional value, which needs no redaction.
    fn is_set(&self) -> bool {
        true
    }
}

/// `s` as a TOML string literal, escaped as needed.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

impl Value for PathBuf {
    const VALUE_NAME: &'static str = "PATH";
    fn expected() -> String {
        "a path".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        Some(PathBuf::from(raw))
    }
    fn to_toml(&self) -> String {
        toml_string(&self.to_string_lossy())
    }
}

impl Value for SocketAddr {
    const VALUE_NAME: &'static str = "IP:PORT";
    fn expected() -> String {
        "an IP socket address such as 127.0.0.1:7700 or [::1]:7700 \
         (host names are not resolved)"
            .into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        raw.parse().ok()
    }
    fn to_toml(&self) -> String {
        toml_string(&self.to_string())
    }
}

impl Value for String {
    const VALUE_NAME: &'static str = "TEXT";
    fn expected() -> String {
        "a string".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        Some(raw.to_owned())
    }
    fn to_toml(&self) -> String {
        toml_string(self)
    }
}

impl Value for Option<String> {
    const VALUE_NAME: &'static str = "TEXT";
    fn expected() -> String {
        "a string".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        Some(Some(raw.to_owned()))
    }
    fn to_toml(&self) -> String {
        // Unset optional keys are written commented out, with a placeholder value.
        toml_string(self.as_deref().unwrap_or("..."))
    }
    fn is_set(&self) -> bool {
        self.is_some()
    }
}

impl Value for Option<PathBuf> {
    const VALUE_NAME: &'static str = "PATH";
    fn expected() -> String {
        "a path".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        Some(Some(PathBuf::from(raw)))
    }
    fn to_toml(&self) -> String {
        // Unset optional keys are written commented out, with a placeholder value.
        toml_string(
            &self
                .as_deref()
                .map_or("...".into(), |p| p.to_string_lossy()),
        )
    }
    fn is_set(&self) -> bool {
        self.is_some()
    }
}

impl Value for bool {
    const VALUE_NAME: &'static str = "BOOL";
    fn expected() -> String {
        "one of true, false, 1, 0, yes, no".into()
    }
    fn expected_in_file() -> String {
        "true or false (an unquoted TOML boolean)".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Some(true),
            "false" | "0" | "no" => Some(false),
            _ => None,
        }
    }
    fn to_toml(&self) -> String {
        self.to_string()
    }
}

impl Value for LogFormat {
    const VALUE_NAME: &'static str = "text|json";
    fn expected() -> String {
        "text or json".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        match raw {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => None,
        }
    }
    fn to_toml(&self) -> String {
        toml_string(self.as_str())
    }
}

/// Where uploaded files live (`files_backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilesBackend {
    /// Under `<data_dir>/files`, served by tern.
    #[default]
    Local,
    /// In a bucket of an S3-compatible store (`s3_*` keys).
    S3,
}

impl FilesBackend {
    /// The name used in the file, the environment and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            FilesBackend::Local => "local",
            FilesBackend::S3 => "s3",
        }
    }
}

impl fmt::Display for FilesBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Value for FilesBackend {
    const VALUE_NAME: &'static str = "local|s3";
    fn expected() -> String {
        "local or s3".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        match raw {
            "local" => Some(FilesBackend::Local),
            "s3" => Some(FilesBackend::S3),
            _ => None,
        }
    }
    fn to_toml(&self) -> String {
        toml_string(self.as_str())
    }
}

/// An age in seconds: a plain integer counts **days**; a number with a
/// unit (`30s`, `10m`, `12h`, `7d`) counts that unit. 0 means "never".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Age(pub u64);

impl Age {
    /// Parses `7` (days), `2s`, `10m`, `12h`, `7d`; `None` when it is none of
    /// these or overflows.
    pub fn parse(raw: &str) -> Option<Age> {
        let raw = raw.trim();
        let digits = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
        let (number, unit) = raw.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let unit = match unit.trim() {
            "" | "d" => 86_400,
            "h" => 3_600,
            "m" => 60,
            "s" => 1,
            _ => return None,
        };
        number.checked_mul(unit).map(Age)
    }

    /// The age as a duration.
    pub fn duration(self) -> std::time::Duration {
        std::time::Duration::from_secs(self.0)
    }
}

impl fmt::Display for Age {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, secs) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
            if self.0 >= secs && self.0.is_multiple_of(secs) {
                return write!(f, "{}{unit}", self.0 / secs);
            }
        }
        write!(f, "{}s", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Age {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Days(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Days(n) => n
                .checked_mul(86_400)
                .map(Age)
                .ok_or_else(|| serde::de::Error::custom("too many days")),
            Raw::Text(t) => {
                Age::parse(&t).ok_or_else(|| serde::de::Error::custom(format!("not an age: {t:?}")))
            }
        }
    }
}

impl Value for Age {
    const VALUE_NAME: &'static str = "AGE";
    fn expected() -> String {
        "days as an integer, or a number with an s, m, h or d suffix (\"2s\", \"12h\")".into()
    }
    fn expected_in_file() -> String {
        "an unquoted integer (days), or a string such as \"12h\" or \"30s\"".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        Age::parse(raw)
    }
    fn to_toml(&self) -> String {
        if self.0.is_multiple_of(86_400) {
            (self.0 / 86_400).to_string()
        } else {
            toml_string(&self.to_string())
        }
    }
}

/// A size in bytes: a plain integer, or a number with a `KiB`, `MiB`, `GiB`
/// or `TiB` suffix (`64MiB`, `1 GiB`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `123`, `64MiB`, `1 GiB`; `None` when it is none of these or overflows.
    pub fn parse(raw: &str) -> Option<ByteSize> {
        let raw = raw.trim();
        let digits = raw.find(|c: char| !c.is_ascii_digit()).unwrap_or(raw.len());
        let (number, unit) = raw.split_at(digits);
        let number: u64 = number.parse().ok()?;
        let shift = match unit.trim() {
            "" | "B" => 0,
            "KiB" => 10,
            "MiB" => 20,
            "GiB" => 30,
            "TiB" => 40,
            _ => return None,
        };
        number.checked_mul(1 << shift).map(ByteSize)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(&str, u32); 4] = [("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)];
        for (unit, shift) in UNITS {
            if self.0 >= 1 << shift && self.0.is_multiple_of(1 << shift) {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl<'de> serde::Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t)
                .ok_or_else(|| serde::de::Error::custom(format!("not a size: {t:?}"))),
        }
    }
}

impl Value for Option<ByteSize> {
    const VALUE_NAME: &'static str = "BYTES";
    fn expected() -> String {
        "a size in bytes: an integer, or a number with a KiB, MiB, GiB or TiB suffix".into()
    }
    fn expected_in_file() -> String {
        "an unquoted integer (bytes), or a string such as \"64MiB\"".into()
    }
    fn parse_str(raw: &str) -> Option<Self> {
        ByteSize::parse(raw).map(Some)
    }
    fn to_toml(&self) -> String {
        // Unset: written commented out, with an example value.
        toml_string(&self.unwrap_or(ByteSize(64 << 20)).to_string())
    }
    fn is_set(&self) -> bool {
        self.is_some()
    }
}

/// [`Value`] for the unsigned integer types; TOML integers stop at `i64::MAX`.
macro_rules! unsigned_value {
    ($($t:ty),+) => {$(
        impl Value for $t {
            const VALUE_NAME: &'static str = "N";
            fn expected() -> String {
                format!("an unsigned integer (0 to {})", <$t>::MAX)
            }
            fn expected_in_file() -> String {
                let max = (<$t>::MAX as u128).min(i64::MAX as u128);
                format!("an unquoted integer from 0 to {max}")
            }
            fn parse_str(raw: &str) -> Option<Self> {
                raw.parse().ok()
            }
            fn to_toml(&self) -> String {
                self.to_string()
            }
        }
    )+};
}
unsigned_value!(u32, u64, usize);

/// Stands in for a secret in `Debug` output and error messages.
struct Redacted;

impl fmt::Debug for Redacted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Whether a key's flag list (the idents after its env name) holds a given flag.
/// `secret`: redacted in `Debug`, errors and `--help`. `runtime`: default computed at
/// startup, so written commented out by [`generate_config`].
macro_rules! has_flag {
    (@known secret) => {};
    (@known runtime) => {};
    ($want:ident;) => { false };
    (secret; secret $($rest:ident)*) => { true };
    (runtime; runtime $($rest:ident)*) => { true };
    ($want:ident; $other:ident $($rest:ident)*) => { has_flag!($want; $($rest)*) };
}

/// Declares every configuration key once:
/// `/// doc` `key: Type = default, env "TERN_KEY" [, flag]*;`.
/// The doc becomes the field doc, the `--help` text and the generated file's comment.
macro_rules! config_keys {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident: $ty:ty = $default:expr, env $env:literal $(, $flag:ident)*;
    )+) => {
        $($(has_flag!(@known $flag);)*)+

        /// The validated settings of one `tern serve` run, built once by [`Config::load`]
        /// (tests may start from [`Config::default`]). `Debug` redacts the admin token.
        #[derive(Clone, PartialEq, Eq)]
        pub struct Config {
            $(
                $(#[doc = $doc])+
                pub $key: $ty,
            )+
        }

        impl Default for Config {
            /// The built-in defaults of the spec's table; `workers` is the number of cores
            /// and `admin_token` is unset (the server then generates one).
            fn default() -> Self {
                Config {
                    $($key: $default,)+
                }
            }
        }

        impl fmt::Debug for Config {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut s = f.debug_struct("Config");
                $(
                    if has_flag!(secret; $($flag)*) && Value::is_set(&self.$key) {
                        s.field(stringify!($key), &Redacted);
                    } else {
                        s.field(stringify!($key), &self.$key);
                    }
                )+
                s.finish()
            }
        }

        /// The flags of `tern serve`: `--config FILE` and one `--<key-with-dashes>` per
        /// setting, each also read by clap from `TERN_<KEY>` (a flag beats its variable).
        /// Values stay raw strings here; [`Config::load`] parses them so that an error can
        /// name the key. `Debug` redacts the admin token.
        #[derive(clap::Args, Clone, Default)]
        // This doc is for rustdoc; the `serve` subcommand's own doc is its help text.
        #[command(about = None, long_about = None)]
        pub struct ServeArgs {
            /// TOML file with settings (see `tern generate-config`); keys it leaves out
            /// keep their defaults.
            #[arg(long, env = "TERN_CONFIG", value_name = "FILE")]
            pub config: Option<PathBuf>,
            $(
                $(#[doc = $doc])+
                #[arg(
                    long,
                    env = $env,
                    value_name = <$ty as Value>::VALUE_NAME,
                    hide_env_values = has_flag!(secret; $($flag)*),
                )]
                pub $key: Option<String>,
            )+
        }

        impl fmt::Debug for ServeArgs {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut s = f.debug_struct("ServeArgs");
                s.field("config", &self.config);
                $(
                    if has_flag!(secret; $($flag)*) {
                        s.field(stringify!($key), &self.$key.as_ref().map(|_| Redacted));
                    } else {
                        s.field(stringify!($key), &self.$key);
                    }
                )+
                s.finish()
            }
        }

        /// Every key, in declaration order (for "did you mean" hints and tests).
        const KEYS: &[&str] = &[$(stringify!($key)),+];

        /// The settings a config file gives; `None` where it leaves a key out.
        #[derive(Debug, Default)]
        struct FileConfig {
            $($key: Option<$ty>,)+
        }

        impl FileConfig {
            /// Parses a config file's text; `path` is only used in error messages.
            fn parse(text: &str, path: &Path) -> Result<FileConfig, ConfigError> {
                let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
                let mut file = FileConfig::default();
                for (key, value) in table {
                    match key.as_str() {
                        $(
                            stringify!($key) => {
                                file.$key = Some(decode_toml(
                                    stringify!($key),
                                    has_flag!(secret; $($flag)*),
                                    value,
                                    path,
                                )?);
                            }
                        )+
                        _ => {
                            return Err(ConfigError::UnknownKey {
                                hint: hint_for(&key),
                                key,
                                path: path.to_path_buf(),
                            })
                        }
                    }
                }
                Ok(file)
            }
        }

        impl Config {
            /// Merges flag/env strings over file values over defaults, then validates.
            fn merge(args: &ServeArgs, file: FileConfig) -> Result<Config, ConfigError> {
                let defaults = Config::default();
                let config = Config {
                    $(
                        $key: match (&args.$key, file.$key) {
                            (Some(raw), _) => parse_arg(
                                stringify!($key),
                                $env,
                                has_flag!(secret; $($flag)*),
                                raw,
                            )?,
                            (None, Some(value)) => value,
                            (None, None) => defaults.$key,
                        },
                    )+
                };
                config.validate()?;
                Ok(config)
            }
        }

        /// The commented default config file that `tern generate-config` prints: every
        /// key with its doc as `#` lines and its default. Keys whose default is computed
        /// at startup (`workers`, `admin_token`) are written commented out, so the file
        /// read back gives exactly [`Config::default`].
        pub fn generate_config() -> String {
            let defaults = Config::default();
            let mut out = String::from(GENERATED_HEADER);
            $(
                out.push('\n');
                $(
                    out.push('#');
                    out.push_str($doc.trim_end());
                    out.push('\n');
                )+
                if has_flag!(runtime; $($flag)*) {
                    out.push_str("# ");
                }
                out.push_str(stringify!($key));
                out.push_str(" = ");
                out.push_str(&Value::to_toml(&defaults.$key));
                out.push('\n');
            )+
            out
        }
    };
}

config_keys! {
    /// Directory for RocksDB, uploaded files, the admin token and secrets.
    data_dir: PathBuf = PathBuf::from("./tern-data"), env "TERN_DATA_DIR";

    /// Address of the protocol listener (IP:port).
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7700)), env "TERN_LISTEN";

    /// Address of the HTTP listener: admin API, files, metrics (IP:port).
    http_listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 7780)), env "TERN_HTTP_LISTEN";

    /// Backend secret for the HTTP admin API. When unset, one is generated
    /// into `<data_dir>/admin.token` at first start.
    admin_token: Option<String> = None, env "TERN_ADMIN_TOKEN", secret, runtime;

    /// Event-loop threads. Defaults to the number of CPU cores.
    workers: usize = default_workers(), env "TERN_WORKERS", runtime;

    /// Open client connections; further connections are closed at accept.
    max_connections: usize = 100_000, env "TERN_MAX_CONNECTIONS";

    /// Open protocol connections from one client address (an IPv4 address,
    /// or an IPv6 /64); further ones are closed at accept. 0 = no limit.
    /// Behind a proxy every client has the proxy's address: raise it or use 0.
    max_connections_per_ip: u32 = 1024, env "TERN_MAX_CONNECTIONS_PER_IP";

    /// Protocol connections that have not completed HELLO, in all; past this
    /// the oldest of them is closed, so silent sockets never crowd out logins.
    max_unauthenticated: usize = 4096, env "TERN_MAX_UNAUTHENTICATED";

    /// Protocol connections from one client address that have not completed
    /// HELLO; further ones are closed at accept. 0 = no limit.
    max_unauthenticated_per_ip: u32 = 64, env "TERN_MAX_UNAUTHENTICATED_PER_IP";

    /// Open HTTP connections, in all (each holds a thread while open);
    /// further ones are closed at accept.
    http_max_connections: usize = 1024, env "TERN_HTTP_MAX_CONNECTIONS";

    /// Open HTTP connections from one client address; further ones are
    /// closed at accept. 0 = no limit.
    http_max_connections_per_ip: u32 = 64, env "TERN_HTTP_MAX_CONNECTIONS_PER_IP";

    /// PEM certificate chain. With `tls_key`, the protocol listener speaks
    /// TLS only (TLS 1.2 and 1.3), WebSocket included. The HTTP listener does
    /// not yet: keep it private, or behind a TLS proxy.
    tls_cert: Option<PathBuf> = None, env "TERN_TLS_CERT", runtime;

    /// PEM private key (PKCS#8, RSA or EC) of `tls_cert`.
    tls_key: Option<PathBuf> = None, env "TERN_TLS_KEY", runtime;

    /// Comma-separated `Origin` values allowed to open `/v1/ws` (the
    /// WebSocket transport on `listen`); `*` allows any.
    ws_allowed_origins: String = String::from("*"), env "TERN_WS_ALLOWED_ORIGINS";

    /// Unsent output per connection, in bytes, above which the server stops
    /// producing for and reading from that connection (at least 65536).
    conn_buffer: usize = 1_048_576, env "TERN_CONN_BUFFER";

    /// Largest frame body, in bytes (1024 to 268435455).
    max_frame: u32 = 1_048_576, env "TERN_MAX_FRAME";

    /// Largest PAYLOAD, in bytes; a larger one gets STATUS TOO_LARGE.
    /// At most max_frame - 1024, so that the frame around it fits.
    max_payload: u32 = 65_536, env "TERN_MAX_PAYLOAD";

    /// Seconds a message lives when its SEND carries no EXPIRY.
    default_expiry: u32 = 604_800, env "TERN_DEFAULT_EXPIRY";

    /// Largest EXPIRY, in seconds; a larger one is clamped to this.
    max_expiry: u32 = 2_592_000, env "TERN_MAX_EXPIRY";

    /// Seconds a message id is remembered to drop duplicates; never
    /// shorter than the message's EXPIRY.
    dedup_window: u32 = 86_400, env "TERN_DEDUP_WINDOW";

    /// Keepalive in seconds: the default and the upper bound for HELLO's proposal.
    keepalive: u32 = 60, env "TERN_KEEPALIVE";

    /// Seconds a new connection has to complete HELLO before it is closed.
    hello_timeout: u32 = 10, env "TERN_HELLO_TIMEOUT";

    /// Keep delivered messages as history instead of deleting them.
    retain_delivered: bool = false, env "TERN_RETAIN_DELIVERED";

    /// Items queued per user before senders get OVERLOADED.
    max_queue: u64 = 1_000_000, env "TERN_MAX_QUEUE";

    /// Deliveries written to a user but not yet ACKed; at this many the
    /// server waits for ACKs before sending more.
    max_inflight: u32 = 65_536, env "TERN_MAX_INFLIGHT";

    /// Members per group.
    max_group_size: usize = 100_000, env "TERN_MAX_GROUP_SIZE";

    /// Largest uploaded file, in bytes.
    max_file_size: u64 = 104_857_600, env "TERN_MAX_FILE_SIZE";

    /// Bytes of all stored files together; 0 means no quota.
    max_files_bytes: u64 = 0, env "TERN_MAX_FILES_BYTES";

    /// Where uploaded files live: "local" (under data_dir/files) or "s3"
    /// (a bucket of any S3-compatible store; see the s3_* keys). File
    /// metadata, quota and signing keys stay in data_dir either way.
    files_backend: FilesBackend = FilesBackend::Local, env "TERN_FILES_BACKEND";

    /// With files_backend = "s3": the store's URL, e.g. "http://127.0.0.1:9000";
    /// unset: AWS itself, in s3_region.
    s3_endpoint: Option<String> = None, env "TERN_S3_ENDPOINT", runtime;

    /// With files_backend = "s3": the bucket's region.
    s3_region: String = String::from("us-east-1"), env "TERN_S3_REGION";

    /// With files_backend = "s3": the bucket (required; tern does not create it).
    s3_bucket: Option<String> = None, env "TERN_S3_BUCKET", runtime;

    /// With files_backend = "s3": the access key id; unset: AWS_ACCESS_KEY_ID.
    s3_access_key: Option<String> = None, env "TERN_S3_ACCESS_KEY", runtime;

    /// With files_backend = "s3": the secret key; unset: AWS_SECRET_ACCESS_KEY.
    s3_secret_key: Option<String> = None, env "TERN_S3_SECRET_KEY", secret, runtime;

    /// With files_backend = "s3": path-style URLs (endpoint/bucket/key), as
    /// MinIO, Ceph and moto want; false: virtual-hosted (bucket.endpoint/key).
    s3_path_style: bool = false, env "TERN_S3_PATH_STYLE";

    /// With files_backend = "s3": clients may upload straight to the store
    /// with a presigned PUT URL, and downloads answer 302 to a presigned GET
    /// URL (after tern's own check). Proxied uploads keep working.
    files_direct: bool = false, env "TERN_FILES_DIRECT";

    /// Seconds a presigned URL of a direct transfer is valid; an upload not
    /// completed within it (plus a minute at most) is removed.
    files_direct_ttl: u32 = 900, env "TERN_FILES_DIRECT_TTL";

    /// Files older than this are deleted, with their thumbnails: days as an
    /// integer, or a number with an s/m/h/d unit ("12h", "30s"). 0 keeps
    /// files forever.
    files_max_age: Age = Age(0), env "TERN_FILES_MAX_AGE";

    /// Free space to keep on data_dir's filesystem: below it new SENDs get
    /// OVERLOADED and /readyz answers 503, so that delivering and ACKing
    /// (which free space) always have room. Bytes, or with a KiB/MiB/GiB
    /// suffix; 0 turns the reserve off. Default: 1% of the disk, at least 64MiB.
    min_free_space: Option<ByteSize> = None, env "TERN_MIN_FREE_SPACE", runtime;

    /// Tracing filter, e.g. "info" or "tern=debug".
    log: String = String::from("info"), env "TERN_LOG";

    /// Log output format: "text" or "json".
    log_format: LogFormat = LogFormat::Text, env "TERN_LOG_FORMAT";
}

/// The number of cores, or 1 when it cannot be determined.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Decodes one file value into its key's type; a wrong type is an error naming the key.
fn decode_toml<T: Value>(
    key: &'static str,
    secret: bool,
    value: toml::Value,
    path: &Path,
) -> Result<T, ConfigError> {
    value
        .clone()
        .try_into::<T>()
        .map_err(|_| ConfigError::Value {
            key,
            value: if secret {
                "<redacted>".into()
            } else {
                value.to_string()
            },
            origin: path.display().to_string(),
            expected: T::expected_in_file(),
        })
}

/// Parses one flag or environment string into its key's type.
fn parse_arg<T: Value>(
    key: &'static str,
    env: &str,
    secret: bool,
    raw: &str,
) -> Result<T, ConfigError> {
    T::parse_str(raw).ok_or_else(|| ConfigError::Value {
        key,
        value: if secret {
            "<redacted>".into()
        } else {
            format!("{raw:?}")
        },
        origin: arg_origin(key, env, raw),
        expected: T::expected(),
    })
}

/// Where a raw string came from. clap does not say once the args are parsed, so: the
/// environment variable if it holds exactly this string, else the flag.
fn arg_origin(key: &str, env: &str, raw: &str) -> String {
    match std::env::var(env) {
        Ok(value) if value == raw => env.to_owned(),
        _ => format!("--{}", key.replace('_', "-")),
    }
}

/// ` (did you mean "key"?)` for an unknown key close to a known one, else empty.
fn hint_for(unknown: &str) -> String {
    let normalized = unknown.to_ascii_lowercase().replace('-', "_");
    let best = KEYS
        .iter()
        .map(|&known| (edit_distance(&normalized, known), known))
        .min()
        .filter(|&(distance, _)| distance <= 2);
    match best {
        Some((_, known)) => format!(" (did you mean {known:?}?)"),
        None => " (`tern generate-config` lists every key)".into(),
    }
}

/// Levenshtein distance between two short ASCII keys.
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitute = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitute.min(row[j] + 1).min(row[j + 1] + 1);
        }
    }
    row[b.len()]
}

impl Config {
    /// Builds the configuration of `tern serve`: defaults, then the `--config` file,
    /// then the environment and flags in `args`, then [`Config::validate`].
    pub fn load(args: &ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                FileConfig::parse(&text, path)?
            }
            None => FileConfig::default(),
        };
        Config::merge(args, file)
    }

    /// Checks ranges and the rules between keys; the error names the key to change.
    /// [`Config::load`] calls it; call it again after changing a `Config` by hand.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &'static str, message: String) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid { key, message })
        }
        fn at_least<T: PartialOrd + fmt::Display>(
            key: &'static str,
            value: T,
            min: T,
        ) -> Result<(), ConfigError> {
            if value < min {
                return invalid(key, format!("must be at least {min}, got {value}"));
            }
            Ok(())
        }

        if self.data_dir.as_os_str().is_empty() {
            return invalid("data_dir", "must not be empty".into());
        }
        let (a, b) = (self.listen, self.http_listen);
        let overlapping_ips = a.ip() == b.ip()
            || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()));
        if a.port() != 0 && a.port() == b.port() && overlapping_ips {
            return invalid(
                "http_listen",
                format!("{b} must not share a port with listen ({a})"),
            );
        }
        if let Some(token) = &self.admin_token {
            // It travels in an HTTP header; never echo it in the message.
            if token.is_empty() || !token.bytes().all(|c| c.is_ascii_graphic()) {
                return invalid(
                    "admin_token",
                    "must be non-empty printable ASCII without spaces \
                     (it is sent in an HTTP header)"
                        .into(),
                );
            }
        }
        at_least("workers", self.workers, 1)?;
        at_least("max_connections", self.max_connections, 1)?;
        at_least("conn_buffer", self.conn_buffer, MIN_CONN_BUFFER)?;
        if !(MIN_FRAME..=MAX_FRAME_LIMIT).contains(&self.max_frame) {
            return invalid(
                "max_frame",
                format!(
                    "must be between {MIN_FRAME} and {MAX_FRAME_LIMIT} (the largest \
                     4-byte varint), got {}",
                    self.max_frame
                ),
            );
        }
        at_least("max_payload", self.max_payload, 1)?;
        let envelope = crate::wire::MAX_ENVELOPE;
        if self.max_payload > self.max_frame.saturating_sub(envelope) {
            return invalid(
                "max_payload",
                format!(
                    "must be at most max_frame ({}) - {envelope} (the other fields of a SEND \
                     or MSG), so a PAYLOAD of that size fits in a frame, got {}",
                    self.max_frame, self.max_payload
                ),
            );
        }
        at_least("max_expiry", self.max_expiry, 1)?;
        at_least("default_expiry", self.default_expiry, 1)?;
        if self.default_expiry > self.max_expiry {
            return invalid(
                "default_expiry",
                format!(
                    "must not exceed max_expiry ({}), got {}",
                    self.max_expiry, self.default_expiry
                ),
            );
        }
        at_least("keepalive", self.keepalive, 1)?;
        at_least("hello_timeout", self.hello_timeout, 1)?;
        at_least("max_queue", self.max_queue, 1)?;
        at_least("max_inflight", self.max_inflight, 1)?;
        at_least("max_group_size", self.max_group_size, 1)?;
        if self.files_backend == FilesBackend::S3 {
            if self.s3_bucket.as_deref().is_none_or(str::is_empty) {
                return invalid(
                    "s3_bucket",
                    "is required with files_backend = \"s3\"".into(),
                );
            }
            if let Some(endpoint) = &self.s3_endpoint {
                if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                    return invalid(
                        "s3_endpoint",
                        format!("must be an http:// or https:// URL, got {endpoint:?}"),
                    );
                }
            }
        } else if self.files_direct {
            return invalid(
                "files_direct",
                "needs files_backend = \"s3\" (the local backend serves files itself)".into(),
            );
        }
        if !(1..=604_800).contains(&self.files_direct_ttl) {
            return invalid(
                "files_direct_ttl",
                format!(
                    "must be between 1 and 604800 seconds (7 days, the longest a presigned \
                     URL may live), got {}",
                    self.files_direct_ttl
                ),
            );
        }
        if self.log.trim().is_empty() {
            return invalid("log", "must not be empty (e.g. \"info\")".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};
    use std::io::Write;

    /// `tern serve`'s flags on their own, to run clap the way `main` does.
    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    /// A config file holding `text`, and args pointing at it.
    fn with_file(text: &str) -> (tempfile::NamedTempFile, ServeArgs) {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        let args = ServeArgs {
            config: Some(file.path().to_path_buf()),
            ..ServeArgs::default()
        };
        (file, args)
    }

    /// The key an `Invalid` or `Value` error names, or a panic naming the error.
    fn error_key(result: Result<Config, ConfigError>) -> &'static str {
        match result {
            Err(ConfigError::Invalid { key, .. }) | Err(ConfigError::Value { key, .. }) => key,
            other => panic!("expected a key error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_spec_table() {
        let c = Config::default();
        assert_eq!(c.data_dir, PathBuf::from("./tern-data"));
        assert_eq!(c.listen, "127.0.0.1:7700".parse().unwrap());
        assert_eq!(c.http_listen, "127.0.0.1:7780".parse().unwrap());
        assert_eq!(c.admin_token, None);
        assert_eq!(c.workers, default_workers());
        assert!(c.workers >= 1);
        assert_eq!(c.max_connections, 100_000);
        assert_eq!(c.max_frame, 1_048_576);
        assert_eq!(c.max_payload, 65_536);
        assert_eq!(c.default_expiry, 604_800);
        assert_eq!(c.max_expiry, 2_592_000);
        assert_eq!(c.dedup_window, 86_400);
        assert_eq!(c.keepalive, 60);
        assert!(!c.retain_delivered);
        assert_eq!(c.max_queue, 1_000_000);
        assert_eq!(c.max_group_size, 100_000);
        assert_eq!(c.max_file_size, 104_857_600);
        assert_eq!(c.max_files_bytes, 0);
        assert_eq!(c.log, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.max_inflight, 65_536);
        assert_eq!(c.conn_buffer, 1_048_576);
        assert_eq!(c.hello_timeout, 10);
        c.validate().unwrap();
        // No file, no flags: exactly the defaults.
        assert_eq!(Config::load(&ServeArgs::default()).unwrap(), c);
    }

    #[test]
    fn file_overrides_default() {
        let (_f, args) = with_file(
            "max_frame = 2_097_152\nretain_delivered = true\nlisten = \"0.0.0.0:7000\"\n\
             log_format = \"json\"\nadmin_token = \"s3cret\"\ndata_dir = \"/var/lib/tern\"\n",
        );
        let c = Config::load(&args).unwrap();
        assert_eq!(c.max_frame, 2_097_152);
        assert!(c.retain_delivered);
        assert_eq!(c.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.admin_token.as_deref(), Some("s3cret"));
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/tern"));
        // Keys the file leaves out keep their defaults.
        assert_eq!(c.max_payload, 65_536);
    }

    #[test]
    fn env_or_flag_string_overrides_file() {
        let (_f, mut args) = with_file("max_frame = 3000000\nkeepalive = 30\n");
        args.max_frame = Some("2000000".into());
        args.retain_delivered = Some("yes".into());
        let c = Config::load(&args).unwrap();
        assert_eq!(c.max_frame, 2_000_000);
        assert_eq!(c.keepalive, 30);
        assert!(c.retain_delivered);
    }

    #[test]
    fn strings_parse_per_type() {
        for (raw, want) in [
            ("true", true),
            ("1", true),
            ("yes", true),
            ("TRUE", true),
            ("false", false),
            ("0", false),
            ("no", false),
        ] {
            assert_eq!(bool::parse_str(raw), Some(want), "{raw}");
        }
        assert_eq!(bool::parse_str("maybe"), None);
        assert_eq!(LogFormat::parse_str("json"), Some(LogFormat::Json));
        assert_eq!(LogFormat::parse_str("xml"), None);
        assert_eq!(
            SocketAddr::parse_str("[::1]:7700"),
            Some("[::1]:7700".parse().unwrap())
        );
        assert_eq!(SocketAddr::parse_str("localhost:7700"), None);
        assert_eq!(u32::parse_str("4294967296"), None);
        assert_eq!(u32::parse_str("-1"), None);
        assert_eq!(u64::parse_str("18446744073709551615"), Some(u64::MAX));
    }

    /// The one test that touches the process environment, through clap as `main` does.
    /// It alone uses TERN_DEDUP_WINDOW and TERN_MAX_INFLIGHT, so parallel tests cannot race.
    #[test]
    fn real_env_through_clap_and_flag_beats_env() {
        std::env::set_var("TERN_DEDUP_WINDOW", "123");
        let cli = Cli::try_parse_from(["tern"]).unwrap();
        assert_eq!(cli.serve.dedup_window.as_deref(), Some("123"));
        assert_eq!(Config::load(&cli.serve).unwrap().dedup_window, 123);

        let cli = Cli::try_parse_from(["tern", "--dedup-window", "7"]).unwrap();
        assert_eq!(Config::load(&cli.serve).unwrap().dedup_window, 7);

        // A bad value names the variable it came from, or the flag.
        std::env::set_var("TERN_MAX_INFLIGHT", "abc");
        let cli = Cli::try_parse_from(["tern"]).unwrap();
        let err = Config::load(&cli.serve).unwrap_err().to_string();
        assert_eq!(
            err,
            "max_inflight: invalid value \"abc\" (from TERN_MAX_INFLIGHT): \
             expected an unsigned integer (0 to 4294967295)"
        );
        let cli = Cli::try_parse_from(["tern", "--max-inflight", "xyz"]).unwrap();
        let err = Config::load(&cli.serve).unwrap_err().to_string();
        assert!(err.contains("(from --max-inflight)"), "{err}");

        std::env::remove_var("TERN_DEDUP_WINDOW");
        std::env::remove_var("TERN_MAX_INFLIGHT");
    }

    #[test]
    fn every_key_has_its_flag_and_env_name() {
        Cli::command().debug_assert();
        let cmd = Cli::command();
        let mut seen = Vec::new();
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "config" {
                assert_eq!(arg.get_env().unwrap(), "TERN_CONFIG");
                continue;
            }
            if !KEYS.contains(&id) {
                continue; // clap's own --help
            }
            assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()));
            let env = format!("TERN_{}", id.to_ascii_uppercase());
            assert_eq!(arg.get_env().unwrap(), env.as_str(), "{id}");
            assert!(arg.get_help().is_some(), "{id} has no help");
            seen.push(id.to_owned());
        }
        assert_eq!(seen, KEYS);
    }

    #[test]
    fn unknown_file_key_is_an_error_naming_it() {
        let (f, args) = with_file("max_frames = 5\n");
        let err = Config::load(&args).unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "max_frames"));
        assert_eq!(
            err.to_string(),
            format!(
                "unknown key \"max_frames\" in {} (did you mean \"max_frame\"?)",
                f.path().display()
            )
        );
        // A table is an unknown key too, not silently ignored.
        let (_f, args) = with_file("[server]\nlisten = \"127.0.0.1:1\"\n");
        let err = Config::load(&args).unwrap_err();
        assert!(matches!(&err, ConfigError::UnknownKey { key, .. } if key == "server"));
        assert!(err.to_string().contains("tern generate-config"), "{err}");
    }

    #[test]
    fn bad_values_are_errors_naming_the_key() {
        let (f, args) = with_file("max_frame = \"abc\"\n");
        let err = Config::load(&args).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "max_frame: invalid value \"abc\" (from {}): expected an unquoted integer \
                 from 0 to 4294967295",
                f.path().display()
            )
        );
        for text in [
            "max_frame = -1",
            "max_frame = 1.5",
            "retain_delivered = \"yes\"",
            "listen = \"localhost:7700\"",
            "log_format = \"xml\"",
            "workers = [1]",
        ] {
            let (_f, args) = with_file(text);
            let key = text.split(' ').next().unwrap();
            assert_eq!(error_key(Config::load(&args)), key, "{text}");
        }

        let args = ServeArgs {
            max_frame: Some("abc".into()),
            ..ServeArgs::default()
        };
        assert_eq!(
            Config::load(&args).unwrap_err().to_string(),
            "max_frame: invalid value \"abc\" (from --max-frame): \
             expected an unsigned integer (0 to 4294967295)"
        );
        let args = ServeArgs {
            log_format: Some("xml".into()),
            ..ServeArgs::default()
        };
        assert_eq!(error_key(Config::load(&args)), "log_format");
        let args = ServeArgs {
            http_listen: Some("localhost:7780".into()),
            ..ServeArgs::default()
        };
        let err = Config::load(&args).unwrap_err().to_string();
        assert!(err.contains("host names are not resolved"), "{err}");
    }

    #[test]
    fn file_errors_name_the_file() {
        let args = ServeArgs {
            config: Some(PathBuf::from("/nonexistent/tern.toml")),
            ..ServeArgs::default()
        };
        let err = Config::load(&args).unwrap_err();
        assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/tern.toml"));

        let (_f, args) = with_file("max_frame = \n");
        let err = Config::load(&args).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn validation_errors_name_the_key() {
        let cases = [
            ("workers = 0", "workers"),
            ("max_connections = 0", "max_connections"),
            ("conn_buffer = 65535", "conn_buffer"),
            ("max_frame = 1023", "max_frame"),
            ("max_frame = 268435456", "max_frame"),
            ("max_payload = 0", "max_payload"),
            ("max_payload = 1048576", "max_payload"),
            // Regression (issue 8): a PAYLOAD this size fit max_frame, but its
            // SEND did not, and a MSG carrying it was larger than MAX_FRAME.
            ("max_payload = 1048000", "max_payload"),
            ("max_expiry = 0", "max_expiry"),
            ("default_expiry = 0", "default_expiry"),
            ("default_expiry = 2592001", "default_expiry"),
            ("max_expiry = 600", "default_expiry"),
            ("keepalive = 0", "keepalive"),
            ("hello_timeout = 0", "hello_timeout"),
            ("max_queue = 0", "max_queue"),
            ("max_inflight = 0", "max_inflight"),
            ("max_group_size = 0", "max_group_size"),
            ("http_listen = \"127.0.0.1:7700\"", "http_listen"),
            ("http_listen = \"0.0.0.0:7700\"", "http_listen"),
            ("data_dir = \"\"", "data_dir"),
            ("log = \" \"", "log"),
            ("admin_token = \"\"", "admin_token"),
            ("admin_token = \"two words\"", "admin_token"),
        ];
        for (text, want) in cases {
            let (_f, args) = with_file(text);
            let result = Config::load(&args);
            assert!(
                matches!(&result, Err(ConfigError::Invalid { key, .. }) if *key == want),
                "{text}: {result:?}"
            );
            let message = result.unwrap_err().to_string();
            assert!(message.starts_with(&format!("{want}: ")), "{message}");
        }
        // Edges that are fine.
        let (_f, args) = with_file(
            "max_frame = 268435455\nmax_payload = 268434431\ndefault_expiry = 2592000\n\
             conn_buffer = 65536\nlisten = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n",
        );
        Config::load(&args).unwrap();
        // Flags are validated the same way, after merging.
        let args = ServeArgs {
            max_payload: Some("2000000".into()),
            ..ServeArgs::default()
        };
        assert_eq!(error_key(Config::load(&args)), "max_payload");
    }

    #[test]
    fn secrets_are_redacted() {
        let args = ServeArgs {
            admin_token: Some("hunter2-token".into()),
            ..ServeArgs::default()
        };
        assert!(!format!("{args:?}").contains("hunter2"));
        let c = Config::load(&args).unwrap();
        assert_eq!(c.admin_token.as_deref(), Some("hunter2-token"));
        let debug = format!("{c:?}");
        assert!(!debug.contains("hunter2") && debug.contains("admin_token: <redacted>"));
        assert!(format!("{:?}", Config::default()).contains("admin_token: None"));

        let (_f, args) = with_file("admin_token = 12345\n");
        let err = Config::load(&args).unwrap_err().to_string();
        assert!(
            err.contains("<redacted>") && !err.contains("12345"),
            "{err}"
        );
    }

    #[test]
    fn generated_config_round_trips_to_the_defaults() {
        let text = generate_config();
        let file = FileConfig::parse(&text, Path::new("generated.toml")).unwrap();
        assert_eq!(
            Config::merge(&ServeArgs::default(), file).unwrap(),
            Config::default()
        );
        // Through the real loader too.
        let (_f, args) = with_file(&text);
        assert_eq!(Config::load(&args).unwrap(), Config::default());

        for key in KEYS {
            let commented = format!("\n# {key} = ");
            let plain = format!("\n{key} = ");
            match *key {
                "workers" | "admin_token" | "min_free_space" | "tls_cert" | "tls_key"
                | "s3_endpoint" | "s3_bucket" | "s3_access_key" | "s3_secret_key" => {
                    assert!(text.contains(&commented), "{key}")
                }
                _ => assert!(text.contains(&plain), "{key}"),
            }
        }
        assert!(text.contains("\n# admin_token = \"...\"\n"), "{text}");
        assert!(text.contains(&format!("\n# workers = {}\n", default_workers())));
        assert!(text.contains("\nmax_frame = 1048576\n"));
        assert!(text.contains("\ndata_dir = \"./tern-data\"\n"), "{text}");
        assert!(text.contains("# Largest frame body, in bytes"));
        // Every non-empty line is a comment or a `key = value`.
        for line in text.lines().filter(|l| !l.is_empty()) {
            assert!(line.starts_with('#') || line.contains(" = "), "{line}");
        }
    }

    #[test]
    fn files_keys() {
        assert_eq!(Age::parse("7"), Some(Age(7 * 86_400)));
        assert_eq!(Age::parse("2s"), Some(Age(2)));
        assert_eq!(Age::parse("10m"), Some(Age(600)));
        assert_eq!(Age::parse("12h"), Some(Age(43_200)));
        assert_eq!(Age::parse("3d"), Some(Age(3 * 86_400)));
        for bad in ["", "s", "2w", "-1", "1.5d", "99999999999999999999"] {
            assert_eq!(Age::parse(bad), None, "{bad:?}");
        }
        let (_f, args) = with_file("files_max_age = 30\n");
        assert_eq!(Config::load(&args).unwrap().files_max_age, Age(30 * 86_400));
        let (_f, args) = with_file("files_max_age = \"90s\"\n");
        assert_eq!(Config::load(&args).unwrap().files_max_age, Age(90));
        // s3 needs a bucket; direct transfers need s3; a presigned URL
        // lives at most 7 days.
        let (_f, args) = with_file("files_backend = \"s3\"\n");
        assert_eq!(error_key(Config::load(&args)), "s3_bucket");
        let (_f, args) = with_file("files_direct = true\n");
        assert_eq!(error_key(Config::load(&args)), "files_direct");
        let (_f, args) =
            with_file("files_backend = \"s3\"\ns3_bucket = \"b\"\ns3_endpoint = \"ftp://x\"\n");
        assert_eq!(error_key(Config::load(&args)), "s3_endpoint");
        let (_f, args) = with_file(
            "files_backend = \"s3\"\ns3_bucket = \"b\"\nfiles_direct = true\n\
             files_direct_ttl = 604801\n",
        );
        assert_eq!(error_key(Config::load(&args)), "files_direct_ttl");
        let (_f, args) = with_file("files_backend = \"s3\"\ns3_bucket = \"b\"\n");
        assert_eq!(Config::load(&args).unwrap().files_backend, FilesBackend::S3);
        assert!(generate_config().contains("\nfiles_backend = \"local\"\n"));
        assert!(generate_config().contains("\nfiles_max_age = 0\n"));
    }

    #[test]
    fn unknown_key_hints() {
        assert_eq!(hint_for("max-frame"), " (did you mean \"max_frame\"?)");
        assert_eq!(hint_for("LISTEN"), " (did you mean \"listen\"?)");
        assert_eq!(hint_for("http_listn"), " (did you mean \"http_listen\"?)");
        assert!(hint_for("sqlite_path").contains("generate-config"));
        assert_eq!(hint_for("s3-bucket"), " (did you mean \"s3_bucket\"?)");
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
