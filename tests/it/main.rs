//! Integration tests: the real `tern` binary on 127.0.0.1:0 with a temporary
//! data directory, driven over the real protocol and HTTP.

mod bad_input;
mod browser;
mod crash;
mod delivery;
mod disk;
mod files;
mod files_more;
mod files_s3;
mod groups;
mod hostile;
mod http_api;
mod http_conn;
mod losingfs;
mod messages_api;
pub(crate) mod powercut;
mod proxy;
mod reliability;
mod s3;
mod sdk;
mod sdk_crash;
mod sdk_powercut;
mod tls;
mod tour;
mod util;
mod ws;
