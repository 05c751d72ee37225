//! The built-in file server: `/v1/files` (work in progress: answers 404).

use tiny_http::Request;

use super::{respond, Reply};
use crate::config::Config;
use crate::core::Core;

/// The file store under `<data_dir>/files/`.
pub struct Files {}

impl Files {
    /// Opens (creating) the file store.
    pub fn open(_config: &Config) -> std::io::Result<Files> {
        Ok(Files {})
    }

    /// Serves one request under `/v1/files`.
    pub fn handle(&self, _core: &Core, _admin: bool, request: Request) {
        respond(request, Reply::error(404, "not_found", "no such endpoint"));
    }
}
